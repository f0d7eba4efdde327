"""Latency of whole requests through the inference layer the service runs (flownp.inference), on the real
map's first frozen dense split (bench/real_era5.py, about 1000 context points / 245 targets), GP base
included: (a) 8 samples with their log-likelihoods, (b) the exact log-likelihood of the true targets, and
the share of (a) the GP base takes. Goals (issue 14): (a) p50 <= 1 s, (b) <= 3 s on 2 cores.

    python bench/request_latency.py [--checkpoint PATH | default] [--repeats 7] [--threads 2]
        [--solver euler:16] [--ll-solver midpoint:4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_era5 import DEFAULT_FILE, load_map, make_splits  # noqa: E402

from flownp.checkpoint import load_checkpoint  # noqa: E402
from flownp.inference import build_model, default_model, extrapolate, log_likelihood, parse_solver, task  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--solver", default="euler:16")
    p.add_argument("--ll-solver", default="midpoint:4")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lm = default_model() if a.checkpoint == "default" else build_model("bench", load_checkpoint(a.checkpoint),
                                                                         None, a.checkpoint)
    values, _ = load_map(DEFAULT_FILE)
    era5 = lm.space.to_era5(lm.space.normalizer.normalize(values).astype(np.float32))  # ERA5 units
    sp = make_splits("dense", 1, 0, len(values))[0]
    ci, ti = sp.perm[:sp.n_ctx], sp.perm[sp.n_ctx:]
    lat, lon = lm.space.region.circle_lat, lm.space.region.circle_lon
    t = task(lm.space, lat[ci], lon[ci], era5[ci].astype(np.float32), lat[ti], lon[ti], era5[ti].astype(np.float32))
    solver, ll_solver = parse_solver(a.solver), parse_solver(a.ll_solver)

    def timed(fn) -> list[float]:
        fn()  # warm-up
        out = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    req = timed(lambda: extrapolate(lm, t, num_samples=a.samples, solver=solver, seed=0, with_ll=True,
                                    ll_solver=ll_solver, estimator="auto"))
    ll = timed(lambda: log_likelihood(lm, t, solver=ll_solver, estimator="exact"))
    base = timed(lambda: lm.model.task_transform(t.xc, t.yc, t.xt)) if getattr(lm.model, "has_task_transform",
                                                                             False) else [0.0]
    med = statistics.median
    print(f"request: {sp.n_ctx} context / {len(ti)} targets of the real map, {a.threads} threads, {a.repeats} repeats")
    print(f"(a) {a.samples} samples ({a.solver}) with log-likelihoods ({a.ll_solver}): p50 {med(req):.3f} s, "
          f"max {max(req):.3f} s  (goal p50 <= 1 s: {'met' if med(req) <= 1 else 'MISSED'})")
    print(f"(b) exact log-likelihood of the targets ({a.ll_solver}): p50 {med(ll):.3f} s  "
          f"(goal <= 3 s: {'met' if med(ll) <= 3 else 'MISSED'})")
    print(f"GP base (fit + posterior + whitening) p50 {med(base):.3f} s = {med(base) / med(req):.2f} of (a)")


if __name__ == "__main__":
    main()
