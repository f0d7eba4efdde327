"""Latency of whole requests through the inference layer the service runs (flownp.inference), on the real
map's first frozen dense split (bench/real_era5.py, about 1000 context points / 245 targets), GP base
included: (a) 8 samples with their log-likelihoods, (b) the exact log-likelihood of the true targets, and
the share of (a) the GP base takes. Goals (issue 14): (a) p50 <= 1 s, (b) <= 3 s on 2 cores.

    python bench/request_latency.py [--checkpoint PATH | default] [--repeats 7] [--threads 2]
        [--solver model|euler:16] [--ll-solver model|midpoint:4] [--versus euler:8,midpoint:2]

`model` (the default) takes the model's recorded solver defaults (its manifest's `solvers`, as the service
does), else Euler 8 / midpoint 2. `--versus SAMPLE,LL` times (a) with other solvers in the same run, the
two alternating request by request, and prints the ratio, so the comparison does not depend on how busy the
machine is. Where the sampling and likelihood solvers are the same, (a) draws and scores in one solve
(`flownp.inference.one_solve`).
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
from flownp.inference import (Task, build_model, default_model, extrapolate, log_likelihood, parse_solver,  # noqa: E402
                              task)


def real_request(lm) -> Task:
    """The real map's first frozen dense split (bench/real_era5.py) as a request to `lm`: about 1000
    context points / 245 targets, true target values included."""
    values, _ = load_map(DEFAULT_FILE)
    era5 = lm.space.to_era5(lm.space.normalizer.normalize(values).astype(np.float32))  # ERA5 units
    sp = make_splits("dense", 1, 0, len(values))[0]
    ci, ti = sp.perm[:sp.n_ctx], sp.perm[sp.n_ctx:]
    lat, lon = lm.space.region.circle_lat, lm.space.region.circle_lon
    return task(lm.space, lat[ci], lon[ci], era5[ci].astype(np.float32), lat[ti], lon[ti], era5[ti].astype(np.float32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--solver", default="model")
    p.add_argument("--ll-solver", default="model")
    p.add_argument("--versus", default=None, help="SAMPLE,LL solvers to time (a) with as well, e.g. euler:8,midpoint:2")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lm = default_model() if a.checkpoint == "default" else build_model("bench", load_checkpoint(a.checkpoint),
                                                                         None, a.checkpoint)
    t = real_request(lm)
    n_ctx, n_tgt = t.xc.shape[1], t.xt.shape[1]
    pick = lambda spec, kind, fb: lm.solver(kind, parse_solver(fb)) if spec == "model" else parse_solver(spec)  # noqa: E731
    solver, ll_solver = pick(a.solver, "sample", "euler:8"), pick(a.ll_solver, "log_likelihood", "midpoint:2")

    def timed(*fns) -> list[list[float]]:
        """Wall times of each fn over `repeats` rounds, the fns alternating within a round (so a busy spell
        of the machine falls on all of them alike and their ratio holds)."""
        for fn in fns:
            fn()  # warm-up
        out: list[list[float]] = [[] for _ in fns]
        for _ in range(a.repeats):
            for fn, times in zip(fns, out):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return out

    def request(smp, lls):
        return lambda: extrapolate(lm, t, num_samples=a.samples, solver=smp, seed=0, with_ll=True, ll_solver=lls,
                                   estimator="auto")

    if a.versus:
        vs_smp, vs_ll = (parse_solver(x) for x in a.versus.split(","))
        req, vs = timed(request(solver, ll_solver), request(vs_smp, vs_ll))
    else:
        (req,), vs = timed(request(solver, ll_solver)), None
    (ll,) = timed(lambda: log_likelihood(lm, t, solver=ll_solver, estimator="exact"))
    (base,) = timed(lambda: lm.model.task_transform(t.xc, t.yc, t.xt)) if getattr(lm.model, "has_task_transform",
                                                                                False) else ([0.0],)
    med = statistics.median
    print(f"request: {n_ctx} context / {n_tgt} targets of the real map, {a.threads} threads, {a.repeats} repeats")
    print(f"(a) {a.samples} samples ({solver.describe()}) with log-likelihoods ({ll_solver.describe()}): "
          f"p50 {med(req):.3f} s, max {max(req):.3f} s  (goal p50 <= 1 s: {'met' if med(req) <= 1 else 'MISSED'})")
    if vs is not None:
        print(f"    versus {a.versus}: p50 {med(vs):.3f} s; ratio {med(req) / med(vs):.3f}")
    print(f"(b) exact log-likelihood of the targets ({ll_solver.describe()}): p50 {med(ll):.3f} s  "
          f"(goal <= 3 s: {'met' if med(ll) <= 3 else 'MISSED'})")
    print(f"GP base (fit + posterior + whitening) p50 {med(base):.3f} s = {med(base) / med(req):.2f} of (a)")


if __name__ == "__main__":
    main()
