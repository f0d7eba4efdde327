"""Sampling latency of one request (1000 context points; 245 and 1000 targets; one sample; 16 Euler
steps) over its ideal: the context encoding plus 16 target-side velocity evaluations, each timed alone
in the same run (goal <= 1.2), and the p50 latency (goals: <= 0.35 s for 245 targets, <= 1 s on 2 cores).

    python bench/latency_over_ideal.py [--checkpoint RUN/best.pt] [--threads 2] [--repeats 21]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from _common import load_model, median, request, timeit
from flownp.core.config import ModelConfig
from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig


@torch.no_grad()
def measure(model, n_ctx: int, n_tgt: int, steps: int, repeats: int, device: str) -> dict:
    xc, yc, xt, _ = request(n_ctx, n_tgt, device=device)
    gen = torch.Generator().manual_seed(0)
    solver = SolverConfig("euler", steps)
    lat = timeit(lambda: sample(model, xc, yc, xt, solver=solver, generator=gen), repeats, 2, device)
    enc = median(timeit(lambda: model.encode_context(xc, yc), repeats, 2, device))
    ctx = model.encode_context(xc, yc)
    y = torch.randn(1, n_tgt, model.config.y_dim, device=device)
    vel = median(timeit(lambda: model.velocity(ctx, xt, y, 0.5), repeats, 2, device))
    ideal = enc + steps * vel
    p50 = statistics.median(lat)
    return {"n_ctx": n_ctx, "n_tgt": n_tgt, "p50_s": p50, "p90_s": sorted(lat)[int(0.9 * (len(lat) - 1))],
            "encode_s": enc, "velocity_s": vel, "ideal_s": ideal, "latency_over_ideal": p50 / ideal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="a trained model (default: untrained default size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    models = {"default (cached, joint)": load_model(a.checkpoint, ModelConfig(), a.device)}
    if not a.checkpoint:
        models["default (cached, independent)"] = load_model(None, ModelConfig(targets="independent"), a.device)
        models["reference (docs/protocol.md §7)"] = load_model(None, ModelConfig.reference(), a.device)
    res = {name: [measure(m, 1000, nt, a.steps, a.repeats, a.device) for nt in (245, 1000)]
           for name, m in models.items()}
    print(json.dumps({"device": a.device, "threads": a.threads, "steps": a.steps, "results": res}, indent=2))
    for name, rows in res.items():
        for r in rows:
            print(f"{name:>30} 1000/{r['n_tgt']:<4}: p50 {r['p50_s']:.3f} s, ideal {r['ideal_s']:.3f} s "
                  f"(encode {r['encode_s']:.3f} + {a.steps} x {r['velocity_s']:.4f}), "
                  f"ratio {r['latency_over_ideal']:.2f}")


if __name__ == "__main__":
    main()
