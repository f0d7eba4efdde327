"""Conditional flow matching on the linear path (docs/protocol.md §7): noise at t = 0, data at t = 1.

y_t = t y1 + (1 - t) y0 with y0 ~ N(0, I), target velocity y1 - y0, flow time drawn independently for
every target point, MSE over all elements. Coupling: independent (minibatch OT hurts conditional models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PathSample:
    t: torch.Tensor       # (B, n_tgt) flow time per target point
    yt: torch.Tensor      # (B, n_tgt, D) point on the path
    target: torch.Tensor  # (B, n_tgt, D) velocity to regress on


def sample_path(y1: torch.Tensor, generator: torch.Generator | None = None,
                t_per_point: bool = True) -> PathSample:
    """Draw (t, y_t, y1 - y0) for data y1 (B, n_tgt, D)."""
    # drawn on the generator's device (CPU by default) and moved: the same seed gives the same path
    # on every device
    gdev = generator.device if generator is not None else y1.device
    y0 = torch.randn(y1.shape, generator=generator, device=gdev, dtype=y1.dtype).to(y1.device)
    shape = y1.shape[:-1] if t_per_point else y1.shape[:1]
    t = torch.rand(shape, generator=generator, device=gdev, dtype=y1.dtype).to(y1.device)
    if not t_per_point:
        t = t[:, None].expand(y1.shape[:-1])
    yt = t[..., None] * y1 + (1 - t[..., None]) * y0
    return PathSample(t, yt, y1 - y0)


def flow_matching_loss(v: torch.Tensor, path: PathSample) -> torch.Tensor:
    """Mean squared error over all elements."""
    return (v - path.target).pow(2).mean()


def path_scale(t: torch.Tensor) -> torch.Tensor:
    """sigma(t) = sqrt((1 - t)^2 + t^2): the std of y_t when data and noise are both N(0, I)."""
    return ((1 - t) ** 2 + t**2).sqrt()


def scaled_frame(path: PathSample) -> PathSample:
    """The same path in the frame u = y / sigma(t) (velocity="residual"; docs/protocol.md §10).

    When the data are N(0, I) the linear path's exact velocity is v = (2t - 1) / sigma^2 y; in the frame u it
    is zero, and u = y at t = 0 and t = 1. A network w(u, t) = du/dt therefore leaves N(0, I) alone at zero
    output for any solver (the untrained model is exactly its base), and its divergence in u equals the
    y-space divergence of sigma * w, so likelihoods need no extra term. Target: du/dt = (v - c y) / sigma,
    with c = (2t - 1) / sigma^2."""
    s = path_scale(path.t)[..., None]
    c = (2 * path.t[..., None] - 1) / s**2
    return PathSample(path.t, path.yt / s, (path.target - c * path.yt) / s)
