"""Local Flow Matching (Xu, Cheng, Xie) for FlowNP, and one-step distillation of a flow (their Algorithm A.1).

**LFM.** N conditional sub-flows ("blocks"), each a FlowNP velocity field of its own that sees the context.
Block n (1..N) carries p_{n-1} to its Ornstein-Uhlenbeck evolution over a time gamma_n = c rho^(n-1):
x_r = a_n x_l + sqrt(1 - a_n^2) z, a_n = exp(-gamma_n), z ~ N(0, I), where x_l ~ p_{n-1} is the push-forward
of the training targets through the trained blocks 1..n-1 (p_0 = the targets), all in the model's flow
space (after the per-task transform: standardisation, GP whitening). Within a block FlowNP's convention
holds: t = 1 at the data side (x_l), t = 0 at the noise side (x_r), the linear path y_t = t x_l + (1 - t) x_r
with target velocity x_l - x_r (with velocity="residual", in the frame of `flownp.core.paths.scaled_frame`
with a = a_n, where the N(0, I) path stands still). Generation runs blocks N..1 (each t: 0 -> 1) from
N(0, I); the exact log-likelihood is log N(y_N; 0, I) plus every block's divergence integral.

Parameters are separate per block: blocks are trained in sequence on the push-forward of the trained ones,
so a block's training must not move the blocks before it (with shared weights it would, and p_{n-1} would
no longer be what the earlier blocks compute). The price: N context encodings per solve instead of one.

**Distillation.** A one-step map G(y) = y + h * net(context, y, t_in) per group of k teacher blocks (an LFM
teacher, N' = N / k maps) or per group of k of N equal time segments of a global FlowNP (N' = N / k),
trained by regression on teacher pairs: the teacher's generation trajectory from N(0, I) at the group
boundaries. Each net starts as a copy of the teacher's (its first step), so an untrained map is the
teacher's one-step Euler. A distilled sampler has no density: `exact_density` is False and its
log-likelihoods are its teacher's, labelled so (`LikelihoodResult.density`).

**Stopping.** Every solve here (the blocks', the maps', the teacher's scoring) takes an optional `check`
callable, called before every context encoding and velocity evaluation (`checked`): a caller's deadline or
cancel (the service's `Job`) raises from it, so a request stops within one evaluation of one block.

Shapes: xc (B, n_ctx, 2), yc (B, n_ctx, D) as the flow sees them, xt (B, n_tgt, 2), states (B, S, n_tgt, D)
(S samples per task) in the flow space; log-likelihoods in nats over that space.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from flownp.core.config import ModelConfig
from flownp.core.likelihood import (LikelihoodResult, check_estimator, divergence_integral, draw_probes,
                                    flow_field, flow_log_likelihood, resolve_estimator, result_from_integral,
                                    standard_normal_log_density)
from flownp.core.model import FlowNP
from flownp.core.paths import flow_matching_loss, sample_path, scaled_frame
from flownp.core.sampling import Check, CheckedFlow, flow_samples
from flownp.core.solvers import SolverConfig


class _Plain:
    """to_dict / from_dict (unknown keys refused) for a dataclass of plain fields (the core cannot use
    ingest.configs.DictConfig)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        unknown = set(d) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class LFMConfig(_Plain):
    """n_blocks: N; gamma_c, gamma_rho: the OU step schedule gamma_n = c rho^(n-1) (OU time units: the
    process dX = -X dt + sqrt(2) dW); push_method, push_steps: the fixed-step solver that pushes training
    targets through the trained blocks (what "p_{n-1}" means for block n)."""

    n_blocks: int = 4
    gamma_c: float = 0.25
    gamma_rho: float = 2.0
    push_method: str = "midpoint"
    push_steps: int = 4

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError("n_blocks must be >= 1")
        if not (self.gamma_c > 0 and self.gamma_rho > 0):
            raise ValueError("gamma_c and gamma_rho must be > 0")
        SolverConfig(self.push_method, self.push_steps)  # refuse a bad solver now
        if self.push_method not in ("euler", "midpoint", "rk4"):
            raise ValueError("push_method must be a fixed-step solver: euler, midpoint or rk4")

    def gammas(self) -> tuple[float, ...]:
        """(gamma_1, ..., gamma_N)."""
        return tuple(self.gamma_c * self.gamma_rho**n for n in range(self.n_blocks))

    def ou_factor(self, n: int) -> float:
        """a_n = exp(-gamma_n) of block n (0-based): x_r = a x_l + sqrt(1 - a^2) z."""
        return math.exp(-self.gammas()[n])

    def total_time(self) -> float:
        """sum gamma_n: p_N is N(0, I) up to a factor exp(-total) on the data's mean and excess spread."""
        return sum(self.gammas())

    def push_solver(self) -> SolverConfig:
        return SolverConfig(self.push_method, self.push_steps)


def checked(flow: Any, check: Check | None) -> Any:
    """`flow` with `check()` called at each of its evaluations (the flow itself when check is None)."""
    return flow if check is None else CheckedFlow(flow, check)


def _state4(y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(B, n, D) -> (B, 1, n, D) and a flag to undo it; (B, S, n, D) passes."""
    return (y[:, None], True) if y.dim() == 3 else (y, False)


class LFM(nn.Module):
    """N FlowNP blocks composed as Local Flow Matching. `blocks` replaces the FlowNP blocks by any modules
    with FlowNP's `encode_context` / `velocity` (tests use closed-form fields)."""

    exact_density = True
    kind = "lfm"

    def __init__(self, config: ModelConfig, lfm: LFMConfig, blocks: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.config, self.lfm_config = config, lfm
        self.blocks = nn.ModuleList(blocks if blocks is not None else [FlowNP(config) for _ in range(lfm.n_blocks)])
        if len(self.blocks) != lfm.n_blocks:
            raise ValueError(f"{len(self.blocks)} blocks for n_blocks={lfm.n_blocks}")

    @property
    def joint(self) -> bool:
        return self.config.targets == "joint"

    @property
    def has_task_transform(self) -> bool:
        return bool(getattr(self.blocks[0], "has_task_transform", False))

    def task_transform(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor) -> Any:
        """The per-task transform every block shares (flownp.core.gp_base); None without one."""
        fn = getattr(self.blocks[0], "task_transform", None)
        return fn(xc, yc, xt) if fn is not None else None

    @torch.no_grad()
    def encode(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, y: torch.Tensor,
               solver: SolverConfig, upto: int | None = None, check: Check | None = None) -> torch.Tensor:
        """Data -> noise: y (B, n, D) or (B, S, n, D) pushed through blocks 1..upto (all by default), each
        integrated t: 1 -> 0. Same shape as y."""
        s, flat = _state4(y)
        for block in self.blocks[:upto]:
            s, _ = flow_samples(checked(block, check), xc, yc, xt, s, solver, 1.0, 0.0)
        return s[:, 0] if flat else s

    def flow_samples(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, y0: torch.Tensor,
                     solver: SolverConfig, check: Check | None = None) -> tuple[torch.Tensor, int]:
        """Noise -> data: y0 (B, S, n, D) through blocks N..1 (each t: 0 -> 1, `solver` per block):
        -> (state, nfe = the blocks' together)."""
        y, nfe = y0, 0
        for block in reversed(self.blocks):
            y, k = flow_samples(checked(block, check), xc, yc, xt, y, solver, 0.0, 1.0)
            nfe += k
        return y, nfe

    def flow_log_likelihood(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, *,
                            solver: SolverConfig = SolverConfig("midpoint", 100), estimator: str = "auto",
                            n_probes: int = 1, probe: str = "rademacher", seed: int = 0,
                            create_graph: bool = False, check: Check | None = None) -> LikelihoodResult:
        """Exact change of variables through every block: log N(y_N; 0, I) + sum_n -int div v_n dt, with
        `solver` per block; Hutchinson probes are drawn per block (seeded from `seed` and the block)."""
        estimator = resolve_estimator(not self.joint, estimator)
        check_estimator(estimator, n_probes)
        y, total, nfe = yt, None, 0
        for i, block in enumerate(self.blocks):
            probes = None
            if estimator == "hutchinson":
                s = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
                probes = draw_probes(yt.shape, n_probes, probe, s, yt)
            vf, known = flow_field(checked(block, check), xc, yc, xt, create_graph)
            y, a, k = divergence_integral(vf, y, solver=solver, estimator=estimator, probes=probes,
                                          create_graph=create_graph, known=known)
            total, nfe = (a if total is None else total + a), nfe + k
        return result_from_integral(standard_normal_log_density(y), total, estimator=estimator, probe=probe,
                                    solver=f"{solver.describe()} per block, {len(self.blocks)} blocks", nfe=nfe,
                                    n_targets=yt.shape[1])


def ou_step(x_l: torch.Tensor, a: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The OU evolution of x_l over gamma = -log a: a x_l + sqrt(1 - a^2) z, z ~ N(0, I) (drawn on the
    generator's device, CPU by default, and moved)."""
    gdev = generator.device if generator is not None else x_l.device
    z = torch.randn(x_l.shape, generator=generator, device=gdev, dtype=x_l.dtype).to(x_l.device)
    return a * x_l + math.sqrt(1 - a * a) * z


def block_loss(lfm: LFM, n: int, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator | None = None, bf16: bool = False) -> torch.Tensor:
    """Flow-matching loss of block n (0-based) on flow-space targets y (B, n_tgt, D): the path between
    x_l = y pushed through blocks 0..n-1 (no gradient; `LFMConfig.push_solver`) and its OU step x_r."""
    c = lfm.lfm_config
    x_l = lfm.encode(xc, yc, xt, y, c.push_solver(), upto=n) if n else y
    a = c.ou_factor(n)
    path = sample_path(x_l, generator=generator, y0=ou_step(x_l, a, generator))
    if lfm.config.velocity == "residual":
        path = scaled_frame(path, a)
    with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=bf16):
        v = lfm.blocks[n](xc, yc, xt, path.yt, path.t)
    return flow_matching_loss(v.float(), path)


# ---- distillation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistillConfig(_Plain):
    """group: k teacher blocks (LFM) or time segments (global flow) per one-step map; segments: N, the
    global flow's equal time segments (an LFM teacher's N is its n_blocks); teacher_method, teacher_steps:
    the teacher's solver per block or segment when it makes the training pairs."""

    group: int = 1
    segments: int = 4
    teacher_method: str = "midpoint"
    teacher_steps: int = 8

    def __post_init__(self) -> None:
        if self.group < 1 or self.segments < 1:
            raise ValueError("group and segments must be >= 1")
        SolverConfig(self.teacher_method, self.teacher_steps)

    def teacher_solver(self) -> SolverConfig:
        return SolverConfig(self.teacher_method, self.teacher_steps)


def teacher_steps_of(teacher: nn.Module, cfg: DistillConfig) -> int:
    """N: the teacher's blocks (LFM) or the global flow's segments."""
    return teacher.lfm_config.n_blocks if isinstance(teacher, LFM) else cfg.segments


def map_times(teacher: nn.Module, cfg: DistillConfig) -> list[tuple[float, float]]:
    """(t_in, h) of each one-step map in generation order: G(y) = y + h * net(y, t_in). An LFM group starts
    at its noise-side block's t = 0 with h = 1; a global-flow group j covers t in [j k / N, (j + 1) k / N]."""
    n = teacher_steps_of(teacher, cfg)
    if n % cfg.group:
        raise ValueError(f"group {cfg.group} does not divide the teacher's {n} blocks/segments")
    m = n // cfg.group
    if isinstance(teacher, LFM):
        return [(0.0, 1.0)] * m
    return [(j * cfg.group / n, cfg.group / n) for j in range(m)]


@torch.no_grad()
def teacher_trajectory(teacher: nn.Module, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor,
                       z: torch.Tensor, cfg: DistillConfig) -> list[torch.Tensor]:
    """The teacher's generation from z (B, S, n, D) at its N + 1 block / segment boundaries, noise first
    (each (B, S, n, D))."""
    solver, out = cfg.teacher_solver(), [z]
    if isinstance(teacher, LFM):
        for block in reversed(teacher.blocks):
            out.append(flow_samples(block, xc, yc, xt, out[-1], solver, 0.0, 1.0)[0])
        return out
    n = cfg.segments
    for j in range(n):
        out.append(flow_samples(teacher, xc, yc, xt, out[-1], solver, j / n, (j + 1) / n)[0])
    return out


class DistilledSampler(nn.Module):
    """N' one-step maps distilled from a teacher (an LFM or a global FlowNP), which it keeps to score:
    sampling costs N' network evaluations; `exact_density` is False and `flow_log_likelihood` is the
    teacher's (LikelihoodResult.density says so)."""

    exact_density = False
    kind = "distilled"

    def __init__(self, teacher: nn.Module, cfg: DistillConfig, maps: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.distill_config = cfg
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.times = map_times(teacher, cfg)
        src = list(reversed(teacher.blocks)) if isinstance(teacher, LFM) else None
        # map j starts as a copy of the teacher's net at its group's first generation step
        self.maps = nn.ModuleList(maps if maps is not None else
                                  [copy.deepcopy(src[j * cfg.group] if src is not None else teacher)
                                   for j in range(len(self.times))])
        if len(self.maps) != len(self.times):
            raise ValueError(f"{len(self.maps)} maps for {len(self.times)} groups")
        for p in self.maps.parameters():
            p.requires_grad_(True)

    @property
    def config(self) -> ModelConfig:
        return self.teacher.config

    @property
    def teacher_kind(self) -> str:
        return "lfm" if isinstance(self.teacher, LFM) else "flownp"

    @property
    def has_task_transform(self) -> bool:
        return bool(getattr(self.teacher, "has_task_transform", False))

    def task_transform(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor) -> Any:
        fn = getattr(self.teacher, "task_transform", None)
        return fn(xc, yc, xt) if fn is not None else None

    def apply_map(self, j: int, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor,
                  y: torch.Tensor, check: Check | None = None) -> torch.Tensor:
        """Map j on y (B, S, n, D): y + h * net_j(context, y, t_in)."""
        b, s, n, d = y.shape
        net, (t_in, h) = checked(self.maps[j], check), self.times[j]
        ctx = net.encode_context(xc, yc).repeat(s)
        flat = y.reshape(b * s, n, d)
        return (flat + h * net.velocity(ctx, xt.repeat_interleave(s, dim=0), flat, t_in)).reshape(b, s, n, d)

    def flow_samples(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, y0: torch.Tensor,
                     solver: SolverConfig | None = None, check: Check | None = None) -> tuple[torch.Tensor, int]:
        """Noise -> data through the N' maps (`solver` is ignored: each map is one evaluation)."""
        y = y0
        for j in range(len(self.maps)):
            y = self.apply_map(j, xc, yc, xt, y, check)
        return y, len(self.maps)

    def flow_log_likelihood(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                            check: Check | None = None, **kw: Any) -> LikelihoodResult:
        """The TEACHER's log-likelihood (the maps define no density), labelled `density` = teacher's."""
        fn = getattr(self.teacher, "flow_log_likelihood", None)  # a teacher of several flows (an LFM) runs its own
        res = (fn(xc, yc, xt, yt, check=check, **kw) if fn is not None
               else flow_log_likelihood(checked(self.teacher, check), xc, yc, xt, yt, **kw))
        return LikelihoodResult(res.joint, res.per_point, res.spread, res.estimator, res.n_probes, res.solver,
                                res.nfe, res.n_targets,
                                density=f"teacher's ({self.teacher_kind}): a distilled sampler has no density")


def distill_loss(student: DistilledSampler, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor,
                 generator: torch.Generator | None = None, n_samples: int = 1) -> torch.Tensor:
    """Mean over maps of the MSE between each map's output on the teacher's state at its group's start and
    the teacher's state at its end (teacher pairs from z ~ N(0, I), (B, n_samples, n_tgt, D))."""
    b, n = xt.shape[:2]
    gdev = generator.device if generator is not None else xt.device
    z = torch.randn((b, n_samples, n, student.config.y_dim), generator=generator, device=gdev,
                    dtype=xt.dtype).to(xt.device)
    traj = teacher_trajectory(student.teacher, xc, yc, xt, z, student.distill_config)
    k = student.distill_config.group
    losses = [(student.apply_map(j, xc, yc, xt, traj[j * k]) - traj[(j + 1) * k]).pow(2).mean()
              for j in range(len(student.maps))]
    return torch.stack(losses).mean()


# ---- rebuilding from plain dicts (checkpoints) ------------------------------------------------------
def build_from_config(model_config: dict[str, Any], lfm_config: dict[str, Any] | None = None,
                distill: dict[str, Any] | None = None) -> nn.Module:
    """The module a checkpoint describes: an LFM (`lfm_config`), a DistilledSampler (`distill`: its
    `config` and its teacher's `lfm_config` or None for a global FlowNP teacher), or a FlowNP."""
    mc = ModelConfig.from_dict(model_config)
    if distill is not None:
        teacher = build_from_config(model_config, distill.get("teacher_lfm_config"))
        return DistilledSampler(teacher, DistillConfig.from_dict(distill["config"]))
    if lfm_config is not None:
        return LFM(mc, LFMConfig.from_dict(lfm_config))
    return FlowNP(mc)


def describe(model: nn.Module) -> dict[str, Any]:
    """What a model offers: its kind, whether its log-likelihood is its own exact density, its NFE rule."""
    if isinstance(model, DistilledSampler):
        return {"kind": "distilled", "teacher": model.teacher_kind, "exact_density": False, "maps": len(model.maps),
                "group": model.distill_config.group, "sample_nfe": len(model.maps),
                "log_likelihood": "the teacher's (the distilled maps define no density)"}
    if isinstance(model, LFM):
        return {"kind": "lfm", "exact_density": True, "blocks": model.lfm_config.n_blocks,
                "gammas": list(model.lfm_config.gammas()), "sample_nfe": "blocks x the per-block solver's"}
    return {"kind": "flownp", "exact_density": True, "sample_nfe": "the solver's"}
