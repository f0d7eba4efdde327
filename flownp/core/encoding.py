"""Sinusoidal features of scalars (coordinates and flow time)."""

from __future__ import annotations

import math

import torch
from torch import nn


class Sinusoidal(nn.Module):
    """(..., k) scalars -> (..., k * 2 * F) features sin(w c), cos(w c) for fixed frequencies w (F,)."""

    def __init__(self, freqs: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("freqs", freqs.to(torch.float32), persistent=False)

    @property
    def out_per_scalar(self) -> int:
        return 2 * self.freqs.numel()

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        a = c.unsqueeze(-1) * self.freqs  # (..., k, F)
        return torch.cat([a.sin(), a.cos()], dim=-1).flatten(-2)


def reference_freqs(n: int) -> torch.Tensor:
    """w_k = pi * 2^(k-2), k = 0..n-1 (the published encoding)."""
    return math.pi * 2.0 ** (torch.arange(n, dtype=torch.float64) - 2)


def geometric_freqs(n: int, max_log2: float) -> torch.Tensor:
    """n frequencies from pi/4 to pi * 2^max_log2, geometrically spaced."""
    return math.pi * 2.0 ** torch.linspace(-2.0, max_log2, n, dtype=torch.float64)
