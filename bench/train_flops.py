"""Training throughput: counted model FLOPs per second of a flow-matching step over the machine's
measured fp32 matmul peak (goal >= 0.3 on CPU), for the default model at n_ctx = n_tgt = 500, and
tasks/s of our default model vs the reference architecture at about the same parameter count.

    python bench/train_flops.py [--batch 8] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json

import torch

from _common import count_flops, matmul_peak, median, request, timeit
from flownp.core.config import ModelConfig
from flownp.core.model import FlowNP
from flownp.core.paths import flow_matching_loss, sample_path


def step_fn(model: FlowNP, opt: torch.optim.Optimizer, batch, gen: torch.Generator):
    xc, yc, xt, yt = batch

    def step() -> None:
        path = sample_path(yt, generator=gen)
        loss = flow_matching_loss(model(xc, yc, xt, path.yt, path.t), path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=500)
    ap.add_argument("--n-tgt", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    batch = request(a.n_ctx, a.n_tgt, a.batch, device=a.device)
    peak = matmul_peak(a.device)
    rows = {}
    for name, cfg in [("default (cached, joint)", ModelConfig()),
                      ("default (cached, independent)", ModelConfig(targets="independent")),
                      ("reference (docs/protocol.md §7)", ModelConfig.reference())]:
        torch.manual_seed(0)
        model = FlowNP(cfg).to(a.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = step_fn(model, opt, batch, torch.Generator().manual_seed(0))
        flops = count_flops(step)
        t = median(timeit(step, a.repeats, 1, a.device))
        rows[name] = {"params": sum(p.numel() for p in model.parameters()), "step_s": t,
                      "tasks_per_s": a.batch / t, "gflop_per_step": flops / 1e9, "gflop_per_s": flops / t / 1e9,
                      "fraction_of_peak": flops / t / peak}
    ref = rows["reference (docs/protocol.md §7)"]["tasks_per_s"]
    for r in rows.values():
        r["speed_vs_reference"] = r["tasks_per_s"] / ref
    print(json.dumps({"device": a.device, "threads": a.threads, "batch": a.batch, "n_ctx": a.n_ctx,
                      "n_tgt": a.n_tgt, "matmul_peak_gflop_per_s": peak / 1e9, "models": rows}, indent=2))
    for name, r in rows.items():
        print(f"{name:>30}: {r['step_s']:.3f} s/step, {r['gflop_per_s']:.1f} GFLOP/s = "
              f"{r['fraction_of_peak']:.2f} of the measured matmul peak ({peak / 1e9:.0f} GFLOP/s); "
              f"{r['speed_vs_reference']:.2f}x the reference's tasks/s")


if __name__ == "__main__":
    main()
