"""ODE solvers over tuple states: own fixed-step Euler, midpoint and RK4, and torchdiffeq for adaptive
(dopri5, ...) and adjoint solves. Every solve reports its number of function evaluations (NFE).

A field is `f(t: float tensor (), state: tuple[Tensor, ...]) -> tuple[Tensor, ...]`. t1 < t0 integrates
backwards (used by the likelihood: data at t = 1 to noise at t = 0). An `AugmentedField` (a field whose
value depends on state[0] only, the rest being accumulators such as a log-density) lets the own midpoint
method skip the accumulators' derivative at its first stage, which that method never uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

State = tuple[torch.Tensor, ...]
Field = Callable[[torch.Tensor, State], State]

FIXED = ("euler", "midpoint", "rk4")
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}  # field evaluations per step of the fixed-step methods


@dataclass(frozen=True)
class SolverConfig:
    """method: one of FIXED (uses `steps`) or ADAPTIVE (uses rtol/atol); adjoint: torchdiffeq's adjoint
    for memory-light gradients (adaptive or fixed methods through torchdiffeq)."""

    method: str = "euler"
    steps: int = 16
    rtol: float = 1e-5
    atol: float = 1e-5
    adjoint: bool = False

    def __post_init__(self) -> None:
        if self.method not in FIXED + ADAPTIVE:
            raise ValueError(f"unknown solver {self.method!r}; choose from {FIXED + ADAPTIVE}")
        if self.method in FIXED and self.steps < 1:
            raise ValueError("steps must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def nfe(self) -> int | None:
        """Field evaluations of one solve (fixed-step methods; None for adaptive ones: known only after)."""
        return NFE_PER_STEP[self.method] * self.steps if self.method in FIXED else None

    def describe(self) -> str:
        if self.method in FIXED:
            return f"{self.method}, {self.steps} steps"
        return f"{self.method}, rtol={self.rtol:g}, atol={self.atol:g}"


@dataclass
class Solution:
    state: State
    nfe: int


class AugmentedField:
    """A field whose value depends on state[0] only; state[1:] are accumulators (the log-density of a
    likelihood solve). `f(t, state)` gives every derivative; `primal(t, state)` state[0]'s alone with zeros
    for the accumulators, for the stages whose accumulator derivatives a method does not use (the
    midpoint method's first: it only places the midpoint, and the field ignores accumulators)."""

    def __init__(self, f: Field, primal: Field) -> None:
        self.f, self.primal = f, primal

    def __call__(self, t: torch.Tensor, y: State) -> State:
        return self.f(t, y)


def _axpy(a: State, h: float | torch.Tensor, b: State) -> State:
    return tuple(x + h * y for x, y in zip(a, b))


def _fixed(f: Field, y: State, t0: float, t1: float, steps: int, method: str) -> Solution:
    h = (t1 - t0) / steps
    nfe = 0
    ref = y[0]
    for i in range(steps):
        t = torch.tensor(t0 + i * h, dtype=ref.dtype, device=ref.device)
        if method == "euler":
            y = _axpy(y, h, f(t, y))
            nfe += 1
        elif method == "midpoint":
            k1 = f.primal(t, y) if isinstance(f, AugmentedField) else f(t, y)
            y = _axpy(y, h, f(t + h / 2, _axpy(y, h / 2, k1)))
            nfe += 2
        else:  # rk4
            k1 = f(t, y)
            k2 = f(t + h / 2, _axpy(y, h / 2, k1))
            k3 = f(t + h / 2, _axpy(y, h / 2, k2))
            k4 = f(t + h, _axpy(y, h, k3))
            y = tuple(a + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4) for a, b1, b2, b3, b4 in zip(y, k1, k2, k3, k4))
            nfe += 4
    return Solution(y, nfe)


class _Counted(nn.Module):
    def __init__(self, f: Field, params: tuple[nn.Parameter, ...] = ()) -> None:
        super().__init__()
        self.f, self.nfe = f, 0
        self._params = nn.ParameterList(params)  # so the adjoint differentiates them

    def forward(self, t: torch.Tensor, y: State) -> State:
        self.nfe += 1
        return self.f(t, y)


def solve(f: Field, y0: State, t0: float, t1: float, cfg: SolverConfig,
          params: tuple[nn.Parameter, ...] = ()) -> Solution:
    """Integrate dy/dt = f(t, y) from t0 to t1. `params`: what the adjoint differentiates."""
    if cfg.method in FIXED and not cfg.adjoint:
        return _fixed(f, y0, t0, t1, cfg.steps, cfg.method)
    import torchdiffeq

    g = _Counted(f, params)
    ts = torch.tensor([t0, t1], dtype=y0[0].dtype, device=y0[0].device)
    kw: dict[str, Any] = {"method": cfg.method}
    if cfg.method in FIXED:
        kw["options"] = {"step_size": abs(t1 - t0) / cfg.steps}
    else:
        kw.update(rtol=cfg.rtol, atol=cfg.atol)
    if cfg.adjoint:
        out = torchdiffeq.odeint_adjoint(g, y0, ts, adjoint_params=tuple(params), **kw)
    else:
        out = torchdiffeq.odeint(g, y0, ts, **kw)
    return Solution(tuple(o[-1] for o in out), g.nfe)
