"""Inverse-distance weighting: mean = sum_i w_i y_i / sum_i w_i with w_i = d_i^-power over the k nearest
context points; per-variable Gaussian spread from the leave-one-out errors on the context. The
likelihood is a sum of per-point marginals (kind "marginal")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ingest.tasks import TaskBatch


@dataclass
class IDWPredictor:
    power: float = 2.0
    k: int = 16
    name: str = "IDW"
    ll_kind: str = "marginal (sum over points)"

    def _predict(self, xc: torch.Tensor, yc: torch.Tensor, xq: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        d = torch.cdist(xq.double(), xc.double())  # (B, nq, nc)
        if exclude_self:
            d = d + torch.diag_embed(torch.full(d.shape[:-1], math.inf, dtype=d.dtype))
        k = min(self.k, d.shape[-1] - int(exclude_self))
        dk, ik = d.topk(k, dim=-1, largest=False)
        w = (dk.clamp_min(1e-9)) ** -self.power
        yk = torch.gather(yc.double()[:, None].expand(-1, xq.shape[1], -1, -1), 2,
                          ik[..., None].expand(-1, -1, -1, yc.shape[-1]))
        return (w[..., None] * yk).sum(2) / w.sum(-1, keepdim=True)

    def _moments(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self._predict(batch.xc, batch.yc, batch.xt)
        loo = self._predict(batch.xc, batch.yc, batch.xc, exclude_self=True)
        std = ((loo - batch.yc.double()) ** 2).mean(1, keepdim=True).sqrt().clamp_min(1e-3)  # (B, 1, D)
        return mean, std.expand_as(mean)

    def log_likelihood(self, batch: TaskBatch) -> torch.Tensor:
        if batch.xc.shape[1] < 2:
            raise ValueError("IDW needs at least 2 context points")
        m, s = self._moments(batch)
        z = (batch.yt.double() - m) / s
        return (-0.5 * z**2 - s.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)

    def sample(self, batch: TaskBatch, n: int, generator: torch.Generator) -> torch.Tensor:
        m, s = self._moments(batch)
        z = torch.randn((m.shape[0], n, *m.shape[1:]), generator=generator, dtype=torch.float64)
        return (m[:, None] + s[:, None] * z).float()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ll_kind": self.ll_kind, "power": self.power, "k": self.k,
                "estimator": "Gaussian with leave-one-out spread"}
