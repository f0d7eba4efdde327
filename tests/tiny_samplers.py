"""Tiny untrained models of every sampler kind for the tests: a global FlowNP, an LFM and distilled samplers
(of an LFM or of the global flow), as self-describing checkpoints with the embedded default's region,
normaliser and training lineage (so they load, check and convert like a served model), and a helper that
counts checks and cancels a `service.engine.Job` after k of them."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from flownp import default_model
from flownp.checkpoint import load_checkpoint, save_checkpoint
from flownp.core.config import ModelConfig
from flownp.core.lfm import LFM, DistillConfig, DistilledSampler, LFMConfig
from flownp.core.model import FlowNP

TINY = ModelConfig(targets="independent", d_model=16, n_heads=2, n_layers=1, d_ff=16, embed_hidden=16,
                   embed_layers=1, head_hidden=16, space_freqs=4, time_freqs=4)
BLOCKS, GROUP, SEGMENTS = 2, 1, 2  # the LFM's N; the distilled maps: N' = N / group (LFM), segments / group


def _base() -> dict[str, Any]:
    ck = load_checkpoint(default_model.default_paths()[0])
    return {k: v for k, v in ck.items() if k not in ("format", "format_version", "versions", "model", "ema")}


def tiny_module(kind: str, teacher: str = "lfm", seed: int = 0) -> torch.nn.Module:
    """'flownp' | 'lfm' | 'distilled' (of an 'lfm' or 'flownp' teacher), seeded, eval mode."""
    torch.manual_seed(seed)
    if kind == "flownp":
        return FlowNP(TINY).eval()
    if kind == "lfm":
        return LFM(TINY, LFMConfig(n_blocks=BLOCKS)).eval()
    t = tiny_module(teacher, seed=seed)
    return DistilledSampler(t, DistillConfig(group=GROUP, segments=SEGMENTS)).eval()


def tiny_checkpoint(kind: str, teacher: str = "lfm", seed: int = 0,
                    samplers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint dict of `tiny_module(kind, teacher)`, optionally with a recorded sampler comparison."""
    m = tiny_module(kind, teacher, seed)
    ck = {**_base(), "kind": kind, "model_config": TINY.to_dict(), "model": m.state_dict(), "ema": None}
    if kind == "lfm":
        ck["lfm_config"] = m.lfm_config.to_dict()
    if kind == "distilled":
        t = m.teacher
        ck["distill"] = {"config": m.distill_config.to_dict(),
                         "teacher_lfm_config": t.lfm_config.to_dict() if isinstance(t, LFM) else None}
        ck["exact_density"] = False
    if samplers is not None:
        ck["samplers"] = samplers
    return ck


def write_served(ck: dict[str, Any], path: Path) -> Path:
    """Save `ck` at `path` with its `<path>.sha256` sidecar (what FLOWNP_CHECKPOINT needs)."""
    save_checkpoint(path, ck)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    return path


def loaded(kind: str, teacher: str = "lfm", samplers: dict[str, Any] | None = None) -> Any:
    """A flownp.inference.LoadedModel of the tiny model."""
    from flownp.inference import build_model

    return build_model(f"tiny-{kind}", tiny_checkpoint(kind, teacher, samplers=samplers), None, "test")


class CancelAfter:
    """A job check (`service.engine.Job`) that cancels its job at call k + 1, counting calls."""

    def __init__(self, k: int) -> None:
        from service.engine import Job

        self.job, self.k, self.calls = Job(time.monotonic() + 600), k, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls > self.k:
            self.job.cancel()
        self.job()
