"""Pretrains the embedded default model's recipe (docs/results.md §5.8): a pointwise FlowNP (last block sees
the value) on a per-task GP base, trained by flow matching with 4 path draws per target on the broad synthetic
weather prior, with SiLU MLPs (a ReLU velocity head died in the first default's run: docs/results.md §5.5).
Run under torchrun for 2 CPU ranks:

    torchrun --standalone --nproc-per-node=2 scripts/train_default.py --data STORE --out RUN --max-minutes 55
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from flownp.core.config import ModelConfig
from flownp.jobs.train import TrainConfig, pretrain

MODEL = ModelConfig(arch="pointwise", targets="independent", d_model=64, n_heads=4, n_layers=4, d_ff=128, standardise="context",
                    base="gp", whitening="symmetric", gp_kernels="matern32,matern52", gp_fit_points=256,
                    velocity="residual", activation="silu")


def recipe(arch: str = MODEL.arch, activation: str = MODEL.activation, head_layers: int | None = None,
           value_layers: int | None = None) -> ModelConfig:
    """The default recipe's ModelConfig for an architecture; unset head/value layers take that
    architecture's defaults (pointwise: a 4-layer head, the last block seeing the value)."""
    head = head_layers if head_layers is not None else (4 if arch == "pointwise" else MODEL.head_layers)
    value = value_layers if value_layers is not None else (1 if arch == "pointwise" else 0)
    return dataclasses.replace(MODEL, activation=activation, arch=arch, head_layers=head, value_layers=value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=4, help="tasks per rank and step")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--activation", choices=("silu", "relu"), default=MODEL.activation,
                   help="MLP activation; relu reproduces the recipe before the dead-head finding (docs/results.md §5.5)")
    p.add_argument("--arch", choices=("cached", "pointwise"), default=MODEL.arch,
                   help="pointwise (the shipped default): the transformer once per solve (docs/protocol.md §7.1); "
                        "cached: the default before (docs/results.md §5.5.2)")
    p.add_argument("--head-layers", type=int, default=None, help="linear layers of the head MLP (pointwise: 4)")
    p.add_argument("--value-layers", type=int, default=None, help="pointwise: last blocks that see the value (1)")
    p.add_argument("--path-draws", type=int, default=None,
                   help="flow-matching draws per target and step (pointwise: 4; cached: 1, the default before)")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    draws = a.path_draws if a.path_draws is not None else (4 if a.arch == "pointwise" else 1)
    cfg = TrainConfig(steps=a.steps, lr=1e-3, warmup=50, batch_size=a.batch_size, n_ctx_min=50, n_ctx_max=1000,
                      n_tgt=128, ema_decay=0.995, ckpt_every=50, log_every=10, val_batches=4, seed=0,
                      path_draws=draws)
    model = recipe(a.arch, a.activation, a.head_layers, a.value_layers)
    print(pretrain(a.data, a.out, model, cfg, resume=a.resume, progress=False, max_minutes=a.max_minutes))


if __name__ == "__main__":
    main()
