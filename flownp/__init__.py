"""FlowNP for weather fields, in four parts (README "Layout of the code"):

- `flownp.core`: the model on normalised tensors (pure torch: config, encoding, model, paths, solvers,
  likelihood, sampling, gav); it imports nothing else of the project;
- `flownp.checkpoint`, `flownp.inference`, `flownp.registry`, `flownp.default_model`: the library between
  the core and its front ends (verified loading, the model with its ModelSpace, sampling and
  log-likelihoods in ERA5 units);
- `flownp.api`: the notebook face (xarray in, xarray out);
- `flownp.jobs`: training, fine-tuning, evaluation, retraining and the `flownp` CLI.

The public names below are imported lazily (on first use), so `import flownp` loads nothing heavy.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ingest import __version__

_PUBLIC = {
    "FlowNP": "flownp.core.model",
    "ModelConfig": "flownp.core.config",
    "SolverConfig": "flownp.core.solvers",
    "sample": "flownp.core.sampling",
    "log_likelihood": "flownp.core.likelihood",
    "load_checkpoint": "flownp.checkpoint",
    "load_verified": "flownp.checkpoint",
    "LoadedModel": "flownp.inference",
    "Extrapolator": "flownp.api",
    "Registry": "flownp.registry",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'flownp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
