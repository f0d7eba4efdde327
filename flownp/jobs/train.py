"""Flow-matching pretraining: a flat, readable loop (AdamW, warm-up + cosine, clipping, EMA, seeded).

Every random draw is a function of (seed, rank, step): the task stream comes from ingest.tasks
(seed, epoch, batch) and the path noise from a generator seeded with (seed, rank, step), so `--resume`
continues exactly as an uninterrupted run would. DDP-ready: torchrun's environment is detected, rank 0
alone logs and writes checkpoints (atomically).
Run: `flownp pretrain --data STORE --out RUN` or `torchrun --nproc-per-node=N -m flownp.jobs.cli pretrain ...`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from flownp.checkpoint import load_checkpoint, save_checkpoint
from flownp.core.config import ModelConfig
from flownp.jobs.distributed import Dist, init_from_env, rank_device
from flownp.core.model import FlowNP
from flownp.core.paths import PathSample, flow_matching_loss, sample_path, scaled_frame
from flownp.core.sampling import task_transform
from ingest.configs import DictConfig
from ingest.store import Store
from ingest.tasks import TaskBatch, TaskConfig, TaskSampler

LOG = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Optimisation settings (docs/protocol.md §7: Adam 5e-4, cosine decay, batch 100)."""

    steps: int = 1000
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: int = 100
    schedule: str = "cosine"  # cosine (pretraining) or constant (fine-tuning) after the warm-up
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    batch_size: int = 16
    n_ctx_min: int = 2
    n_ctx_max: int = 1199
    n_tgt: int | None = None
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    val_batches: int = 4
    device: str = "cpu"
    bf16: bool = False
    float16_parity: bool = False
    path_draws: int = 1  # flow-matching pretraining: (noise, time) draws per target and step (fm_loss)

    def __post_init__(self) -> None:
        if self.path_draws < 1:
            raise ValueError(f"path_draws must be >= 1, got {self.path_draws}")

    def tasks(self, seed_offset: int = 0) -> TaskConfig:
        return TaskConfig(self.n_ctx_min, self.n_ctx_max, self.n_tgt, self.batch_size, self.seed + seed_offset)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at cfg.steps (or constant)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def flow_space(model: torch.nn.Module, batch: TaskBatch) -> TaskBatch:
    """The batch as the model's flow sees it: with a per-task transform (standardisation, GP base), the
    standardised context and the transformed targets; otherwise the batch itself."""
    tr = task_transform(getattr(model, "module", model), batch.xc, batch.yc, batch.xt)
    if tr is None:
        return batch
    return dataclasses.replace(batch, yc=tr.context(batch.yc), yt=tr.forward(batch.yt))


def model_path(model: torch.nn.Module, y1: torch.Tensor, gen: torch.Generator) -> PathSample:
    """A flow-matching path sample for flow-space targets y1, in the frame the model's velocity lives in."""
    path = sample_path(y1, generator=gen)
    return scaled_frame(path) if getattr(model, "module", model).config.velocity == "residual" else path


def fm_loss(model: torch.nn.Module, batch: TaskBatch, gen: torch.Generator, bf16: bool = False,
            draws: int = 1) -> torch.Tensor:
    """Flow-matching loss of one batch (noise and times from `gen`), in the model's flow space: with a
    per-task transform the path runs between N(0, I) and the transformed targets, conditioned on the
    standardised context. draws > 1: that many (noise, time) draws per target, sharing one context encoding
    (and, arch='pointwise', one pass of the targets' locations): an unbiased loss of lower variance."""
    fb = flow_space(model, batch)
    y1 = fb.yt if draws == 1 else fb.yt.unsqueeze(1).expand(-1, draws, -1, -1)  # (B[, K], n_tgt, D)
    path = model_path(model, y1, gen)
    with torch.autocast(batch.yt.device.type, dtype=torch.bfloat16, enabled=bf16):
        v = model(fb.xc, fb.yc, fb.xt, path.yt, path.t)
    return flow_matching_loss(v.float(), path)


def _gen(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))


Objective = Callable[[torch.nn.Module, TaskBatch, torch.Generator, bool], torch.Tensor]


def build_model(config: ModelConfig | Any) -> tuple[torch.nn.Module, Objective, str]:
    """(model, its training objective, checkpoint kind) for a FlowNP ModelConfig (flow matching) or a
    neural baseline's config (Gaussian NLL)."""
    if isinstance(config, ModelConfig):
        return FlowNP(config), fm_loss, "pretrain"
    from flownp.jobs.baselines.neural import nll_loss

    return config.build(), nll_loss, "baseline"


@torch.no_grad()
def validation_loss(model: torch.nn.Module, sampler: TaskSampler, n: int, device: str, seed: int,
                    objective: Objective = fm_loss) -> float:
    """Training objective on the first n batches of a fixed validation stream with fixed noise."""
    losses = []
    for i in range(min(n, len(sampler))):
        losses.append(objective(model, sampler[i].to(device), _gen(seed, 99, i), False).item())
    return float(np.mean(losses))


class Trainer:
    """Owns the model, optimiser, EMA and data of one training run: FlowNP pretraining by flow matching
    (a ModelConfig) or a neural baseline by maximum likelihood (a NeuralBaselineConfig)."""

    def __init__(self, store: Store, out: str | Path, model_cfg: ModelConfig | Any, cfg: TrainConfig,
                 dist: Dist | None = None) -> None:
        self.store, self.out, self.cfg = store, Path(out), cfg
        self.dist = dist or Dist()
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model, self.objective, self.kind = self.build(model_cfg)
        if cfg.path_draws > 1:
            if self.objective is not fm_loss or type(model) is not FlowNP:
                raise ValueError("path_draws > 1 applies to flow-matching pretraining only")
            self.objective = functools.partial(fm_loss, draws=cfg.path_draws)
        self.model = model.to(self.device)
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        # what the objective calls (the model itself, or a module around it, e.g. a K-step decoder)
        self.module = self.training_module().to(self.device)
        self.net: torch.nn.Module = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        groups = self.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.normalizer = store.normalizer
        _, train = store.load("train", float16_parity=cfg.float16_parity)
        xy = store.region.circle_xy
        self.sampler = TaskSampler(train, xy, cfg.tasks(), rank=self.dist.rank, world=self.dist.world)
        _, valid = store.load("valid", float16_parity=cfg.float16_parity)
        self.val_sampler = TaskSampler(valid, xy, cfg.tasks(1000)) if len(valid) else None
        self.step = 0
        self.best_val = math.inf

    # ---- hooks (fine-tuning overrides them) ---------------------------------------------------
    def build(self, model_cfg: ModelConfig | Any) -> tuple[torch.nn.Module, Objective, str]:
        return build_model(model_cfg)

    def training_module(self) -> torch.nn.Module:
        return self.model

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups; a group's `lr_scale` multiplies the scheduled learning rate."""
        return [{"params": [p for p in self.module.parameters() if p.requires_grad]}]

    def validate(self) -> float:
        return validation_loss(self.ema, self.val_sampler, self.cfg.val_batches, str(self.device), self.cfg.seed,
                               self.objective)

    # ---- checkpoints ------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "model_config": self.model.config.to_dict(),
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(), "step": self.step, "best_val": self.best_val,
            "train_config": self.cfg.to_dict(), "normalizer": self.normalizer.to_dict(),
            "region": self.store.region.to_dict(), "store_manifest_sha256": self.store.manifest_sha256,
            "task_config": self.cfg.tasks().to_dict(),
        }

    def save(self, name: str = "last.pt") -> None:
        if self.dist.is_main:
            save_checkpoint(self.out / name, self.payload())

    def resume(self, path: str | Path) -> None:
        ck = load_checkpoint(path, map_location=self.device)
        if ck["model_config"] != self.model.config.to_dict():
            raise ValueError(f"{path}: model config differs from this run's")
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step, self.best_val = int(ck["step"]), float(ck["best_val"])
        self._check_store(path, ck)

    def _check_store(self, path: str | Path, ck: dict[str, Any]) -> None:
        """Refuse when the store's normaliser differs from the checkpoint's (its weights live in those
        units); warn (not refuse: a job may rerun on a store that new non-train files were ingested into)
        when only the store differs: the resumed task stream is then not the one an uninterrupted run
        would have drawn."""
        was, now = ck.get("store_manifest_sha256"), self.store.manifest_sha256
        if ck.get("normalizer") is not None and ck["normalizer"] != self.normalizer.to_dict():
            # the weights were trained in other units: continuing would silently mix two normalisations
            raise ValueError(f"{path}: the store's normaliser changed since this checkpoint (new train-year "
                             f"data?): resuming would train its weights in other units; start a new run "
                             f"(the retraining job's `init: current` continues from a model in a new run)")
        if was == now:
            return
        msg = (f"resuming {path} on a changed store: the checkpoint was trained on store manifest sha256 {was}, "
               f"the store at {self.store.path} now has {now}; the resumed task stream differs from an "
               f"uninterrupted run's")
        if self.dist.is_main:
            LOG.warning(msg)
            if self.out.is_dir():
                with open(self.out / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, "warning": "store changed on resume",
                                        "checkpoint_store_manifest_sha256": was,
                                        "store_manifest_sha256": now}) + "\n")

    # ---- loop -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        epoch, i = divmod(self.step, len(self.sampler))
        if epoch != self.sampler.epoch:
            self.sampler.set_epoch(epoch)
        batch = self.sampler[i].to(self.device)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, cfg) * g.get("lr_scale", 1.0)
        self.net.train()
        loss = self.objective(self.net, batch, _gen(cfg.seed, self.dist.rank, self.step), cfg.bf16)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(pm, 1 - d)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": float(gnorm), "lr": lr_at(self.step - 1, cfg),
                "n_ctx": batch.xc.shape[1], "tasks": batch.xc.shape[0]}

    def run(self, progress: bool = True, stop_at: int | None = None,
            max_minutes: float | None = None) -> dict[str, Any]:
        """Train to cfg.steps, or stop early at step `stop_at` (as a crash would, for tests) or once
        `max_minutes` of wall time have passed (then last.pt is written, so `--resume` continues exactly:
        for preemptible or time-limited machines)."""
        cfg, log = self.cfg, self.out / "log.jsonl"
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.kind, disable=not (progress and self.dist.is_main))
        t0, tasks, last = time.perf_counter(), 0, {}
        while self.step < (stop_at or cfg.steps):
            rec = self.train_step()
            tasks += rec["tasks"]
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                rec = {"step": self.step, **rec, "loss": self.dist.all_mean(rec["loss"]),
                       "tasks_per_s": tasks * self.dist.world / (time.perf_counter() - t0)}
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if self.dist.is_main:
                    with open(log, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                last = rec
            # the stop is decided together (one tiny all-reduce under torchrun, nothing otherwise): each rank's
            # clock differs, and a rank stopping alone would leave the others blocked in DDP's all-reduce
            if max_minutes is not None and self.step < cfg.steps \
                    and self.dist.any(time.perf_counter() - t0 > 60 * max_minutes):
                self.save("last.pt")
                if self.dist.is_main:
                    with open(log, "a") as f:
                        f.write(json.dumps({"step": self.step, "stopped": "time budget"}) + "\n")
                last = {**last, "stopped_at": self.step}
                break
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                if self.val_sampler is not None:
                    val = self.validate()
                    if self.dist.is_main:
                        with open(log, "a") as f:
                            f.write(json.dumps({"step": self.step, "val_loss_ema": val}) + "\n")
                    if val < self.best_val:
                        self.best_val = val
                        self.save("best.pt")
                self.save("last.pt")
        bar.close()
        return last


def pretrain(data: str | Path, out: str | Path, model_cfg: ModelConfig | Any = None,
             cfg: TrainConfig | None = None, *, resume: bool = False, progress: bool = True,
             max_minutes: float | None = None) -> dict[str, Any]:
    """Train on the store at `data`, writing log.jsonl, last.pt and best.pt under `out`: FlowNP by flow
    matching (default) or, given a NeuralBaselineConfig, a CNP / TNP-A by maximum likelihood."""
    cfg = cfg or TrainConfig()
    dist = init_from_env(cfg.device)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": rank_device(cfg.device, dist)})
    trainer = Trainer(Store.open(data), out, model_cfg or ModelConfig(), cfg, dist)
    if resume and (Path(out) / "last.pt").exists():
        trainer.resume(Path(out) / "last.pt")
    return trainer.run(progress, max_minutes=max_minutes)
