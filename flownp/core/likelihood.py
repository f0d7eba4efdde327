"""log p(targets | context) by the instantaneous change of variables, integrated from data (t = 1) to
noise (t = 0): log p1(y1) = log N(y0; 0, I) - int_0^1 div v(t, y_t) dt.

Divergence: "exact-blocks" (exact when every target's flow depends only on itself and the context, i.e.
targets="independent": the trace of each target's y_dim x y_dim Jacobian block, from forward tangents
where the model offers them (`FlowNP.velocity_jacobian`, arch='pointwise'), else y_dim VJPs with one-hot
cotangents), "exact-full" (one VJP per target element; exact for any model, for small sets), or
"hutchinson" (n Rademacher or Gaussian probes, seeded and held fixed along the path; the spread over probes
is reported).
Units: nats in normalised model space; `physical` subtracts n_tgt * sum(log std).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from flownp.core.sampling import expand_samples, task_transform
from flownp.core.solvers import FIXED, AugmentedField, SolverConfig, solve

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
JacobianFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Velocity:
    """vf(t, y) -> v (B, n, D), and where the model gives them, `jacobian(t, y)` -> (v, each target's
    Jacobian block (B, n, D, D)) for targets that are independent given the context."""

    def __init__(self, fn: VelocityFn, jacobian: JacobianFn | None = None) -> None:
        self.fn, self.jacobian = fn, jacobian

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(t, y)


ESTIMATORS = ("exact-blocks", "exact-full", "hutchinson")


@dataclass
class LikelihoodResult:
    """joint (B,) nats of each task's whole target set; per_point = joint / n_targets (the protocol's
    tar_ll: nats per target point, all variables summed, normalised units); spread (B,) std of the joint
    estimate over probes (None for exact traces)."""

    joint: torch.Tensor
    per_point: torch.Tensor
    spread: torch.Tensor | None
    estimator: str
    n_probes: int
    solver: str
    nfe: int
    n_targets: int
    density: str = "exact flow"  # or "teacher's": a distilled sampler has none, its teacher scores (lfm.py)

    def physical_per_point(self, log_std_sum: float) -> torch.Tensor:
        """Nats per target point in physical units (kPa, degC, m/s)."""
        return self.per_point - log_std_sum

    def describe(self) -> dict[str, Any]:
        return {"kind": "joint over targets", "units": "nats, normalised", "estimator": self.estimator,
                "n_probes": self.n_probes, "solver": self.solver, "nfe": self.nfe, "density": self.density}


def draw_probes(shape: torch.Size, n: int, kind: str, seed: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "rademacher":
        e = torch.randint(0, 2, (n, *shape), generator=g).to(like.dtype) * 2 - 1
    elif kind == "gaussian":
        e = torch.randn((n, *shape), generator=g, dtype=like.dtype)
    else:
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {kind!r}")
    return e.to(like.device)


def _divergence(v: torch.Tensor, y: torch.Tensor, estimator: str, probes: torch.Tensor | None,
                create_graph: bool) -> torch.Tensor:
    """(B, P) divergence estimates of v w.r.t. y (both (B, n, D))."""
    grad = lambda u: torch.autograd.grad(v, y, u, retain_graph=True, create_graph=create_graph)[0]  # noqa: E731
    if estimator == "hutchinson":
        return torch.stack([(grad(e) * e).flatten(1).sum(1) for e in probes], dim=1)
    div = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    if estimator == "exact-blocks":
        for j in range(v.shape[-1]):
            u = torch.zeros_like(v)
            u[..., j] = 1
            div = div + grad(u)[..., j].sum(-1)
    else:  # exact-full
        for i in range(v.shape[1]):
            for j in range(v.shape[2]):
                u = torch.zeros_like(v)
                u[:, i, j] = 1
                div = div + grad(u)[:, i, j]
    return div[:, None]


KnownFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def divergence_integral(vf: VelocityFn, y1: torch.Tensor, *, solver: SolverConfig, estimator: str,
                        probes: torch.Tensor | None = None, create_graph: bool = False,
                        known: KnownFn | None = None,
                        span: tuple[float, float] = (1.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Integrate dy/dt = vf(t, y) (+ `known`) from y1 (B, n, D) at t = 1 to t = 0 with the divergence:
    -> (y0 (B, n, D), a (B, P) = -int_0^1 div v dt per probe (P = 1 for exact traces), nfe). One flow's
    change of variables: log p1(y1) = log p0(y0) + a. span=(0, 1) runs it forwards from a noise state
    instead: -> (y1, a = +int_0^1 div v dt, nfe), and log p1(y1) = log p0(y0) - a."""

    jacobian = getattr(vf, "jacobian", None) if estimator == "exact-blocks" and not create_graph else None

    def field(t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        y = state[0]
        if jacobian is not None and known is None:  # forward tangents: no graph, no backward passes
            with torch.no_grad():
                v, jac = jacobian(t, y)
            return v, jac.diagonal(dim1=-2, dim2=-1).sum((-2, -1))[:, None]
        with torch.enable_grad():
            y_in = y if (create_graph and y.requires_grad) else y.detach().requires_grad_(True)
            v = vf(t, y_in)
            div = _divergence(v, y_in, estimator, probes, create_graph)
            if known is not None:
                r, div_r = known(t, y_in)
                v, div = v + r, div + div_r[:, None]
        if not create_graph:
            v, div = v.detach(), div.detach()
        return v, div

    def velocity_only(t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The state's derivative alone (the divergence left at zero): for solver stages that do not use it."""
        y = state[0]
        with torch.set_grad_enabled(create_graph):
            v = vf(t, y)
            if known is not None:
                v = v + known(t, y)[0]
        return v, torch.zeros_like(state[1])

    p = probes.shape[0] if estimator == "hutchinson" else 1
    a0 = torch.zeros(y1.shape[0], p, dtype=y1.dtype, device=y1.device)
    # fused attention kernels have no second derivative: differentiating the divergence needs the math one
    with sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext():
        sol = solve(AugmentedField(field, velocity_only), (y1, a0), span[0], span[1], solver)
    y0, a = sol.state
    return y0, a, sol.nfe


def standard_normal_log_density(y: torch.Tensor) -> torch.Tensor:
    """log N(y; 0, I) of each task's whole state y (B, n, D) -> (B,) nats."""
    return -0.5 * y.pow(2).flatten(1).sum(1) - 0.5 * y[0].numel() * math.log(2 * math.pi)


def check_estimator(estimator: str, n_probes: int) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "hutchinson" and n_probes < 1:
        raise ValueError("n_probes must be >= 1")


def result_from_integral(logp0: torch.Tensor, a: torch.Tensor, *, estimator: str, probe: str, solver: str,
                         nfe: int, n_targets: int) -> LikelihoodResult:
    """The LikelihoodResult of log p = logp0 (B,) + a (B, P): the mean over probes, their spread."""
    joint_p = logp0[:, None] + a  # (B, P)
    p = a.shape[1]
    joint = joint_p.mean(1)
    return LikelihoodResult(joint, joint / n_targets, joint_p.std(1) if p > 1 else None,
                            estimator if estimator != "hutchinson" else f"hutchinson-{probe}", p, solver, nfe,
                            n_targets)


def log_likelihood_fn(vf: VelocityFn, y1: torch.Tensor, *, solver: SolverConfig = SolverConfig("midpoint", 100),
                      estimator: str = "hutchinson", n_probes: int = 1, probe: str = "rademacher",
                      seed: int = 0, create_graph: bool = False, known: KnownFn | None = None) -> LikelihoodResult:
    """Log density of y1 (B, n, D) under the flow of `vf(t, y)` (+ `known`) from N(0, I) at t = 0.
    `known(t, y) -> (r (B, n, D), div r (B,))`: a further field whose divergence is known exactly (a GAV
    residual): it moves the state but is kept out of the estimator."""
    check_estimator(estimator, n_probes)
    probes = draw_probes(y1.shape, n_probes, probe, seed, y1) if estimator == "hutchinson" else None
    y0, a, nfe = divergence_integral(vf, y1, solver=solver, estimator=estimator, probes=probes,
                                     create_graph=create_graph, known=known)
    return result_from_integral(standard_normal_log_density(y0), a, estimator=estimator, probe=probe,
                                solver=solver.describe(), nfe=nfe, n_targets=y1.shape[1])


def resolve_estimator(independent: bool, estimator: str) -> str:
    """'auto' | 'exact' | a named estimator -> the divergence estimator used: exact-blocks for independent
    targets; for joint targets exact-full ('exact') or Hutchinson ('auto'); named ones unchanged, except
    that exact-blocks is refused for joint targets (there it drops the cross-target terms of the trace: a
    wrong number, not an estimate)."""
    if estimator == "exact-blocks" and not independent:
        raise ValueError("estimator 'exact-blocks' is exact only for targets='independent'; this model "
                         "generates its targets jointly: use 'exact' (exact-full), 'hutchinson' or 'auto'")
    if estimator not in ("auto", "exact"):
        return estimator
    if independent:
        return "exact-blocks"
    return "exact-full" if estimator == "exact" else "hutchinson"


def log_likelihood(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, *,
                   solver: SolverConfig = SolverConfig("midpoint", 100), estimator: str = "auto",
                   n_probes: int = 1, probe: str = "rademacher", seed: int = 0,
                   create_graph: bool = False, transform: Any = None) -> LikelihoodResult:
    """log p(yt | xt, context) under a FlowNP model (nats, normalised units); all targets share t, the
    context stays at t = 1. estimator "auto"/"exact": exact-blocks for targets="independent", else exact-full
    ("exact") or Hutchinson ("auto"). A model with a per-task transform (flownp.core.gp_base) is scored in
    its space, and the transform's exact log-Jacobian is added: the result is still a density of yt.
    `transform` passes one already computed for these tasks (e.g. `TaskTransform.repeat` to score several
    samples of one task)."""
    tr = transform if transform is not None else task_transform(model, xc, yc, xt)
    # a model made of several flows (Local Flow Matching) or scored by its teacher (a distilled sampler)
    # brings its own flow-space likelihood; a FlowNP is one flow
    flow_ll = getattr(model, "flow_log_likelihood", None) or partial(flow_log_likelihood, model)
    if tr is None:
        return flow_ll(xc, yc, xt, yt, solver=solver, estimator=estimator, n_probes=n_probes, probe=probe, seed=seed,
                       create_graph=create_graph)
    res = flow_ll(xc, tr.context(yc), xt, tr.forward(yt), solver=solver, estimator=estimator, n_probes=n_probes,
                  probe=probe, seed=seed, create_graph=create_graph)
    joint = res.joint + tr.log_jacobian().to(res.joint.dtype)
    return dataclasses.replace(res, joint=joint, per_point=joint / res.n_targets)


def samples_log_likelihood(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, ys: torch.Tensor, *,
                           solver: SolverConfig, estimator: str = "auto", n_probes: int = 1,
                           probe: str = "rademacher", seed: int = 0, transform: Any = None) -> LikelihoodResult:
    """log p of S sample sets ys (B, S, n_tgt, D) of each of the B tasks xc, yc, xt (normalised) -> a
    result over B * S rows (sample index fastest), as `log_likelihood` of each copy. A FlowNP encodes a
    task's context (and, arch='pointwise', its targets' transformer pass) once for its S samples; a model
    with its own flow-space likelihood (LFM, distilled) or a GAV residual scores B * S copies.
    `transform`: the B tasks' per-task transform, if already computed."""
    b, s = ys.shape[:2]
    flat = ys.reshape(b * s, *ys.shape[2:])
    tr = transform if transform is not None else task_transform(model, xc, yc, xt)
    tr_s = None if tr is None else tr.repeat(s)
    if not is_one_flow(model):
        rep = lambda z: z.repeat_interleave(s, dim=0)  # noqa: E731
        return log_likelihood(model, rep(xc), rep(yc), rep(xt), flat, solver=solver, estimator=estimator,
                              n_probes=n_probes, probe=probe, seed=seed, transform=tr_s)
    estimator = resolve_estimator(model.config.targets == "independent", estimator)
    vf, _ = flow_field(model, xc, yc if tr is None else tr.context(yc), xt, samples=s)
    res = log_likelihood_fn(vf, flat if tr_s is None else tr_s.forward(flat), solver=solver, estimator=estimator,
                            n_probes=n_probes, probe=probe, seed=seed)
    if tr_s is None:
        return res
    joint = res.joint + tr_s.log_jacobian().to(res.joint.dtype)
    return dataclasses.replace(res, joint=joint, per_point=joint / res.n_targets)


def is_one_flow(model: Any) -> bool:
    """Whether `model` is one FlowNP flow whose samples share their task's work (`expand_samples`): no GAV
    residual, no flows or maps of its own (LFM, distilled), so its samples can also be scored in the
    solve that draws them (`sample_log_likelihood`)."""
    return (getattr(model, "expand_samples", None) is not None and getattr(model, "gav_config", None) is None
            and getattr(model, "flow_log_likelihood", None) is None and getattr(model, "flow_samples", None) is None)


def sample_log_likelihood(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, y0: torch.Tensor, *,
                          solver: SolverConfig, estimator: str = "auto", n_probes: int = 1,
                          probe: str = "rademacher", seed: int = 0,
                          transform: Any = None) -> tuple[torch.Tensor, LikelihoodResult]:
    """Samples from the noise y0 (B, S, n_tgt, D) of the B tasks xc, yc, xt (normalised) and their log p, from
    ONE solve from t = 0 to 1 of the state and its divergence (the midpoint method evaluates the divergence at
    its second stages only): -> (samples (B, S, n_tgt, D) normalised, a result over B * S rows, sample index
    fastest). The samples are those `flownp.core.sampling.sample` draws from y0 with this solver, to float
    rounding (a pointwise model's state derivative here comes from its tangent pass, not the fused attention
    kernel); log p is the same quantity `samples_log_likelihood` integrates backwards from them, to the solver's
    error. Only for `is_one_flow` models and fixed-step solvers (else ValueError)."""
    if not is_one_flow(model):
        raise ValueError("one-solve sampling with likelihoods needs a single FlowNP flow (no GAV residual, LFM "
                         "or distilled maps): sample, then score with samples_log_likelihood")
    if solver.method not in FIXED or solver.adjoint:
        raise ValueError(f"one-solve sampling with likelihoods needs a fixed-step solver {FIXED} (an adaptive one "
                         f"would control its steps on the log-density too and draw other samples), got {solver.method!r}")
    estimator = resolve_estimator(model.config.targets == "independent", estimator)
    check_estimator(estimator, n_probes)
    b, s, n, d = y0.shape
    tr = transform if transform is not None else task_transform(model, xc, yc, xt)
    vf, _ = flow_field(model, xc, yc if tr is None else tr.context(yc), xt, samples=s)
    flat0 = y0.reshape(b * s, n, d)
    probes = draw_probes(flat0.shape, n_probes, probe, seed, flat0) if estimator == "hutchinson" else None
    with torch.no_grad():
        y1, a, nfe = divergence_integral(vf, flat0, solver=solver, estimator=estimator, probes=probes,
                                         span=(0.0, 1.0))
    res = result_from_integral(standard_normal_log_density(flat0), -a, estimator=estimator, probe=probe,
                               solver=f"{solver.describe()}, in the sampling solve", nfe=nfe, n_targets=n)
    if tr is None:
        return y1.reshape(b, s, n, d), res
    joint = res.joint + tr.repeat(s).log_jacobian().to(res.joint.dtype)
    return tr.inverse(y1.reshape(b, s, n, d)), dataclasses.replace(res, joint=joint, per_point=joint / n)


def flow_log_likelihood(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, *,
                        solver: SolverConfig = SolverConfig("midpoint", 100), estimator: str = "auto",
                        n_probes: int = 1, probe: str = "rademacher", seed: int = 0,
                        create_graph: bool = False) -> LikelihoodResult:
    """log p(yt | xt, context) of the flow alone, on the values it runs on (no per-task transform)."""
    estimator = resolve_estimator(model.config.targets == "independent", estimator)
    vf, known = flow_field(model, xc, yc, xt, create_graph)
    return log_likelihood_fn(vf, yt, solver=solver, estimator=estimator, n_probes=n_probes, probe=probe,
                             seed=seed, create_graph=create_graph, known=known)


def flow_field(model: Any, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor,
               create_graph: bool = False, samples: int = 1) -> tuple[VelocityFn, KnownFn | None]:
    """A FlowNP's (or GAV model's) velocity as the likelihood integrates it, its context encoded once:
    (vf(t, y), the part whose divergence is known exactly or None). samples > 1: y has B * samples rows
    for the B tasks of xc, yc, xt (sample index fastest), whose work is shared (a FlowNP's
    `expand_samples`)."""
    with torch.set_grad_enabled(create_graph):
        ctx = model.encode_context(xc, yc)
        if samples > 1:
            ctx, xt = expand_samples(model, ctx, xt, samples)
    blocks = getattr(model, "has_jacobian_blocks", False)
    vf: VelocityFn = Velocity(lambda t, y: model.velocity(ctx, xt, y, t),  # noqa: E731
                              (lambda t, y: model.velocity_jacobian(ctx, xt, y, t)) if blocks else None)
    known: KnownFn | None = None
    gav = getattr(model, "gav_config", None)
    if gav is not None and gav.kind != "mlp":
        # GAV: the base field's divergence is estimated, the structured residual's is exact (n * tr H)
        vf = lambda t, y: model.base.velocity(ctx.base, xt, y, t)  # noqa: E731
        known = lambda t, y: (model.residual_velocity(ctx, xt, y, t), model.residual_divergence(ctx, y, t))  # noqa: E731
    return vf, known
