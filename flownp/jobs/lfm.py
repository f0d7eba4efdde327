"""Training jobs for Local Flow Matching and for distilled one-step samplers (flownp.core.lfm).

`train_lfm`: blocks 1..N in sequence, each for `TrainConfig.steps` steps with its own optimiser, warm-up and
EMA, on the push-forward of the training targets through the finished blocks (their EMA weights, frozen:
a finished block's weights are its EMA). last.pt records the block and the step inside it, so `--resume`
continues exactly, mid-block or between blocks; block{n}.pt keeps each finished prefix; best.pt is the
finished model (no early selection across blocks).
`distill`: one-step maps regressed on a teacher checkpoint's pairs (an LFM or a global FlowNP), all maps in
one loop (their weights are separate, so this is N' independent regressions); the teacher is frozen and
stored in the checkpoint to score likelihoods (labelled as the teacher's).
Run: `flownp train-lfm --data STORE --out RUN`, `flownp distill --from RUN/best.pt --data STORE --out RUN2`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flownp.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from flownp.core.config import ModelConfig
from flownp.core.lfm import LFM, DistillConfig, DistilledSampler, LFMConfig, block_loss, distill_loss
from flownp.jobs.distributed import Dist, init_from_env, rank_device
from flownp.jobs.train import TrainConfig, Trainer, flow_space
from ingest.store import Store
from ingest.tasks import TaskBatch


def _mixed(gen: torch.Generator, key: int) -> torch.Generator:
    """A generator seeded from one draw of `gen` and `key` (the block): each block its own noise."""
    first = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return torch.Generator().manual_seed(int(np.random.SeedSequence([first, key]).generate_state(1)[0]))


class LFMTrainer(Trainer):
    """Sequential block training of an LFM (see module docstring). `block` is the block being trained."""

    def __init__(self, store: Store, out: str | Path, model_cfg: ModelConfig, lfm_cfg: LFMConfig, cfg: TrainConfig,
                 dist: Dist | None = None) -> None:
        self.lfm_cfg, self.block = lfm_cfg, 0
        super().__init__(store, out, model_cfg, cfg, dist)

    def build(self, model_cfg: ModelConfig) -> tuple[torch.nn.Module, Any, str]:
        return LFM(model_cfg, self.lfm_cfg), self._objective, "lfm"

    def _objective(self, model: torch.nn.Module, batch: TaskBatch, gen: torch.Generator, bf16: bool) -> torch.Tensor:
        lfm = getattr(model, "module", model)
        fb = flow_space(lfm, batch)
        return block_loss(lfm, self.block, fb.xc, fb.yc, fb.xt, fb.yt, _mixed(gen, self.block), bf16)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.model.blocks[self.block].parameters())}]

    def _new_optimizer(self) -> None:
        groups = self.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def payload(self) -> dict[str, Any]:
        return {**super().payload(), "lfm_config": self.lfm_cfg.to_dict(), "lfm_block": self.block,
                "blocks_done": self.block}

    def save(self, name: str = "last.pt") -> None:
        if name != "best.pt":  # the base loop's per-validation best is not meaningful across blocks
            super().save(name)

    def resume(self, path: str | Path) -> None:
        ck = load_checkpoint(path, map_location=self.device)
        if ck.get("lfm_config") != self.lfm_cfg.to_dict():
            raise ValueError(f"{path}: LFM config differs from this run's")
        self.block = int(ck["lfm_block"])
        if self.block < self.lfm_cfg.n_blocks:
            self._new_optimizer()  # the optimiser state belongs to the block being trained
        super().resume(path)

    def train_step(self) -> dict[str, float]:
        return {**super().train_step(), "block": self.block}

    def _finish_block(self) -> None:
        n = self.block
        with torch.no_grad():  # a finished block is frozen at its EMA weights
            for pm, pe in zip(self.model.blocks[n].parameters(), self.ema.blocks[n].parameters()):
                pm.copy_(pe)
        self.block, self.step, self.best_val = n + 1, 0, math.inf
        self.save(f"block{n + 1}.pt")
        if self.block < self.lfm_cfg.n_blocks:
            self._new_optimizer()
        self.save("last.pt")

    def run_blocks(self, progress: bool = True, stop_at: tuple[int, int] | None = None,
                   max_minutes: float | None = None) -> dict[str, Any]:
        """Train the remaining blocks; stop at (block, step) as a crash would (tests) or after max_minutes
        (last.pt written, `--resume` continues)."""
        t0, last = time.perf_counter(), {}
        while self.block < self.lfm_cfg.n_blocks:
            left = None if max_minutes is None else max_minutes - (time.perf_counter() - t0) / 60
            stop = stop_at[1] if stop_at is not None and stop_at[0] == self.block else None
            last = self.run(progress, stop_at=stop, max_minutes=left)
            if self.step < self.cfg.steps:
                return {**last, "block": self.block}
            self._finish_block()
        if self.dist.is_main:
            save_checkpoint(self.out / "best.pt", self.payload())
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps({"blocks_done": self.block, "done": True}) + "\n")
        return {**last, "blocks_done": self.block}


def train_lfm(data: str | Path, out: str | Path, model_cfg: ModelConfig | None = None,
              lfm_cfg: LFMConfig | None = None, cfg: TrainConfig | None = None, *, resume: bool = False,
              progress: bool = True, max_minutes: float | None = None) -> dict[str, Any]:
    """Train an LFM on the store at `data` (cfg.steps steps per block), writing under `out`."""
    cfg = cfg or TrainConfig()
    dist = init_from_env(cfg.device)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": rank_device(cfg.device, dist)})
    trainer = LFMTrainer(Store.open(data), out, model_cfg or ModelConfig(), lfm_cfg or LFMConfig(), cfg, dist)
    if resume and (Path(out) / "last.pt").exists():
        trainer.resume(Path(out) / "last.pt")
    return trainer.run_blocks(progress, max_minutes=max_minutes)


@dataclasses.dataclass(frozen=True)
class DistillJob:
    """What `distill` needs besides the training settings: the teacher checkpoint and the DistillConfig."""

    teacher: str
    config: DistillConfig


class Distiller(Trainer):
    """Regression of a DistilledSampler's maps on its (frozen, EMA) teacher's pairs."""

    def __init__(self, store: Store, out: str | Path, job: DistillJob, cfg: TrainConfig,
                 dist: Dist | None = None) -> None:
        self.job = job
        self.teacher_ck = load_checkpoint(job.teacher)
        if self.teacher_ck.get("gav_config") is not None or self.teacher_ck.get("distill") is not None:
            raise ValueError(f"{job.teacher}: distillation takes a FlowNP or LFM teacher, not a GAV or distilled model")
        super().__init__(store, out, ModelConfig.from_dict(self.teacher_ck["model_config"]), cfg, dist)
        if self.teacher_ck.get("normalizer") not in (None, self.normalizer.to_dict()):
            raise ValueError(f"{job.teacher}: the teacher was trained on another normalisation than this store's")

    def build(self, model_cfg: ModelConfig) -> tuple[torch.nn.Module, Any, str]:
        teacher = model_from_checkpoint(self.teacher_ck)  # EMA weights
        return DistilledSampler(teacher, self.job.config), self._objective, "distilled"

    @staticmethod
    def _objective(model: torch.nn.Module, batch: TaskBatch, gen: torch.Generator, bf16: bool) -> torch.Tensor:
        student = getattr(model, "module", model)
        fb = flow_space(student, batch)
        return distill_loss(student, fb.xc, fb.yc, fb.xt, gen)

    def payload(self) -> dict[str, Any]:
        lfm_cfg = self.teacher_ck.get("lfm_config")
        return {**super().payload(), "distill": {"config": self.job.config.to_dict(), "teacher_lfm_config": lfm_cfg},
                "teacher": {"path": str(self.job.teacher), "kind": self.teacher_ck.get("kind"),
                            "step": self.teacher_ck.get("step")},
                "exact_density": False}


def distill(teacher: str | Path, data: str | Path, out: str | Path, config: DistillConfig | None = None,
            cfg: TrainConfig | None = None, *, resume: bool = False, progress: bool = True,
            max_minutes: float | None = None) -> dict[str, Any]:
    """Distil the teacher checkpoint into one-step maps on the store at `data`, writing under `out`."""
    cfg = cfg or TrainConfig()
    dist = init_from_env(cfg.device)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": rank_device(cfg.device, dist)})
    trainer = Distiller(Store.open(data), out, DistillJob(str(teacher), config or DistillConfig()), cfg, dist)
    if resume and (Path(out) / "last.pt").exists():
        trainer.resume(Path(out) / "last.pt")
    return trainer.run(progress, max_minutes=max_minutes)
