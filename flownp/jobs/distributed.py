"""Distributed context from torchrun's environment (single process when absent)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def _scalar(self, x: float) -> torch.Tensor:
        dev = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors only
        return torch.tensor([x], dtype=torch.float64, device=dev)

    def all_mean(self, x: float) -> float:
        """Mean of a scalar over ranks."""
        if not self.enabled:
            return x
        t = self._scalar(x)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank: a decision all ranks take together (e.g. to stop
        at the same step, so no rank is left waiting in a collective). Every rank must call it at the same
        point; without torchrun it is the flag itself and costs nothing."""
        if not self.enabled:
            return bool(flag)
        t = self._scalar(1.0 if flag else 0.0)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def rank_device(device: str, dist_: Dist) -> str:
    """Under torchrun each rank takes its own GPU: 'cuda' -> 'cuda:LOCAL_RANK' (CPU unchanged)."""
    return f"cuda:{dist_.local_rank}" if dist_.enabled and device.startswith("cuda") else device


def init_from_env(device: str) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); no-op without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
