"""The FlowNP velocity model v(t, y_t | context) on normalised tensors.

Shapes: xc (B, n_ctx, x_dim), yc (B, n_ctx, y_dim), xt (B, n_tgt, x_dim), yt (B, n_tgt, y_dim),
t (B, n_tgt) per target point (or (B,) / a float, broadcast). Output: velocity (B, n_tgt, y_dim).
Tokens: [enc(x), enc(t), y]; context tokens use t = 1 and the clean values (docs/protocol.md §7). With
arch='pointwise' target tokens carry enc(x) only, and (t, y) enter the head (and the last `value_layers`
blocks) (docs/protocol.md §7.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flownp.core import tangents
from flownp.core.config import ModelConfig
from flownp.core.encoding import Sinusoidal, geometric_freqs, reference_freqs
from flownp.core.gp_base import GPFitSettings, TaskTransform, task_transform


def _mlp(sizes: list[int], activation: str = "relu") -> nn.Sequential:
    act = {"relu": nn.ReLU, "silu": nn.SiLU}[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def head_units_alive(model: nn.Module, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor,
                     times: tuple[float, ...] = (0.05, 0.5, 0.95), generator: torch.Generator | None = None) -> float:
    """Fraction of the velocity head's hidden units with a nonzero gradient path for some target, time and
    N(0, I) state on these tasks (a ReLU unit that is never positive passes no gradient: it is dead). 1.0 for
    a smooth activation unless a unit is exactly flat. xc (B, n_ctx, 2), yc (B, n_ctx, y_dim), xt (B, n_tgt, 2)
    in the flow's space."""
    acts: list[torch.Tensor] = []
    hook = model.head[1].register_forward_hook(lambda _m, _i, o: acts.append(o.detach()))
    try:
        with torch.no_grad():
            ctx = model.encode_context(xc, yc)
            for t in times:
                y = torch.randn(xt.shape[:-1] + (model.config.y_dim,), generator=generator, dtype=xt.dtype)
                model.velocity(ctx, xt, y, t)
    finally:
        hook.remove()
    a = torch.cat([z.reshape(-1, z.shape[-1]) for z in acts])
    live = (a > 0) if isinstance(model.head[1], nn.ReLU) else (a != 0)
    return float(live.any(0).float().mean())


class CachedBlock(nn.Module):
    """Post-LN transformer block whose context pass is independent of the targets."""

    def __init__(self, d: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.ReLU(), nn.Linear(d_ff, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def _split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, heads, n, d_head)

    def _finish(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = a.shape
        h = self.ln1(h + self.proj(a.transpose(1, 2).reshape(b, n, -1)))
        return self.ln2(h + self.ff(h))

    def context(self, hc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Context tokens attend to the context: -> (next hc, keys, values) of this layer."""
        q, k, v = self._split(hc)
        return self._finish(hc, F.scaled_dot_product_attention(q, k, v)), k, v

    def masked(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """All tokens in one pass with a boolean (n, n) mask, True = may attend (neural baselines)."""
        q, k, v = self._split(h)
        return self._finish(h, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def target(self, ht: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, joint: bool) -> torch.Tensor:
        """Target tokens attend to the cached context keys/values and (joint) to each other or
        (independent) only to themselves."""
        q, k, v = self._split(ht)
        keys, values = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
        if joint:
            a = F.scaled_dot_product_attention(q, keys, values)
        else:  # each target sees the context and itself: a boolean mask [all context | diagonal]
            nt, nc = q.shape[2], kc.shape[2]
            mask = torch.cat([torch.ones(nt, nc, dtype=torch.bool, device=q.device),
                              torch.eye(nt, dtype=torch.bool, device=q.device)], dim=1)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self._finish(ht, a)

    def target_tangents(self, ht: torch.Tensor, dht: torch.Tensor, kc: torch.Tensor,
                        vc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`target(ht, kc, vc, joint=False)` and its tangents: ht (B, n, d), dht (T, B, n, d) ->
        (next ht, its tangents) (flownp.core.tangents)."""
        qkv, dqkv = tangents.linear(self.qkv, ht, dht)
        b, n, d = ht.shape
        heads = lambda z: z.view(*z.shape[:-2], n, 3, self.heads, d // self.heads).movedim(-3, 0).transpose(-2, -3)  # noqa: E731
        (q, k, v), (dq, dk, dv) = heads(qkv), heads(dqkv)  # each (B, heads, n, d_head) / (T, B, heads, n, d_head)
        a, da = tangents.attention_context_and_self(q, kc, vc, k, v, dq, dk, dv)
        merge = lambda z: z.transpose(-2, -3).reshape(*z.shape[:-3], n, d)  # noqa: E731
        h, dh = tangents.linear(self.proj, merge(a), merge(da))
        h, dh = tangents.layer_norm(self.ln1, ht + h, dht + dh)
        f, df = tangents.module(self.ff, h, dh)
        return tangents.layer_norm(self.ln2, h + f, dh + df)


@dataclass
class Context:
    """What a solve reuses at every step: embedded context tokens, and for arch='cached' the per-layer
    keys/values. Shapes (B, n_ctx, d) and per layer (B, heads, n_ctx, d_head)."""

    xc: torch.Tensor
    yc: torch.Tensor
    tokens: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # arch='pointwise': (xt, TargetFeatures) of the last target locations seen, reused while a solve
    # passes the same xt tensor
    features: list[tuple[torch.Tensor, "TargetFeatures"]] = field(default_factory=list)
    out: torch.Tensor | None = None  # arch='cached'/'pointwise': the context tokens after the last block

    def repeat(self, n: int) -> "Context":
        """The same context for n samples per task: batch B -> B * n (sample index fastest)."""
        r = lambda x: x.repeat_interleave(n, dim=0)  # noqa: E731
        kv = [(r(k), r(v)) for k, v in self.kv] if self.kv is not None else None
        return Context(r(self.xc), r(self.yc), r(self.tokens), kv, out=None if self.out is None else r(self.out))


@dataclass
class TargetFeatures:
    """arch='pointwise': what a solve computes once per task at the target locations. h (B, n_tgt, d_model):
    the transformer's output; keys, values (B, n_tgt, heads, k, d_head) of the k nearest context points
    (head_neighbours > 0) or None."""

    h: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def repeat(self, n: int) -> "TargetFeatures":
        r = lambda x: None if x is None else x.repeat_interleave(n, dim=0)  # noqa: E731
        return TargetFeatures(r(self.h), r(self.keys), r(self.values))


class FlowNP(nn.Module):
    """Velocity field of the conditional flow from N(0, I) (t = 0) to the targets (t = 1)."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ModelConfig()
        if c.encoding == "reference":
            self.enc_x = Sinusoidal(reference_freqs(c.n_freqs))
            self.enc_t = Sinusoidal(reference_freqs(c.n_freqs))
        else:
            self.enc_x = Sinusoidal(geometric_freqs(c.space_freqs, c.space_max_log2))
            self.enc_t = Sinusoidal(geometric_freqs(c.time_freqs, c.time_freqs - 3.0))
        n_t, n_y = self.enc_t.out_per_scalar, c.y_dim
        n_in = c.x_dim * self.enc_x.out_per_scalar + n_t + n_y
        self.embed = _mlp([n_in] + [c.embed_hidden] * (c.embed_layers - 1) + [c.d_model], c.activation)
        if c.arch == "pointwise":  # target tokens: the location alone; t and y go to the head
            self.embed_target = _mlp([n_in - n_t - n_y] + [c.embed_hidden] * (c.embed_layers - 1) + [c.d_model],
                                     c.activation)
        if c.arch == "reference":
            layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.d_ff, dropout=0.0, batch_first=True,
                                               norm_first=False)
            self.encoder = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        else:
            self.blocks = nn.ModuleList(CachedBlock(c.d_model, c.n_heads, c.d_ff) for _ in range(c.n_layers))
        n_head = c.d_model + (n_t + n_y if c.arch == "pointwise" else 0)
        if c.value_layers:  # (t, y_t) added to the location token before the last value_layers blocks
            self.embed_value = _mlp([n_t + n_y, c.embed_hidden, c.d_model], c.activation)
        if c.head_neighbours:  # the head's look at the nearest context points: keys from states and offsets
            self.nb_kv = nn.Linear(c.d_model + c.x_dim * self.enc_x.out_per_scalar, 2 * c.d_model)
            self.nb_q = nn.Linear(n_head, c.d_model)
            n_head += c.d_model
        self.head = _mlp([n_head] + [c.head_hidden] * (c.head_layers - 1) + [c.y_dim], c.activation)
        if c.velocity == "residual":  # the untrained model is exactly its base distribution
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    @property
    def joint(self) -> bool:
        return self.config.targets == "joint"

    def _tokens(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feats = [self.enc_x(x), self.enc_t(t.unsqueeze(-1)), y]
        return self.embed(torch.cat(feats, dim=-1))

    def encode_context(self, xc: torch.Tensor, yc: torch.Tensor) -> Context:
        """Work that depends on the context only; reused for every step and sample of a solve."""
        tokens = self._tokens(xc, yc, torch.ones(yc.shape[:-1], dtype=yc.dtype, device=yc.device))
        if self.config.arch == "reference":
            return Context(xc, yc, tokens)
        kv, h = [], tokens
        for blk in self.blocks:
            h, k, v = blk.context(h)
            kv.append((k, v))
        return Context(xc, yc, tokens, kv, out=h)

    def velocity(self, ctx: Context, xt: torch.Tensor, yt: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """v(t, yt | context): (B, n_tgt, y_dim)."""
        t = torch.as_tensor(t, dtype=yt.dtype, device=yt.device)
        t = t.reshape(t.shape + (1,) * (2 - t.dim())).expand(yt.shape[:-1]) if t.dim() < 2 else t
        if self.config.arch == "pointwise":
            f = self._target_features(ctx, xt)
            et = self.enc_t(t.unsqueeze(-1))
            h = f.h
            if self.config.value_layers:
                h = h + self.embed_value(torch.cat([et, yt], dim=-1))
                m = self.config.value_layers
                for blk, (k, v) in zip(self.blocks[-m:], ctx.kv[-m:]):
                    h = blk.target(h, k, v, joint=False)
            z = torch.cat([h, et, yt], dim=-1)
            if f.keys is not None:
                b, n, heads, _, dh = f.keys.shape
                q = self.nb_q(z).view(b, n, heads, 1, dh)
                p = torch.softmax((q * f.keys).sum(-1) / dh**0.5, dim=-1)  # (B, n, heads, k)
                z = torch.cat([z, (p[..., None] * f.values).sum(-2).reshape(b, n, heads * dh)], dim=-1)
            return self.head(z)
        ht = self._tokens(xt, yt, t)
        if self.config.arch == "reference":
            h = self.encoder(torch.cat([ctx.tokens, ht], dim=1))[:, ctx.tokens.shape[1]:]
        else:
            h = ht
            for blk, (k, v) in zip(self.blocks, ctx.kv):
                h = blk.target(h, k, v, self.joint)
        return self.head(h)

    @property
    def has_jacobian_blocks(self) -> bool:
        """Whether `velocity_jacobian` applies: arch='pointwise' with independent targets and no neighbour
        attention in the head."""
        c = self.config
        return c.arch == "pointwise" and c.targets == "independent" and not c.head_neighbours

    def velocity_jacobian(self, ctx: Context, xt: torch.Tensor, yt: torch.Tensor,
                          t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """v(t, yt | context) (B, n_tgt, y_dim) and each target's Jacobian block J (B, n_tgt, y_dim, y_dim),
        J[b, i, a, j] = d v[b, i, a] / d yt[b, i, j] (the whole Jacobian: targets are independent), by forward
        tangents (flownp.core.tangents); trace(J) summed over targets is the exact divergence."""
        if not self.has_jacobian_blocks:
            raise NotImplementedError("velocity_jacobian needs arch='pointwise', targets='independent' and "
                                      "head_neighbours=0")
        t = torch.as_tensor(t, dtype=yt.dtype, device=yt.device)
        t = t.reshape(t.shape + (1,) * (2 - t.dim())).expand(yt.shape[:-1]) if t.dim() < 2 else t
        d = yt.shape[-1]
        f = self._target_features(ctx, xt)
        et = self.enc_t(t.unsqueeze(-1))
        eye = torch.eye(d, dtype=yt.dtype, device=yt.device)
        dy = eye[:, None, None, :].expand(d, *yt.shape)  # (T = y_dim, B, n, y_dim): one tangent per y dimension
        det = torch.zeros((d, *et.shape), dtype=yt.dtype, device=yt.device)
        h, dh = f.h, torch.zeros((d, *f.h.shape), dtype=yt.dtype, device=yt.device)
        m = self.config.value_layers
        if m:
            e, de = tangents.module(self.embed_value, torch.cat([et, yt], dim=-1), torch.cat([det, dy], dim=-1))
            h, dh = h + e, dh + de
            for blk, (k, v) in zip(self.blocks[-m:], ctx.kv[-m:]):
                h, dh = blk.target_tangents(h, dh, k, v)
        out, dout = tangents.module(self.head, torch.cat([h, et, yt], dim=-1), torch.cat([dh, det, dy], dim=-1))
        return out, dout.movedim(0, -1)

    def expand_samples(self, ctx: Context, xt: torch.Tensor, n: int) -> tuple[Context, torch.Tensor]:
        """A context of B tasks and their target locations xt (B, n_tgt, x_dim) for n samples per task:
        -> (context of B * n rows, xt (B * n, n_tgt, x_dim)), sample index fastest. The context is encoded
        once, and (arch='pointwise') the transformer's target pass runs once per task, not per sample."""
        xs = xt.repeat_interleave(n, dim=0)
        rep = ctx.repeat(n)
        if self.config.arch == "pointwise":
            rep.features[:] = [(xs, self._target_features(ctx, xt).repeat(n))]
        return rep, xs

    def _target_features(self, ctx: Context, xt: torch.Tensor) -> TargetFeatures:
        """arch='pointwise': the transformer's output at the target locations xt (each attending to the
        context and itself) and the nearest context points' keys and values; computed once per xt tensor
        and context (a whole solve), with gradients only if the context carries them."""
        for x, f in ctx.features:
            if x is xt:
                return f
        c = self.config
        with torch.set_grad_enabled(torch.is_grad_enabled() and ctx.tokens.requires_grad):
            h = self.embed_target(self.enc_x(xt))
            n_loc = c.n_layers - c.value_layers  # the blocks that see locations only
            for blk, (k, v) in zip(self.blocks[:n_loc], ctx.kv[:n_loc]):
                h = blk.target(h, k, v, joint=False)
            f = TargetFeatures(h)
            if c.head_neighbours:
                b, n, _ = xt.shape
                kk = min(c.head_neighbours, ctx.xc.shape[1])
                idx = torch.cdist(xt, ctx.xc).topk(kk, dim=-1, largest=False).indices  # (B, n, k)
                pick = lambda a: torch.gather(a[:, None].expand(-1, n, -1, -1), 2,  # noqa: E731
                                              idx[..., None].expand(-1, -1, -1, a.shape[-1]))
                rel = self.enc_x(pick(ctx.xc) - xt[:, :, None])
                kv = self.nb_kv(torch.cat([pick(ctx.out), rel], dim=-1)).view(b, n, kk, 2, c.n_heads, -1)
                f.keys, f.values = (kv[..., j, :, :].transpose(2, 3) for j in (0, 1))  # (B, n, heads, k, dh)
        ctx.features[:] = [(xt, f)]
        return f

    @property
    def has_task_transform(self) -> bool:
        return self.config.standardise != "none" or self.config.base != "standard"

    def task_transform(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor) -> TaskTransform | None:
        """The per-task bijection between normalised targets and the flow's state (None: the identity,
        the reference protocol). See flownp.core.gp_base."""
        c = self.config
        if not self.has_task_transform:
            return None
        st = GPFitSettings(kernels=tuple(k for k in c.gp_kernels.split(",") if k), fit_points=c.gp_fit_points,
                           ell_min=c.gp_ell_min, ell_max=c.gp_ell_max, n_ell=c.gp_n_ell,
                           noise_ratios=tuple(float(r) for r in c.gp_noise_ratios.split(",") if r))
        return task_transform(xc, yc, xt, standardise=c.standardise, base=c.base, whitening=c.whitening,
                              floor=c.standardise_floor, settings=st)

    def forward(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                t: torch.Tensor | float) -> torch.Tensor:
        """v(t, yt | xc, yc) at xt (B, n_tgt, x_dim): yt (B, n_tgt, y_dim) -> (B, n_tgt, y_dim); or K states per
        task, yt (B, K, n_tgt, y_dim) with t (B, K, n_tgt) -> (B, K, n_tgt, y_dim), the context encoded once
        and (pointwise) the targets' transformer pass run once for the K (`expand_samples`)."""
        ctx = self.encode_context(xc, yc)
        if yt.dim() == 3:
            return self.velocity(ctx, xt, yt, t)
        b, k, n, d = yt.shape
        t = torch.as_tensor(t, dtype=yt.dtype, device=yt.device)
        if t.dim() not in (0, 3):
            raise ValueError(f"with K states per task (yt {tuple(yt.shape)}) t is a scalar or (B, K, n_tgt), "
                             f"got {tuple(t.shape)}")
        rep, xs = self.expand_samples(ctx, xt, k)
        return self.velocity(rep, xs, yt.reshape(b * k, n, d), t.expand(b, k, n).reshape(b * k, n)).reshape(b, k, n, d)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
