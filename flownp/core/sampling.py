"""Sampling: the deterministic ODE from noise (t = 0) to data (t = 1), the same ODE as the likelihood.
Values are produced only at the target locations; the context is encoded once and reused at every step
and for every sample."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from flownp.core.solvers import SolverConfig, solve


@dataclass
class SampleResult:
    samples: torch.Tensor  # (B, S, n_tgt, D) normalised
    nfe: int


Check = Callable[[], None]


class CheckedFlow:
    """A flow (a FlowNP, an LFM block, a distilled map or teacher) as the solvers see it, calling `check()`
    before every context encoding and velocity evaluation (a job's deadline or cancellation, raised from
    there); everything else is the flow's own."""

    def __init__(self, flow: Any, check: Check) -> None:
        self._flow, self._check = flow, check

    def encode_context(self, *a: Any, **kw: Any) -> Any:
        self._check()
        return self._flow.encode_context(*a, **kw)

    def velocity(self, *a: Any, **kw: Any) -> Any:
        self._check()
        return self._flow.velocity(*a, **kw)

    def velocity_jacobian(self, *a: Any, **kw: Any) -> Any:
        self._check()
        return self._flow.velocity_jacobian(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._flow, name)


def expand_samples(model: Any, ctx: Any, xt: torch.Tensor, n: int) -> tuple[Any, torch.Tensor]:
    """(context, xt) of B tasks -> those of B * n rows, n samples per task (sample index fastest): the
    model's own `expand_samples` (a FlowNP: the context's and targets' work done once per task), else the
    context's `repeat`."""
    own = getattr(model, "expand_samples", None)
    return own(ctx, xt, n) if own is not None else (ctx.repeat(n), xt.repeat_interleave(n, dim=0))


def task_transform(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor) -> Any:
    """The model's per-task transform (flownp.core.gp_base.TaskTransform), or None for a model without one
    (the reference protocol, neural baselines)."""
    fn = getattr(model, "task_transform", None)
    return fn(xc, yc, xt) if fn is not None else None


def draw_noise(model: Any, xt: torch.Tensor, n_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """The N(0, I) states (B, S, n_tgt, D) that `sample` starts from for these targets xt (B, n_tgt, x_dim)."""
    b, n = xt.shape[:2]
    return torch.randn((b, n_samples, n, model.config.y_dim), generator=generator, dtype=xt.dtype).to(xt.device)


@torch.no_grad()
def sample(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, *, n_samples: int = 1,
           solver: SolverConfig = SolverConfig("euler", 16), generator: torch.Generator | None = None,
           y0: torch.Tensor | None = None, transform: Any = None) -> SampleResult:
    """Draw n_samples target sets per task. y0 (B, S, n_tgt, D) optionally fixes the noise. A model with a
    per-task transform flows in its space (standardised context, whitened targets) and maps back;
    `transform` passes one already computed for these tasks (`model.task_transform(xc, yc, xt)`)."""
    tr = transform if transform is not None else task_transform(model, xc, yc, xt)
    if y0 is None:
        y0 = draw_noise(model, xt, n_samples, generator)
    # a model made of several flows or maps (flownp.core.lfm) runs its own; a FlowNP is one ODE
    run = getattr(model, "flow_samples", None) or partial(flow_samples, model)
    out, nfe = run(xc, tr.context(yc) if tr is not None else yc, xt, y0, solver)
    return SampleResult(tr.inverse(out) if tr is not None else out, nfe)


def flow_samples(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, y0: torch.Tensor,
                 solver: SolverConfig, t0: float = 0.0, t1: float = 1.0) -> tuple[torch.Tensor, int]:
    """One flow's ODE from y0 (B, S, n_tgt, D) at t0 to t1 in its own space (yc as the flow sees it: after
    the per-task transform), the context encoded once for the S samples: -> (state (B, S, n_tgt, D), nfe)."""
    b, s_, n, d = y0.shape
    ctx, xs = expand_samples(model, model.encode_context(xc, yc), xt, s_)
    sol = solve(lambda t, s: (model.velocity(ctx, xs, s[0], t),), (y0.reshape(b * s_, n, d),), t0, t1, solver)
    return sol.state[0].reshape(b, s_, n, d), sol.nfe
