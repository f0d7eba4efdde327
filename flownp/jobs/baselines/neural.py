"""Neural-process baselines trained by maximum likelihood on the same tasks as FlowNP.

- CNP (Garnelo et al. 2018): mean-pooled context representation, a decoder per target point giving a
  diagonal Gaussian. Its likelihood is a sum of per-point marginals (kind "marginal").
- TNP-A (Nguyen & Grover 2022): one transformer over [context | targets with their values | target
  queries]. Context tokens see the context; the i-th valued target sees the context and valued targets
  1..i; the i-th query sees the context and valued targets 1..i-1 and predicts a diagonal Gaussian for
  target i. Its likelihood is the autoregressive product over target points in the given order, a
  joint density (kind "joint (autoregressive)"). Sampling would take n_tgt sequential passes and is not
  offered.

All on normalised tensors: xc (B, n_ctx, 2), yc (B, n_ctx, 4), xt (B, n_tgt, 2), yt (B, n_tgt, 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flownp.core.encoding import Sinusoidal, geometric_freqs
from flownp.core.model import CachedBlock, _mlp
from ingest.configs import DictConfig
from ingest.tasks import TaskBatch

KINDS = ("cnp", "tnpa")


@dataclass(frozen=True)
class NeuralBaselineConfig(DictConfig):
    """Settings of a CNP or TNP-A (round-trips to a plain dict, stored in its checkpoint)."""

    kind: str = "cnp"
    x_dim: int = 2
    y_dim: int = 4
    space_freqs: int = 16
    space_max_log2: float = 4.0
    d_model: int = 64
    n_layers: int = 4      # CNP: hidden layers of encoder and decoder; TNP-A: transformer layers
    n_heads: int = 4
    d_ff: int = 128
    min_std: float = 1e-3  # floor of the predicted std, normalised units

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")


    def build(self) -> "NeuralBaseline":
        return (CNP if self.kind == "cnp" else TNPA)(self)


class NeuralBaseline(nn.Module):
    """Common part: coordinate encoding and the Gaussian head. forward -> (mean, std), each (B, n_tgt, 4)."""

    config: NeuralBaselineConfig

    def __init__(self, config: NeuralBaselineConfig) -> None:
        super().__init__()
        self.config = config
        self.enc_x = Sinusoidal(geometric_freqs(config.space_freqs, config.space_max_log2))
        self.n_x = config.x_dim * self.enc_x.out_per_scalar

    def _gaussian(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = out.chunk(2, dim=-1)
        return mean, self.config.min_std + F.softplus(raw)

    def forward(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor,
                yt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def log_likelihood(self, xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor,
                       yt: torch.Tensor) -> torch.Tensor:
        """(B,) nats of the whole target set (sum over points and variables), normalised units."""
        return gaussian_log_density(*self(xc, yc, xt, yt), yt)


def gaussian_log_density(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dimension of log N(y | mean, std^2): (B, ...) -> (B,)."""
    z = (y - mean) / std
    return (-0.5 * z**2 - std.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


class CNP(NeuralBaseline):
    def __init__(self, config: NeuralBaselineConfig) -> None:
        super().__init__(config)
        d, n = config.d_model, config.n_layers
        self.encoder = _mlp([self.n_x + config.y_dim] + [d] * n)
        self.decoder = _mlp([self.n_x + d] + [d] * (n - 1) + [2 * config.y_dim])

    def forward(self, xc, yc, xt, yt=None):  # type: ignore[override]
        r = self.encoder(torch.cat([self.enc_x(xc), yc], -1)).mean(1, keepdim=True)
        h = torch.cat([self.enc_x(xt), r.expand(-1, xt.shape[1], -1)], -1)
        return self._gaussian(self.decoder(h))


def tnpa_mask(n_ctx: int, n_tgt: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (N, N) attention mask, True = may attend, for tokens [context | valued targets | queries],
    N = n_ctx + 2 n_tgt."""
    n = n_ctx + 2 * n_tgt
    m = torch.zeros(n, n, dtype=torch.bool, device=device)
    m[:, :n_ctx] = True
    lower = torch.ones(n_tgt, n_tgt, dtype=torch.bool, device=device).tril()
    v, q = slice(n_ctx, n_ctx + n_tgt), slice(n_ctx + n_tgt, n)
    m[v, v] = lower           # valued target i sees valued targets j <= i
    m[q, v] = lower.tril(-1)  # query i sees valued targets j < i
    return m


class TNPA(NeuralBaseline):
    def __init__(self, config: NeuralBaselineConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.embed = _mlp([self.n_x + config.y_dim + 1, d, d, d])  # last input: 1 for a query token
        self.blocks = nn.ModuleList(CachedBlock(d, config.n_heads, config.d_ff) for _ in range(config.n_layers))
        self.head = _mlp([d, 2 * d, 2 * config.y_dim])

    def _tokens(self, x: torch.Tensor, y: torch.Tensor, query: float) -> torch.Tensor:
        flag = torch.full((*y.shape[:-1], 1), query, dtype=y.dtype, device=y.device)
        return self.embed(torch.cat([self.enc_x(x), y, flag], -1))

    def forward(self, xc, yc, xt, yt=None):  # type: ignore[override]
        if yt is None:
            raise ValueError("TNP-A predicts target i from the values of targets 1..i-1: pass yt")
        nc, nt = xc.shape[1], xt.shape[1]
        h = torch.cat([self._tokens(xc, yc, 0.0), self._tokens(xt, yt, 0.0),
                       self._tokens(xt, torch.zeros_like(yt), 1.0)], 1)
        mask = tnpa_mask(nc, nt, h.device)
        for blk in self.blocks:
            h = blk.masked(h, mask)
        return self._gaussian(self.head(h[:, nc + nt:]))


def nll_loss(net: nn.Module, batch: TaskBatch, gen: torch.Generator | None = None,
             bf16: bool = False) -> torch.Tensor:
    """Training loss: negative log-likelihood per target point (nats, 4 variables summed). Goes through
    `net.forward` so that a DDP wrapper synchronises gradients; `gen` is unused (no noise)."""
    with torch.autocast(batch.yt.device.type, dtype=torch.bfloat16, enabled=bf16):
        mean, std = net(batch.xc, batch.yc, batch.xt, batch.yt)
    return -gaussian_log_density(mean.float(), std.float(), batch.yt).mean() / batch.xt.shape[1]


class NeuralBaselinePredictor:
    """A trained CNP / TNP-A for `flownp.jobs.evaluate.evaluate_predictor`."""

    def __init__(self, model: NeuralBaseline, source: str = "") -> None:
        self.model = model.eval()
        self.source = source
        kind = model.config.kind
        self.name = {"cnp": "CNP", "tnpa": "TNP-A"}[kind]
        self.ll_kind = "marginal (sum over points)" if kind == "cnp" else "joint (autoregressive)"
        self.can_sample = kind == "cnp"

    @torch.no_grad()
    def log_likelihood(self, batch: TaskBatch) -> torch.Tensor:
        return self.model.log_likelihood(batch.xc, batch.yc, batch.xt, batch.yt).double()

    @torch.no_grad()
    def sample(self, batch: TaskBatch, n: int, generator: torch.Generator) -> torch.Tensor:
        if not self.can_sample:
            raise NotImplementedError(f"{self.name} sampling needs n_tgt sequential passes; not offered")
        mean, std = self.model(batch.xc, batch.yc, batch.xt)
        z = torch.randn((mean.shape[0], n, *mean.shape[1:]), generator=generator, dtype=mean.dtype)
        return mean[:, None] + std[:, None] * z

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ll_kind": self.ll_kind, "checkpoint": self.source,
                "model": self.model.config.to_dict(),
                "estimator": "exact (Gaussian)" + ("" if self.can_sample else "; samples not offered")}


def load_baseline(path: str) -> NeuralBaselinePredictor:
    """A predictor from a checkpoint written by `flownp train-baseline` (EMA weights)."""
    from flownp.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    if ck.get("kind") != "baseline":
        raise ValueError(f"{path}: not a neural-baseline checkpoint (kind {ck.get('kind')!r})")
    model = NeuralBaselineConfig.from_dict(ck["model_config"]).build()
    model.load_state_dict(ck.get("ema") or ck["model"])
    return NeuralBaselinePredictor(model, str(path))
