"""Forward-mode tangents through the layers of a pointwise FlowNP's value path, by hand: a module's output
and its directional derivatives along T tangents at once, the primal computed once.

Why by hand: the exact divergence of an independent-target flow needs the y_dim x y_dim Jacobian block of
every target, i.e. y_dim directional derivatives. Reverse mode gets them with y_dim backward passes, each
through a fused attention kernel (about 2.5 forwards each on CPU); forward mode through
`torch.func` cannot pass the fused CPU attention kernel. Here the attention's tangent reuses its softmax
weights: y_dim pairs of matrix products and no further exponentials.

Shapes: x (..., F) with its tangents dx (T, ..., F), T tangents (one per y dimension for a Jacobian).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(layer: nn.Linear, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return layer(x), F.linear(dx, layer.weight)


def module(m: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m(x), d m(x)[dx]) for Linear, SiLU, ReLU, LayerNorm and Sequentials of them."""
    if isinstance(m, nn.Sequential):
        for sub in m:
            x, dx = module(sub, x, dx)
        return x, dx
    if isinstance(m, nn.Linear):
        return linear(m, x, dx)
    if isinstance(m, nn.SiLU):
        s = torch.sigmoid(x)
        return x * s, dx * (s * (1 + x * (1 - s)))
    if isinstance(m, nn.ReLU):
        pos = x > 0
        return x * pos, dx * pos
    if isinstance(m, nn.LayerNorm):
        return layer_norm(m, x, dx)
    raise NotImplementedError(f"no forward tangent for {type(m).__name__}")


def layer_norm(m: nn.LayerNorm, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension: xhat = (x - mean) / sqrt(var + eps);
    d xhat = (dx - mean(dx) - xhat * mean(xhat * dx)) / sqrt(var + eps)."""
    mu = x.mean(-1, keepdim=True)
    inv = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + m.eps)
    xhat = (x - mu) * inv
    dxhat = (dx - dx.mean(-1, keepdim=True) - xhat * (xhat * dx).mean(-1, keepdim=True)) * inv
    w = m.weight if m.weight is not None else 1.0
    b = m.bias if m.bias is not None else 0.0
    return xhat * w + b, dxhat * w


def attention_context_and_self(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                               group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's query attends to the context keys and to its own key (the independent-target pass):
    q, k, v (B, H, n, dh), kc, vc (B, H, n_ctx, dh) constant, tangents dq, dk, dv (T, B, H, n, dh) ->
    (out (B, H, n, dh), d out (T, B, H, n, dh)). With softmax weights p over [context | self] and scores s:
    d out = sum_j p_j ds_j v_j - (sum_j p_j ds_j) out + p_self dv. The query and its T tangents are stacked
    as the rows of one product with the context keys and one with its values, `group` (batch, head) slices
    at a time: one on CPU (the (T + 1, n, n_ctx) scores stay in cache), all at once elsewhere."""
    *lead, n, dh = q.shape
    nc, nt = kc.shape[-2], dq.shape[0]
    scale = dh ** -0.5
    flat = lambda z: z.reshape(-1, z.shape[-2], dh)  # noqa: E731
    qf, kf, vf, kcf, vcf = flat(q), flat(k), flat(v), flat(kc), flat(vc)
    dqf, dkf, dvf = (z.reshape(nt, -1, n, dh) for z in (dq, dk, dv))
    g = group or (1 if q.device.type == "cpu" else qf.shape[0])
    outs, d_outs = [], []
    for i in range(0, qf.shape[0], g):
        sl = slice(i, i + g)
        qi, ki, vi, dqi = qf[sl], kf[sl], vf[sl], dqf[:, sl]
        rows = torch.cat([qi[None], dqi]).transpose(0, 1).reshape(qi.shape[0], -1, dh)  # (g, (T + 1) n, dh)
        s = (rows @ kcf[sl].transpose(-1, -2)).mul_(scale).view(-1, nt + 1, n, nc)
        s_self = (qi * ki).sum(-1, keepdim=True) * scale  # (g, n, 1)
        top = torch.maximum(s[:, 0].amax(-1, keepdim=True), s_self)
        p = s[:, 0].sub_(top).exp_()  # s[:, 0] becomes the context weights p_j (normalised below)
        p_self = (s_self - top).exp()
        z = p.sum(-1, keepdim=True) + p_self
        p.div_(z)
        p_self = p_self / z
        pds = s[:, 1:].mul_(p[:, None])  # (g, T, n, n_ctx): p_j ds_j over the context
        o = (s.view(s.shape[0], -1, nc) @ vcf[sl]).view(-1, nt + 1, n, dh).transpose(0, 1)  # [p vc, (p ds) vc]
        out = o[0] + p_self * vi
        ds_self = ((dqi * ki).sum(-1, keepdim=True) + (qi * dkf[:, sl]).sum(-1, keepdim=True)) * scale
        mean_ds = pds.sum(-1, keepdim=True).transpose(0, 1) + p_self * ds_self  # (T, g, n, 1)
        outs.append(out)
        d_outs.append(o[1:] + (p_self * ds_self) * vi - mean_ds * out + p_self * dvf[:, sl])
    return torch.cat(outs).view(*lead, n, dh), torch.cat(d_outs, 1).view(nt, *lead, n, dh)
