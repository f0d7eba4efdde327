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
                t_per_point: bool = True, y0: torch.Tensor | None = None) -> PathSample:
    """Draw (t, y_t, y1 - y0) for data y1 (B, n_tgt, D); y0 (same shape) is the noise-side end, N(0, I)
    draws unless given (Local Flow Matching passes the OU-evolved state, flownp.core.lfm)."""
    # drawn on the generator's device (CPU by default) and moved: the same seed gives the same path
    # on every device
    gdev = generator.device if generator is not None else y1.device
    if y0 is None:
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


def path_scale(t: torch.Tensor, a: float = 0.0) -> torch.Tensor:
    """The std of y_t = t y1 + (1 - t) y0 when y1 ~ N(0, I) and y0 = a y1 + sqrt(1 - a^2) z (z ~ N(0, I)):
    sigma(t)^2 = (t + (1 - t) a)^2 + (1 - t)^2 (1 - a^2); a = 0 (independent noise, the global path) gives
    sqrt((1 - t)^2 + t^2), a = exp(-gamma) an OU step of length gamma (flownp.core.lfm). sigma = 1 at both
    ends for every a."""
    if a == 0.0:
        return ((1 - t) ** 2 + t**2).sqrt()
    return ((t + (1 - t) * a) ** 2 + (1 - t) ** 2 * (1 - a * a)).sqrt()


def path_rate(t: torch.Tensor, a: float = 0.0) -> torch.Tensor:
    """c(t) = sigma'(t) / sigma(t): the exact velocity of that path is v = c y (both ends N(0, I))."""
    if a == 0.0:
        return (2 * t - 1) / path_scale(t) ** 2
    return ((t + (1 - t) * a) * (1 - a) - (1 - t) * (1 - a * a)) / path_scale(t, a) ** 2


def scaled_frame(path: PathSample, a: float = 0.0) -> PathSample:
    """The same path in the frame u = y / sigma(t) (velocity="residual"; docs/protocol.md §10).

    When the data are N(0, I) the linear path's exact velocity is v = (2t - 1) / sigma^2 y; in the frame u it
    is zero, and u = y at t = 0 and t = 1. A network w(u, t) = du/dt therefore leaves N(0, I) alone at zero
    output for any solver (the untrained model is exactly its base), and its divergence in u equals the
    y-space divergence of sigma * w, so likelihoods need no extra term. Target: du/dt = (v - c y) / sigma,
    with c = (2t - 1) / sigma^2. With `a` > 0 the same for a noise end correlated with the data
    (y0 = a y1 + sqrt(1 - a^2) z: a Local Flow Matching block), with that path's sigma and c (path_rate)."""
    s = path_scale(path.t, a)[..., None]
    c = path_rate(path.t, a)[..., None]
    return PathSample(path.t, path.yt / s, (path.target - c * path.yt) / s)
