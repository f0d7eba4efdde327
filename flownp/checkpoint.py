"""Self-describing checkpoints: plain dicts that rebuild the model and load with weights_only=True.

Contents: kind, format version, model config (dict; for LFM and distilled models the blocks' config, with
`lfm_config` / `distill` describing the composition), weights, EMA weights, optimizer and scheduler
state, step, train config (dict), normaliser (dict), region (dict), the store manifest's sha256,
versions (package, torch), and free-form `extra` (e.g. the base checkpoint of a fine-tune).
`load_verified` is the one verified load (read once, sha256, then weights_only=True of those bytes);
`lineage_n_ctx_min` the one reader of a checkpoint's training-lineage context minimum.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from flownp import __version__
from flownp.core.config import ModelConfig
from flownp.core.model import FlowNP
from ingest.io import fsync_dir, remove_stale_parts

FORMAT = "flownp-weather-checkpoint"
FORMAT_VERSION = 1


class LoadError(RuntimeError):
    """A configured model could not be loaded (missing file, sha256 mismatch, foreign file)."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plain types and tensors only) atomically: temporary name, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "versions": {"flownp_weather": __version__, "torch": str(torch.__version__)}, **payload}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            torch.save(full, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    remove_stale_parts(path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True (no code runs). Raises ValueError for a foreign file."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {ckpt['format_version']} is newer than this code")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], *, ema: bool = True) -> FlowNP:
    """Rebuild the model from what the checkpoint stores (EMA weights when present and asked for): a
    FlowNP, a FlowNP with a GAV residual when the checkpoint holds a `gav_config`, a Local Flow Matching
    model (every block) when it holds an `lfm_config`, or a distilled sampler with its teacher when it holds
    `distill` (flownp.core.lfm). Checkpoints without these keys load as before."""
    model: Any = FlowNP(ModelConfig.from_dict(ckpt["model_config"]))
    if ckpt.get("lfm_config") is not None or ckpt.get("distill") is not None:
        from flownp.core.lfm import build_from_config

        model = build_from_config(ckpt["model_config"], ckpt.get("lfm_config"), ckpt.get("distill"))
    elif ckpt.get("gav_config") is not None:
        from flownp.core.gav import GAVConfig, GAVFlowNP

        model = GAVFlowNP(model, GAVConfig.from_dict(ckpt["gav_config"]))
    state = ckpt.get("ema") if ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(state)
    return model.eval()


def load_verified(path: str | Path, sha256: str, what: str) -> tuple[dict[str, Any], str]:
    """(checkpoint, sha256): read the file once, check its sha256 against the recorded one, then torch.load
    (weights_only=True) those same bytes. LoadError (naming `what`, never the path) on any failure."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LoadError(f"{what}: cannot read the checkpoint ({exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.strip().lower():
        raise LoadError(f"{what}: sha256 mismatch (file {digest[:12]}..., manifest {sha256[:12]}...)")
    try:
        return load_checkpoint(io.BytesIO(data)), digest
    except Exception as exc:  # foreign or corrupt file
        raise LoadError(f"{what}: not a loadable checkpoint ({type(exc).__name__})") from None


def lineage_n_ctx_min(ck: dict[str, Any]) -> int | None:
    """The fewest context points any stage of a checkpoint's training lineage was trained on: its own
    `task_config.n_ctx_min` and, for a fine-tune, `trained_n_ctx_min` (the minimum over its base's lineage,
    recorded by `FineTuner.payload`). A model fine-tuned on n_ctx 950-1000 from a base pretrained on
    50-1000 has 50. None when the checkpoint records neither (older checkpoints)."""
    vals = ((ck.get("task_config") or {}).get("n_ctx_min"), ck.get("trained_n_ctx_min"))
    ok = [int(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    return min(ok) if ok else None
