"""Generalized artificial viscosity (GAV, docs/protocol.md §9): a residual added to a pretrained FlowNP field,

    v_total(t, y | C) = v(t, y | C) + r(t, y | C),   r = H(t, C) (y - m(t, x, C)),

with H (D x D, D = y_dim = 4) Hurwitz by construction and shared by every target point (block diagonal
over points, so the model stays permutation-equivariant), and m a per-point centre. Centres:
- `mlp`: m = MLP(t, x, mean-pooled context summary): cannot represent a local conditional mean (one summary
  vector for the whole context; the ablation);
- `local`: m = a small copy of the backbone (same token encoding, a cached transformer of
  `centre_layers` x `centre_width`) whose target tokens attend to the context (and themselves) per point:
  a local conditional mean m(t, x | C). Its target tokens' state input is zero (the tokens carry y = 0), so m
  does not depend on the state y and the residual's Jacobian in y stays exactly H: contracting (or Hurwitz)
  by construction, with divergence tr H per point. Its output layer starts at zero (m = 0).
Kinds:
- `schur`: H = U T U^T, U orthogonal (Cayley transform of a skew matrix), T upper triangular with
  diagonal -(softplus(a) + eps): eigenvalues = diag(T) < 0, so every deviation decays (Hurwitz), but the
  symmetric part may be indefinite (transient growth is possible);
- `contracting`: H = -U D U^T + K (D > 0 diagonal, K skew): the symmetric part -U D U^T is negative
  definite, so the residual field contracts in the Euclidean metric at every instant;
- `mlp`: the paper's ablation, r = MLP(t, x, y, summary) per point, no structure (divergence by autograd).
For a large state, `lowrank_cayley_apply` applies the Cayley factor of a rank-2r skew matrix in O(d r^2)
with the Sherman-Morrison-Woodbury identity. The structured residual's divergence is exact and cheap,
sum over points of tr H (n_tgt tr H for a shared t), and enters the likelihood analytically.

Flow time t: a float, a 0-d tensor, (B,) or (B, 1) (one H per task), or (B, n_tgt) (one H per point).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("schur", "contracting", "mlp")
CENTRES = ("mlp", "local")


@dataclass(frozen=True)
class GAVConfig:
    """kind: schur | contracting | mlp; hidden: width of the small conditioning nets; eps: minimum damping
    rate of H (1 / flow time); init_rate: the damping rate at initialisation, where H = -init_rate I and
    m = 0 (the mlp residual starts at exactly 0), so fine-tuning starts from the pretrained field;
    detach_summary: the context summary carries no gradient into the base's embedding; cayley_rank: None
    (a dense skew S in the Cayley factor) or r, S = P Q^T - Q P^T of rank <= 2r applied through
    Sherman-Morrison-Woodbury (`lowrank_cayley_apply`), the path for states larger than FlowNP's 4 values;
    centre: mlp (on the mean-pooled summary, the ablation) or local (a small backbone copy attending to the
    context per target point: centre_layers layers of width centre_width with centre_heads heads)."""

    kind: str = "schur"
    hidden: int = 64
    eps: float = 1e-4
    init_rate: float = 1e-3
    detach_summary: bool = True
    cayley_rank: int | None = None
    centre: str = "mlp"
    centre_layers: int = 2
    centre_width: int = 32
    centre_heads: int = 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"GAV kind must be one of {KINDS}, got {self.kind!r}")
        if self.centre not in CENTRES:
            raise ValueError(f"GAV centre must be one of {CENTRES}, got {self.centre!r}")
        if self.centre == "local" and self.kind == "mlp":
            raise ValueError("GAV centre 'local' needs a structured residual (schur or contracting); "
                             "the mlp kind has no centre")
        if self.centre_layers < 1 or self.centre_width < 1 or self.centre_heads < 1 \
                or self.centre_width % self.centre_heads:
            raise ValueError("centre_layers, centre_width, centre_heads must be >= 1, the width divisible "
                             "by the heads")
        if not (self.eps > 0 and self.init_rate > 0 and self.hidden > 0):
            raise ValueError("eps, init_rate and hidden must be > 0")
        if self.cayley_rank is not None and self.cayley_rank < 1:
            raise ValueError("cayley_rank must be None or >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GAVConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---- structured matrices ------------------------------------------------------------------------
def skew(a: torch.Tensor) -> torch.Tensor:
    """A - A^T, (..., d, d)."""
    return a - a.transpose(-1, -2)


def cayley(s: torch.Tensor) -> torch.Tensor:
    """Orthogonal U = (I - S)(I + S)^{-1} for skew-symmetric S (..., d, d), det U = +1. (I - S) and
    (I + S)^{-1} commute, so U = (I + S)^{-1}(I - S): one linear solve (I + S is always invertible)."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s)


def orthogonal(s_raw: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """U = cayley(S) (..., d, d) from raw parameters s_raw (..., d, d): S = s_raw - s_raw^T (rank None), or
    S = P Q^T - Q P^T with P, Q the first r and next r columns of s_raw, applied to I by Sherman-Morrison-
    Woodbury (rank r, 2r <= d)."""
    if rank is None:
        return cayley(skew(s_raw))
    d = s_raw.shape[-1]
    if 2 * rank > d:
        raise ValueError(f"cayley_rank {rank} needs 2 x rank <= the state size {d}")
    eye = torch.eye(d, dtype=s_raw.dtype, device=s_raw.device).expand_as(s_raw)
    return lowrank_cayley_apply(s_raw[..., :rank], s_raw[..., rank:2 * rank], eye)


def hurwitz_schur(s_raw: torch.Tensor, t_raw: torch.Tensor, a: torch.Tensor, eps: float,
                  rank: int | None = None) -> torch.Tensor:
    """H = U T U^T: U = orthogonal(s_raw, rank), T = strict upper part of t_raw + diag(-(softplus(a) + eps)).
    s_raw, t_raw (..., d, d), a (..., d) -> (..., d, d) with eigenvalues -(softplus(a) + eps)."""
    u = orthogonal(s_raw, rank)
    t = torch.triu(t_raw, diagonal=1) + torch.diag_embed(-(F.softplus(a) + eps))
    return u @ t @ u.transpose(-1, -2)


def contracting(s_raw: torch.Tensor, d_raw: torch.Tensor, k_raw: torch.Tensor, eps: float,
                rank: int | None = None) -> torch.Tensor:
    """H = -U diag(softplus(d_raw) + eps) U^T + (k_raw - k_raw^T), U = orthogonal(s_raw, rank):
    symmetric part -U D U^T <= -eps I. s_raw, k_raw (..., d, d), d_raw (..., d) -> (..., d, d)."""
    u = orthogonal(s_raw, rank)
    return -(u * (F.softplus(d_raw) + eps).unsqueeze(-2)) @ u.transpose(-1, -2) + skew(k_raw)


def lowrank_cayley_apply(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """U x for U = cayley(S), S = P Q^T - Q P^T (rank <= 2r), without forming S: O(d r^2 + d r m).
    p, q (..., d, r), x (..., d, m) -> (..., d, m). S = W Z^T with W = [P, -Q], Z = [Q, P], and
    (I + W Z^T)^{-1} v = v - W (I_2r + Z^T W)^{-1} Z^T v (Sherman-Morrison-Woodbury)."""
    w, z = torch.cat([p, -q], -1), torch.cat([q, p], -1)
    zt = z.transpose(-1, -2)
    v = x - w @ (zt @ x)  # (I - S) x
    small = torch.eye(w.shape[-1], dtype=x.dtype, device=x.device) + zt @ w  # (..., 2r, 2r)
    return v - w @ torch.linalg.solve(small, zt @ v)


# ---- the residual field -------------------------------------------------------------------------
def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """Two hidden SiLU layers; the output layer starts at zero."""
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, n_out))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def flow_times(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Flow time for targets like (B, n, D): (B, 1) when shared by a task's points, else (B, n)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() > 2:
        raise ValueError(f"flow time must be a scalar, (B,), (B, 1) or (B, n), got shape {tuple(t.shape)}")
    return t if t.dim() == 2 else t.reshape(-1, 1).expand(like.shape[0], 1)


def context_summary(ctx: Any, detach: bool = True) -> torch.Tensor:
    """Permutation-invariant summary of a FlowNP Context: the mean of its embedded context tokens,
    (B, n_ctx, d_model) -> (B, d_model)."""
    s = ctx.tokens.mean(1)
    return s.detach() if detach else s


class LocalCentre(nn.Module):
    """m(t, x | C) (B, n, D): a small copy of the backbone (`FlowNP`, arch cached, targets independent, the
    base's token encoding) whose target tokens carry the state y = 0, so m is a function of (t, x, context)
    only; the output layer starts at zero."""

    def __init__(self, base: Any, cfg: GAVConfig) -> None:
        super().__init__()
        from flownp.core.config import ModelConfig
        from flownp.core.model import FlowNP

        w = cfg.centre_width
        keep = ("encoding", "x_dim", "y_dim", "n_freqs", "space_freqs", "space_max_log2", "time_freqs")
        self.net = FlowNP(ModelConfig(arch="cached", targets="independent", d_model=w, n_heads=cfg.centre_heads,
                                      n_layers=cfg.centre_layers, d_ff=2 * w, embed_hidden=w,
                                      embed_layers=min(base.embed_layers, 2), head_hidden=2 * w,
                                      **{k: getattr(base, k) for k in keep}))
        nn.init.zeros_(self.net.head[-1].weight)
        nn.init.zeros_(self.net.head[-1].bias)

    def encode(self, xc: torch.Tensor, yc: torch.Tensor) -> Any:
        """The centre's own context encoding (B, n_ctx, centre_width tokens and per-layer keys/values)."""
        return self.net.encode_context(xc, yc)

    def forward(self, ctx: Any, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """m (B, n, D) for xt (B, n, x_dim), t (B, 1) or (B, n)."""
        zero = torch.zeros(*xt.shape[:2], self.net.config.y_dim, dtype=xt.dtype, device=xt.device)
        return self.net.velocity(ctx, xt, zero, t.expand(xt.shape[:2]))


class GAVResidual(nn.Module):
    """r(t, x, y | summary) for target sets (B, n, ·), acting on each point separately. summary
    (B, d_model); H depends on (t, summary), m on (t, x, summary) (centre mlp) or on (t, x, context) through
    the local centre's context encoding `centre_ctx`; the mlp kind on (t, x, y, summary). base_config: the
    backbone's ModelConfig (needed by the local centre, which copies its encoding)."""

    def __init__(self, cfg: GAVConfig, d_model: int, x_dim: int = 2, y_dim: int = 4,
                 base_config: Any = None) -> None:
        super().__init__()
        self.cfg, self.y_dim = cfg, y_dim
        dd = y_dim * y_dim
        if cfg.cayley_rank is not None and 2 * cfg.cayley_rank > y_dim:
            raise ValueError(f"cayley_rank {cfg.cayley_rank} needs 2 x rank <= the state size {y_dim}")
        if cfg.kind == "mlp":
            self.net = _mlp(d_model + 1 + x_dim + y_dim, cfg.hidden, y_dim)
            return
        # raw parameters of H: schur (s_raw, t_raw, a), contracting (s_raw, k_raw, d_raw)
        self.h_net = _mlp(d_model + 1, cfg.hidden, 2 * dd + y_dim)
        # softplus(bias) + eps = init_rate: H = -init_rate I at initialisation
        rate = torch.tensor(max(cfg.init_rate - cfg.eps, 1e-8), dtype=torch.float64)
        self.h_bias = nn.Parameter(torch.cat([torch.zeros(2 * dd, dtype=torch.float64),
                                              torch.log(torch.expm1(rate)).expand(y_dim)]).float())
        if cfg.centre == "local":
            if base_config is None:
                raise ValueError("the local GAV centre needs the backbone's ModelConfig (base_config)")
            self.local = LocalCentre(base_config, cfg)
        else:
            self.m_net = _mlp(d_model + 1 + x_dim, cfg.hidden, y_dim)

    @staticmethod
    def _cond(summary: torch.Tensor, t: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
        """[summary, t, more...] per point: summary (B, d), t (B, k), more (B, k, ·) -> (B, k, ·)."""
        return torch.cat([summary[:, None].expand(-1, t.shape[1], -1), t[..., None], *more], -1)

    def matrix(self, summary: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """H (B, k, D, D) for summary (B, d_model) and flow times t (B, k), k = 1 or n. Built in at least
        float32 with autocast off (a linear solve has no bf16 kernel)."""
        d, raw = self.y_dim, self.h_net(self._cond(summary, t))
        with torch.autocast(raw.device.type, enabled=False):
            dt = torch.promote_types(raw.dtype, torch.float32)
            raw = raw.to(dt) + self.h_bias.to(dt)
            m1, m2, diag = raw[..., :d * d].unflatten(-1, (d, d)), \
                raw[..., d * d:2 * d * d].unflatten(-1, (d, d)), raw[..., 2 * d * d:]
            if self.cfg.kind == "schur":
                return hurwitz_schur(m1, m2, diag, self.cfg.eps, self.cfg.cayley_rank)
            return contracting(m1, diag, m2, self.cfg.eps, self.cfg.cayley_rank)

    def centre(self, summary: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
               centre_ctx: Any = None) -> torch.Tensor:
        """m (B, n, D) for xt (B, n, x_dim) and t (B, k); the local centre needs its context encoding
        `centre_ctx` (LocalCentre.encode)."""
        if self.cfg.centre == "local":
            if centre_ctx is None:
                raise ValueError("the local GAV centre needs its context encoding (centre_ctx)")
            return self.local(centre_ctx, xt, t)
        return self.m_net(self._cond(summary, t.expand(xt.shape[:2]), xt))

    def encode_centre(self, xc: torch.Tensor, yc: torch.Tensor) -> Any:
        """The local centre's context encoding (None for the mlp centre)."""
        return self.local.encode(xc, yc) if self.cfg.centre == "local" else None

    def forward(self, summary: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                t: torch.Tensor | float, centre_ctx: Any = None) -> torch.Tensor:
        """r (B, n, D) for summary (B, d_model), xt (B, n, x_dim), yt (B, n, D)."""
        t = flow_times(t, yt)
        if self.cfg.kind == "mlp":
            return self.net(self._cond(summary, t.expand(yt.shape[:2]), xt, yt))
        dev = yt - self.centre(summary, xt, t, centre_ctx)
        h = self.matrix(summary, t)  # (B, k, D, D), broadcast over the n points
        with torch.autocast(yt.device.type, enabled=False):
            return (h @ dev.to(h.dtype).unsqueeze(-1)).squeeze(-1)

    def divergence(self, summary: torch.Tensor, xt: torch.Tensor | None, yt: torch.Tensor, t: torch.Tensor | float,
                   create_graph: bool = False) -> torch.Tensor:
        """Exact div_y r summed over the n target points, (B,). Structured kinds: sum of tr H over the
        points (n tr H for a shared t), no autograd; mlp: D vector-Jacobian products with one-hot
        cotangents (exact, as r acts on each point separately); xt may be None for the structured kinds."""
        t = flow_times(t, yt)
        if self.cfg.kind != "mlp":
            tr = torch.diagonal(self.matrix(summary, t), dim1=-2, dim2=-1).sum(-1)  # (B, k)
            return tr.sum(1) * (yt.shape[1] if t.shape[1] == 1 else 1)
        with torch.enable_grad():
            y = yt if (create_graph and yt.requires_grad) else yt.detach().requires_grad_(True)
            r = self(summary, xt, y, t)
            div = torch.zeros(yt.shape[0], dtype=r.dtype, device=r.device)
            for j in range(self.y_dim):
                u = torch.zeros_like(r)
                u[..., j] = 1
                g = torch.autograd.grad(r, y, u, retain_graph=True, create_graph=create_graph)[0]
                div = div + g[..., j].sum(-1)
        return div if create_graph else div.detach()


# ---- base + residual ----------------------------------------------------------------------------
@dataclass
class GAVContext:
    """The base model's Context, the residual's context summary (B, d_model) and, for the local centre,
    its own context encoding (a Context of the centre's small backbone; None for the mlp centre)."""

    base: Any               # flownp.core.model.Context
    summary: torch.Tensor
    centre: Any = None

    def repeat(self, n: int) -> "GAVContext":
        """The same context for n samples per task: B -> B * n (sample index fastest), as Context.repeat."""
        return GAVContext(self.base.repeat(n), self.summary.repeat_interleave(n, dim=0),
                          None if self.centre is None else self.centre.repeat(n))


class GAVFlowNP(nn.Module):
    """A FlowNP (frozen unless train_base) plus a GAV residual, with FlowNP's interface (config, joint,
    encode_context, velocity, forward), so sampling, likelihoods and evaluation use it unchanged."""

    def __init__(self, base: nn.Module, cfg: GAVConfig | None = None, train_base: bool = False) -> None:
        super().__init__()
        self.base, self.gav_config = base, cfg or GAVConfig()
        self.base.requires_grad_(train_base)
        c = base.config
        self.residual = GAVResidual(self.gav_config, c.d_model, c.x_dim, c.y_dim, base_config=c)

    @property
    def config(self) -> Any:
        """The base model's ModelConfig."""
        return self.base.config

    @property
    def joint(self) -> bool:
        return self.base.joint

    @property
    def has_task_transform(self) -> bool:
        return self.base.has_task_transform

    def task_transform(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor) -> Any:
        """The base model's per-task transform (the residual acts in the same space as the base flow)."""
        return self.base.task_transform(xc, yc, xt)

    def encode_context(self, xc: torch.Tensor, yc: torch.Tensor) -> GAVContext:
        ctx = self.base.encode_context(xc, yc)
        return GAVContext(ctx, context_summary(ctx, self.gav_config.detach_summary),
                          self.residual.encode_centre(xc, yc))

    def residual_velocity(self, ctx: GAVContext, xt: torch.Tensor, yt: torch.Tensor,
                          t: torch.Tensor | float) -> torch.Tensor:
        """r (B, n, D)."""
        return self.residual(ctx.summary, xt, yt, t, ctx.centre)

    def residual_divergence(self, ctx: GAVContext, yt: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor | None:
        """(B,) exact divergence of the residual summed over the targets yt (B, n, D) (sum of tr H), or None
        for mlp, whose divergence the likelihood's estimator takes together with the base's
        (`self.residual.divergence(ctx.summary, xt, yt, t)` gives it exactly)."""
        if self.gav_config.kind == "mlp":
            return None
        return self.residual.divergence(ctx.summary, None, yt, t)

    def velocity(self, ctx: GAVContext, xt: torch.Tensor, yt: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """v + r, (B, n, D)."""
        return self.base.velocity(ctx.base, xt, yt, t) + self.residual_velocity(ctx, xt, yt, t)

    def forward(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                t: torch.Tensor | float) -> torch.Tensor:
        return self.velocity(self.encode_context(xc, yc), xt, yt, t)
