"""The embedded default model: a small FlowNP trained on SYNTHETIC GP weather, shipped as package data
of flownp (so the Jupyter API and the service both have it without importing each other).

Files (flownp/models/): `default.pt` (a self-describing checkpoint, EMA weights only) and `default.json`
(its manifest: sha256, what it was trained on, the recipe). Rebuild with scripts/build_default_model.sh,
which ends in `python -m flownp.default_model pack RUN/best.pt --out flownp/models`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ingest.io import atomic_path, sha256_file

MODELS_DIR = Path(__file__).resolve().parent / "models"
CHECKPOINT = "default.pt"
MANIFEST = "default.json"
VERSION = "synthetic-default"


def default_paths(root: Path | None = None) -> tuple[Path, Path]:
    """(checkpoint, manifest) of the embedded model."""
    root = root or MODELS_DIR
    return root / CHECKPOINT, root / MANIFEST


def read_manifest(root: Path | None = None) -> dict[str, Any]:
    return json.loads(default_paths(root)[1].read_text())


def pack(run_checkpoint: Path, out: Path, recipe: str) -> dict[str, Any]:
    """Strip a training checkpoint to what serving needs (EMA weights as `model`, no optimizer state),
    save it as `out/default.pt` and write `out/default.json` with its sha256."""
    from flownp.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(run_checkpoint)
    keep = {k: v for k, v in ck.items()
            if k not in ("format", "format_version", "versions", "optimizer", "scheduler", "ema", "model")}
    keep["model"] = ck["ema"] if ck.get("ema") is not None else ck["model"]
    keep["ema"] = None
    ckpt_path, man_path = default_paths(out)
    save_checkpoint(ckpt_path, keep)
    n_params = sum(int(t.numel()) for t in keep["model"].values())
    manifest = {
        "version": VERSION, "synthetic": True,
        "description": "SYNTHETIC demo model: a small FlowNP trained on generated GP weather (not ERA5). "
                       "It shows the service working; its numbers say nothing about real weather.",
        "file": CHECKPOINT, "sha256": sha256_file(ckpt_path), "bytes": ckpt_path.stat().st_size,
        "n_parameters": n_params, "step": ck.get("step"), "best_val_loss": ck.get("best_val"),
        "trained_on": {"data": "flownp-ingest synthesize --years 1986,1988,1989 --days 1-4 --seed 0",
                       "store_manifest_sha256": ck.get("store_manifest_sha256"),
                       "task_config": ck.get("task_config")},
        "recipe": recipe, "versions": ck.get("versions"),
    }
    with atomic_path(man_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flownp.default_model")
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="Pack a training checkpoint as the embedded default model.")
    pk.add_argument("checkpoint", type=Path)
    pk.add_argument("--out", type=Path, default=MODELS_DIR)
    pk.add_argument("--recipe", default="scripts/build_default_model.sh")
    args = p.parse_args(argv)
    print(json.dumps(pack(args.checkpoint, args.out, args.recipe), indent=2))


if __name__ == "__main__":
    main()
