"""The embedded default model: a small FlowNP on a per-task GP base (docs/protocol.md §10), trained on the
SYNTHETIC broad weather prior (never on ERA5), shipped as package data of flownp (so the Jupyter API and the
service both have it without importing each other). Its figures on the one real ERA5 map
(bench/real_era5.py) are in its manifest.

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


DESCRIPTION = ("FlowNP on a per-task Gaussian-process base (context standardisation, per-variable GP posterior "
               "fitted on each request's context, symmetric whitening, residual flow), pretrained on the "
               "SYNTHETIC broad weather prior (not on ERA5). On the one real ERA5 map of the benchmark it beats "
               "IDW and a fitted GP; see real_map below and docs/results.md.")
TRAINED_ON = ("flownp-ingest synthesize --law broad --years 1986-1989 --months 1-12 --days 1-21 "
              "--hours 0,6,12,18 --seed 0 (train 1986-87: 2016 maps)")


def pack(run_checkpoint: Path, out: Path, recipe: str, *, trained_on: str = TRAINED_ON,
         description: str = DESCRIPTION, real_map: dict[str, Any] | None = None) -> dict[str, Any]:
    """Strip a training checkpoint to what serving needs (EMA weights as `model`, no optimizer state),
    save it as `out/default.pt` and write `out/default.json` with its sha256, what it was trained on and
    (`real_map`) its real-ERA5 benchmark figures."""
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
        "description": description,
        "file": CHECKPOINT, "sha256": sha256_file(ckpt_path), "bytes": ckpt_path.stat().st_size,
        "n_parameters": n_params, "step": ck.get("step"), "best_val_loss": ck.get("best_val"),
        "model_config": ck.get("model_config"),
        "real_map": real_map,
        "trained_on": {"data": trained_on,
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
    pk.add_argument("--real-map", type=Path, default=None,
                    help="JSON of bench/real_era5.py on this checkpoint: its figures go into the manifest")
    args = p.parse_args(argv)
    real = None
    if args.real_map is not None:
        real = real_map_summary(json.loads(args.real_map.read_text()))
    print(json.dumps(pack(args.checkpoint, args.out, args.recipe, real_map=real), indent=2))


def real_map_summary(bench: dict[str, Any]) -> dict[str, Any]:
    """The FlowNP rows of a bench/real_era5.py JSON (RMSE per variable, log-likelihood per point, coverage, in
    ERA5 units) per regime, with the note that it is one map."""
    out: dict[str, Any] = {"note": "ONE real ERA5 map (1995-07-14 12 UTC), evaluation only; bench/real_era5.py",
                           "units": "RMSE Pa (sp), K (t2m), m/s (u10, v10); log-lik nats per target point over "
                                    "ERA5 units"}
    for regime, res in bench.get("regimes", {}).items():
        rows = {k: v for k, v in res.get("era5", {}).items() if k.startswith("FlowNP")}
        if rows:
            r = next(iter(rows.values()))
            out[regime] = {"n_ctx": res.get("n_ctx_range"), "splits": res.get("n_splits"), "rmse": r.get("rmse"),
                           "log_lik": r.get("log_lik"), "cov90": r.get("cov90")}
            gp = res.get("era5", {}).get("GP (fitted)")
            if gp:
                out[regime]["fitted_gp"] = {"rmse": gp.get("rmse"), "log_lik": gp.get("log_lik")}
    return out


if __name__ == "__main__":
    main()
