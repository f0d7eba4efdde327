"""Shared pieces of the benchmarks: timing, the machine's matmul peak, synthetic requests, FLOP counting
with CPU attention kernels included (torch's FlopCounterMode skips them)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

_aten = torch.ops.aten


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kw) -> int:
    b, h, lq, d = q
    return 4 * b * h * lq * k[2] * d  # QK^T and PV


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_cpu_bwd_flops(grad_out, q, k, v, *args, out_shape=None, **kw) -> int:
    b, h, lq, d = q
    return 8 * b * h * lq * k[2] * d  # the four matmuls of the backward


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Wall times (s) of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Best measured FLOP/s of an n x n x n matrix product at this precision (the hardware anchor)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(timeit(lambda: a @ b, repeats, 2, device))


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def request(n_ctx: int, n_tgt: int, batch: int = 1, seed: int = 0, device: str = "cpu"):
    """A random request in model space: xc (B, n_ctx, 2) in the circle's extent, yc (B, n_ctx, 4),
    xt (B, n_tgt, 2), yt (B, n_tgt, 4)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, n_ctx + n_tgt, 2, generator=g) * 2 - 1) * 9.0
    y = torch.randn(batch, n_ctx + n_tgt, 4, generator=g)
    t = lambda a: a.to(device)  # noqa: E731
    return t(x[:, :n_ctx]), t(y[:, :n_ctx]), t(x[:, n_ctx:]), t(y[:, n_ctx:])


def load_model(checkpoint: str | None, config=None, device: str = "cpu"):
    """A trained model from a checkpoint, or an untrained one of `config` (speed does not depend on
    the weights)."""
    from flownp.checkpoint import load_checkpoint, model_from_checkpoint
    from flownp.core.config import ModelConfig
    from flownp.core.model import FlowNP

    if checkpoint:
        return model_from_checkpoint(load_checkpoint(checkpoint)).to(device)
    torch.manual_seed(0)
    return FlowNP(config or ModelConfig()).eval().to(device)
