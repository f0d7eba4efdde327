"""Likelihood cost and accuracy for one request (1000 context / 245 targets, independent-target model):
cost per step of the exact block trace (4 vector-Jacobian products) over Hutchinson with 1 probe
(goal <= 3.5), and the error of each (fixed-step solver) against a dopri5 (rtol = atol = 1e-5) exact
reference, in nats of the whole target set.

    python bench/likelihood_cost.py [--checkpoint RUN/best.pt] [--solver midpoint:100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from _common import load_model, request
from flownp.inference import parse_solver
from flownp.core.config import ModelConfig
from flownp.core.likelihood import log_likelihood


def run(model, batch, solver, estimator: str, probes: int = 1, seed: int = 0):
    xc, yc, xt, yt = batch
    t0 = time.perf_counter()
    res = log_likelihood(model, xc, yc, xt, yt, solver=solver, estimator=estimator, n_probes=probes, seed=seed)
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="an independent-target model (default: untrained)")
    ap.add_argument("--solver", default="midpoint:100")
    ap.add_argument("--n-tgt", type=int, default=245)
    ap.add_argument("--seeds", type=int, default=8, help="Hutchinson draws for its error spread")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint, ModelConfig(targets="independent"))
    if model.config.targets != "independent":
        raise SystemExit("the exact block trace needs a targets='independent' model")
    batch = request(1000, a.n_tgt, seed=1)
    if a.checkpoint:  # a realistic target set: the model's own sample
        from flownp.core.sampling import sample

        yt = sample(model, *batch[:3], generator=torch.Generator().manual_seed(1)).samples[:, 0]
        batch = (*batch[:3], yt)
    solver = parse_solver(a.solver)
    ref, t_ref = run(model, batch, parse_solver("dopri5:1e-5"), "exact")
    exact, t_exact = run(model, batch, solver, "exact")
    hutch = [run(model, batch, solver, "hutchinson", 1, s) for s in range(a.seeds)]
    t_h = sum(t for _, t in hutch) / len(hutch)
    errs = torch.stack([r.joint - ref.joint for r, _ in hutch]).flatten()
    out = {
        "solver": solver.describe(), "n_ctx": 1000, "n_tgt": a.n_tgt, "trained": bool(a.checkpoint),
        "reference": {"solver": "dopri5 1e-5, exact trace", "joint_nats": float(ref.joint), "nfe": ref.nfe,
                      "seconds": t_ref},
        "exact": {"seconds": t_exact, "per_step_s": t_exact / exact.nfe, "nfe": exact.nfe,
                  "error_nats": float(exact.joint - ref.joint)},
        "hutchinson_1": {"seconds": t_h, "per_step_s": t_h / hutch[0][0].nfe, "nfe": hutch[0][0].nfe,
                         "error_mean_nats": float(errs.mean()), "error_std_nats": float(errs.std()),
                         "draws": a.seeds},
    }
    out["exact_over_hutchinson_cost"] = out["exact"]["per_step_s"] / out["hutchinson_1"]["per_step_s"]
    print(json.dumps(out, indent=2))
    print(f"exact/Hutchinson(1) cost per step: {out['exact_over_hutchinson_cost']:.2f} (goal <= 3.5); "
          f"error vs dopri5: exact {out['exact']['error_nats']:+.3f} nats, Hutchinson "
          f"{out['hutchinson_1']['error_mean_nats']:+.2f} +- {out['hutchinson_1']['error_std_nats']:.2f} nats "
          f"({a.n_tgt * 4}-dim target set); exact LL took {t_exact:.2f} s")


if __name__ == "__main__":
    main()
