"""Likelihood solver steps vs error: the exact log-likelihood (per target point, nats) of a checkpoint with
fixed-step solvers against dopri5 (rtol = atol = 1e-7), and the time of each, on the real map's first frozen
splits (bench/real_era5.py), dense and sparse. Chooses the service's default likelihood solver.

    python bench/ll_solver_error.py --checkpoint RUN/best.pt [--splits 4] [--solvers euler:1,euler:4,...]

Prints, per solver: the mean |error| and the max |error| vs dopri5 (nats per point), the mean time per
task, and the ratio of that time to dopri5's; then, for sampling, the RMSE between Euler-K samples and a
dopri5 solve of the same noise (--sample-steps), per variable in model units (kPa, degC, m/s). Together they
are the measurement behind a model's recorded solver defaults (the manifest's `solvers`).
"""

from __future__ import annotations

import argparse
import json
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
from flownp.jobs.robustness import steps_sweep  # noqa: E402
from ingest.normalize import Normalizer  # noqa: E402
from ingest.region import MEMPHIS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--file", default=str(DEFAULT_FILE))
    p.add_argument("--splits", type=int, default=4)
    p.add_argument("--solvers", default="euler:1,euler:2,euler:4,midpoint:2,midpoint:4,midpoint:8,rk4:4")
    p.add_argument("--estimator", default="exact")
    p.add_argument("--sample-steps", default="1,2,4,8", help="Euler step counts for the sample error ('' for none)")
    p.add_argument("--json", dest="json_out", default=None,
                   help="write the measurements as JSON (input of `python -m flownp.default_model pack --solver-study`)")
    a = p.parse_args()
    torch.set_num_threads(1)
    ck = load_checkpoint(a.checkpoint)
    model = model_from_checkpoint(ck).eval()
    norm = Normalizer.from_dict(ck["normalizer"])
    values, _ = load_map(a.file)
    yn = norm.normalize(values)
    solvers = ["dopri5:1e-7"] + a.solvers.split(",")
    study: dict = {"checkpoint": a.checkpoint, "splits": a.splits, "estimator": a.estimator,
                   "reference": solvers[0], "regimes": {}}
    for regime in ("dense", "sparse"):
        ll = {s: [] for s in solvers}
        secs = {s: 0.0 for s in solvers}
        batches = [task_batch(yn, MEMPHIS.circle_xy.astype(np.float32), sp)
                   for sp in make_splits(regime, a.splits, 0, len(values))]
        for b in batches:
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
        out = study["regimes"][regime] = {
            "ll_max_abs_error": {s: float(np.abs(np.array(ll[s]) - ref).max()) for s in solvers[1:]},
            "ll_seconds_per_task": {s: secs[s] / a.splits for s in solvers}}
        if a.sample_steps:
            sw = steps_sweep(model, batches, norm, tuple(int(k) for k in a.sample_steps.split(",")), n_samples=4)
            print(f"sampling: RMSE of Euler-K samples vs {sw['reference']} of the same noise (4 samples per task; "
                  f"reference NFE {sw['reference_nfe_mean']:.0f}), units {sw['units']}")
            for k, r in sw["rmse_to_reference"].items():
                print(f"{'euler:' + k:>14} " + " ".join(f"{v}={x:.2e}" for v, x in r.items()))
            out["sample_rmse"] = {f"euler:{k}": r for k, r in sw["rmse_to_reference"].items()}
            out["sample_units"] = sw["units"]
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(study, indent=2) + "\n")


if __name__ == "__main__":
    main()
