"""Sampling: the deterministic ODE from noise (t = 0) to data (t = 1), the same ODE as the likelihood.
Values are produced only at the target locations; the context is encoded once and reused at every step
and for every sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flownp.core.solvers import SolverConfig, solve


@dataclass
class SampleResult:
    samples: torch.Tensor  # (B, S, n_tgt, D) normalised
    nfe: int


def task_transform(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor) -> Any:
    """The model's per-task transform (flownp.core.gp_base.TaskTransform), or None for a model without one
    (the reference protocol, neural baselines)."""
    fn = getattr(model, "task_transform", None)
    return fn(xc, yc, xt) if fn is not None else None


@torch.no_grad()
def sample(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, *, n_samples: int = 1,
           solver: SolverConfig = SolverConfig("euler", 16), generator: torch.Generator | None = None,
           y0: torch.Tensor | None = None, transform: Any = None) -> SampleResult:
    """Draw n_samples target sets per task. y0 (B, S, n_tgt, D) optionally fixes the noise. A model with a
    per-task transform flows in its space (standardised context, whitened targets) and maps back;
    `transform` passes one already computed for these tasks (`model.task_transform(xc, yc, xt)`)."""
    b, n = xt.shape[:2]
    d = model.config.y_dim
    tr = transform if transform is not None else task_transform(model, xc, yc, xt)
    ctx = model.encode_context(xc, tr.context(yc) if tr is not None else yc).repeat(n_samples)
    xs = xt.repeat_interleave(n_samples, dim=0)
    if y0 is None:
        y0 = torch.randn((b, n_samples, n, d), generator=generator, dtype=xt.dtype).to(xt.device)
    sol = solve(lambda t, s: (model.velocity(ctx, xs, s[0], t),), (y0.reshape(b * n_samples, n, d),),
                0.0, 1.0, solver)
    out = sol.state[0].reshape(b, n_samples, n, d)
    return SampleResult(tr.inverse(out) if tr is not None else out, sol.nfe)
