"""Likelihood solver steps vs error: the exact log-likelihood (per target point, nats) of a checkpoint with
fixed-step solvers against dopri5 (rtol = atol = 1e-7), and the time of each, on the real map's first frozen
splits (bench/real_era5.py), dense and sparse. Chooses the service's default likelihood solver.

    python bench/ll_solver_error.py --checkpoint RUN/best.pt [--splits 4] [--solvers euler:1,euler:4,...]

Prints, per solver: the mean |error| and the max |error| vs dopri5 (nats per point), the mean time per
task, and the ratio of that time to dopri5's; then, for sampling, the RMSE between Euler-K samples and a
dopri5 solve of the same noise (--sample-steps; other fixed-step methods: --sample-solvers midpoint:4), per
variable in model units (kPa, degC, m/s). Together they are the measurement behind a model's recorded solver
defaults (the manifest's `solvers`). `--solvers ''` measures the samples alone. `--one-solve midpoint:4`: the
error of the log-likelihoods a request gets when its samples are scored in the solve that draws them, against
a fine backward solve of the same samples (--one-solve-reference).
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
from flownp.core.likelihood import log_likelihood, sample_log_likelihood, samples_log_likelihood  # noqa: E402
from flownp.core.sampling import draw_noise  # noqa: E402
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
    p.add_argument("--sample-solvers", default="", help="further fixed-step sampling solvers, e.g. midpoint:4,euler:32")
    p.add_argument("--one-solve", default="", help="fixed-step solvers whose samples are scored in their own "
                   "sampling solve (flownp.core.likelihood.sample_log_likelihood), e.g. midpoint:4")
    p.add_argument("--one-solve-reference", default="midpoint:64",
                   help="the backward solve that scores the same samples as the reference")
    p.add_argument("--json", dest="json_out", default=None,
                   help="write the measurements as JSON (input of `python -m flownp.default_model pack --solver-study`)")
    a = p.parse_args()
    torch.set_num_threads(1)
    ck = load_checkpoint(a.checkpoint)
    model = model_from_checkpoint(ck).eval()
    norm = Normalizer.from_dict(ck["normalizer"])
    values, _ = load_map(a.file)
    yn = norm.normalize(values)
    solvers = (["dopri5:1e-7"] + a.solvers.split(",")) if a.solvers else []
    sample_solvers = tuple(int(k) for k in a.sample_steps.split(",") if k) + tuple(
        parse_solver(s) for s in a.sample_solvers.split(",") if s)
    study: dict = {"checkpoint": a.checkpoint, "splits": a.splits, "estimator": a.estimator,
                   "reference": solvers[0] if solvers else None, "regimes": {}}
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
        out = study["regimes"][regime] = {}
        if solvers:
            ll_table(a, regime, solvers, ll, secs, out)
        if sample_solvers:
            sw = steps_sweep(model, batches, norm, sample_solvers, n_samples=4)
            print(f"sampling: RMSE of each solver's samples vs {sw['reference']} of the same noise (4 samples per "
                  f"task; reference NFE {sw['reference_nfe_mean']:.0f}), units {sw['units']}")
            keys = {k: k if ":" in k else f"euler:{k}" for k in sw["rmse_to_reference"]}
            for k, r in sw["rmse_to_reference"].items():
                print(f"{keys[k]:>14} " + " ".join(f"{v}={x:.2e}" for v, x in r.items()))
            out["sample_rmse"] = {keys[k]: r for k, r in sw["rmse_to_reference"].items()}
            out["sample_units"] = sw["units"]
        if a.one_solve:
            out["one_solve_ll_max_abs_error"] = one_solve_errors(model, batches, a.one_solve.split(","),
                                                                 parse_solver(a.one_solve_reference), a.estimator)
            out["one_solve_reference"] = a.one_solve_reference
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(study, indent=2) + "\n")


def one_solve_errors(model, batches, specs: list[str], reference, estimator: str, n_samples: int = 4) -> dict:
    """{solver: {"one_solve": max |error|, "backward": max |error|}} (nats per point) of the log-likelihoods of
    `n_samples` samples per task drawn and scored in one forward solve, and of the same samples scored by a
    backward solve with the same solver, both against `reference` scoring them backwards; printed."""
    errs: dict[str, dict[str, float]] = {}
    for spec in specs:
        solver, worst = parse_solver(spec), {"one_solve": 0.0, "backward": 0.0}
        for i, b in enumerate(batches):
            tr = model.task_transform(b.xc, b.yc, b.xt)
            y0 = draw_noise(model, b.xt, n_samples, torch.Generator().manual_seed(i))
            smp, res = sample_log_likelihood(model, b.xc, b.yc, b.xt, y0, solver=solver, estimator=estimator,
                                             transform=tr)
            score = lambda s_: samples_log_likelihood(model, b.xc, b.yc, b.xt, smp, solver=s_,  # noqa: E731
                                                      estimator=estimator, transform=tr).per_point
            ref = score(reference)
            worst["one_solve"] = max(worst["one_solve"], float((res.per_point - ref).abs().max()))
            worst["backward"] = max(worst["backward"], float((score(solver) - ref).abs().max()))
        errs[spec] = worst
        print(f"{spec:>14} max |err| vs {reference.describe()} backwards ({n_samples} samples per task, nats/point): "
              f"scored in the sampling solve {worst['one_solve']:.2e}, scored backwards {worst['backward']:.2e}")
    return errs


def ll_table(a, regime: str, solvers: list[str], ll: dict, secs: dict, out: dict) -> None:
    """Print the likelihood solvers' errors vs the reference (solvers[0]) and record them in `out`."""
    ref = np.array(ll[solvers[0]])
    print(f"{regime}: {a.splits} real-map splits, estimator {a.estimator}; error = solver - dopri5 "
          f"(nats/point); time per task excludes the GP base (computed once)")
    print(f"{'solver':>14} {'mean |err|':>11} {'max |err|':>10} {'s/task':>8} {'time/dopri5':>12}")
    for s in solvers:
        e = np.abs(np.array(ll[s]) - ref)
        print(f"{s:>14} {e.mean():11.2e} {e.max():10.2e} {secs[s] / a.splits:8.3f} "
              f"{secs[s] / secs[solvers[0]]:12.3f}")
    out.update({
        "ll_max_abs_error": {s: float(np.abs(np.array(ll[s]) - ref).max()) for s in solvers[1:]},
        "ll_seconds_per_task": {s: secs[s] / a.splits for s in solvers}})


if __name__ == "__main__":
    main()
