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

    def all_mean(self, x: float) -> float:
        """Mean of a scalar over ranks."""
        if not self.enabled:
            return x
        dev = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors only
        t = torch.tensor([x], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return float(t.item()) / self.world


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
