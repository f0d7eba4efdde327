"""Likelihood solver steps vs error: the exact log-likelihood (per target point, nats) of a checkpoint with
fixed-step solvers against dopri5 (rtol = atol = 1e-7), and the time of each, on the real map's first frozen
splits (bench/real_era5.py), dense and sparse. Chooses the service's default likelihood solver.

    python bench/ll_solver_error.py --checkpoint RUN/best.pt [--splits 4] [--solvers euler:1,euler:4,...]

Prints, per solver: the mean |error| and the max |error| vs dopri5 (nats per point), the mean time per
task, and the ratio of that time to dopri5's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_era5 import DEFAULT_FILE, load_map, make_splits, task_batch  # noqa: E402

from flownp.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from flownp.core.likelihood import log_likelihood  # noqa: E402
from flownp.jobs.evaluate import parse_solver  # noqa: E402
from ingest.normalize import Normalizer  # noqa: E402
from ingest.region import MEMPHIS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--file", default=str(DEFAULT_FILE))
    p.add_argument("--splits", type=int, default=4)
    p.add_argument("--solvers", default="euler:1,euler:2,euler:4,midpoint:2,midpoint:4,midpoint:8,rk4:4")
    p.add_argument("--estimator", default="exact")
    a = p.parse_args()
    torch.set_num_threads(1)
    ck = load_checkpoint(a.checkpoint)
    model = model_from_checkpoint(ck).eval()
    norm = Normalizer.from_dict(ck["normalizer"])
    values, _ = load_map(a.file)
    yn = norm.normalize(values)
    solvers = ["dopri5:1e-7"] + a.solvers.split(",")
    for regime in ("dense", "sparse"):
        ll = {s: [] for s in solvers}
        secs = {s: 0.0 for s in solvers}
        for sp in make_splits(regime, a.splits, 0, len(values)):
            b = task_batch(yn, MEMPHIS.circle_xy.astype(np.float32), sp)
            tr = model.task_transform(b.xc, b.yc, b.xt) if hasattr(model, "task_transform") else None
            for s in solvers:
                t0 = time.perf_counter()
                r = log_likelihood(model, b.xc, b.yc, b.xt, b.yt, solver=parse_solver(s), estimator=a.estimator,
                                   transform=tr)
                secs[s] += time.perf_counter() - t0
                ll[s].append(float(r.per_point[0]))
        ref = np.array(ll[solvers[0]])
        print(f"{regime}: {a.splits} real-map splits, estimator {a.estimator}; error = solver - dopri5 "
              f"(nats/point); time per task excludes the GP base (computed once)")
        print(f"{'solver':>14} {'mean |err|':>11} {'max |err|':>10} {'s/task':>8} {'time/dopri5':>12}")
        for s in solvers:
            e = np.abs(np.array(ll[s]) - ref)
            print(f"{s:>14} {e.mean():11.2e} {e.max():10.2e} {secs[s] / a.splits:8.3f} "
                  f"{secs[s] / secs[solvers[0]]:12.3f}")


if __name__ == "__main__":
    main()
