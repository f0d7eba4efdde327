"""Robustness of a predictor to corrupted context values, and the sampling steps sweep.

Context noise (docs/protocol.md §9: the GAV paper's robustness test, applied to the context values, normalised
units): `gaussian:S` adds N(0, S^2) to every context value; `salt-pepper:P` replaces each context value,
independently with probability P, by +3 or -3 (a 3-sigma outlier of random sign). Draws are seeded per
batch, so every predictor sees the same corrupted contexts.

Steps sweep (docs/protocol.md §8, the training/inference gap): samples by K explicit Euler steps from fixed
noise, compared with the same noise carried by an adaptive dopri5 solve (the ODE's own sample). Reports
the RMSE between the two per variable in physical units.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterable

import numpy as np
import torch

from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig
from ingest.normalize import Normalizer
from ingest.space import model_units
from ingest.tasks import TaskBatch
from ingest.variables import NAMES

SALT = 3.0  # salt-and-pepper amplitude in normalised units


def parse_noise(spec: str) -> tuple[str, float]:
    """'gaussian:0.1' -> ('gaussian', 0.1); 'salt-pepper:0.05' -> ('salt-pepper', 0.05)."""
    kind, _, arg = spec.partition(":")
    if kind not in ("gaussian", "salt-pepper") or not arg:
        raise ValueError(f"context noise {spec!r}: use gaussian:STD or salt-pepper:PROB")
    try:
        level = float(arg)
    except ValueError:
        raise ValueError(f"context noise {spec!r}: {arg!r} is not a number") from None
    if not math.isfinite(level) or level < 0 or (kind == "salt-pepper" and level > 1):
        raise ValueError(f"context noise {spec!r}: level must be >= 0 (and <= 1 for salt-pepper)")
    return kind, level


def corrupt_context(batch: TaskBatch, spec: str, generator: torch.Generator) -> TaskBatch:
    """The batch with its context values yc (B, n_ctx, D) corrupted as `spec` says."""
    kind, level = parse_noise(spec)
    yc = batch.yc
    if kind == "gaussian":
        noisy = yc + level * torch.randn(yc.shape, generator=generator, dtype=yc.dtype).to(yc.device)
    else:  # drawn on the generator's device (CPU), then moved: the same corruption on every device
        hit = (torch.rand(yc.shape, generator=generator) < level).to(yc.device)
        sign = torch.where(torch.rand(yc.shape, generator=generator) < 0.5, -1.0, 1.0).to(yc.dtype).to(yc.device)
        noisy = torch.where(hit, SALT * sign, yc)
    return replace(batch, yc=noisy)


def corrupted(batches: Iterable[TaskBatch], spec: str, seed: int) -> list[TaskBatch]:
    return [corrupt_context(b, spec, torch.Generator().manual_seed(seed * 100_003 + i)) for i, b in enumerate(batches)]


def robustness_summary(clean: dict[str, Any], noisy: dict[str, Any]) -> dict[str, Any]:
    """Drop in tar_ll (nats/point) and RMSE ratio per variable of a noisy evaluation against the clean one."""
    out = {"tar_ll": noisy["tar_ll"], "tar_ll_drop": clean["tar_ll"] - noisy["tar_ll"]}
    if "rmse" in noisy and "rmse" in clean:
        out["rmse"] = noisy["rmse"]
        out["rmse_ratio"] = {k: noisy["rmse"][k] / clean["rmse"][k] if clean["rmse"][k] > 0 else None
                             for k in noisy["rmse"]}
    return out


@torch.no_grad()
def steps_sweep(model: Any, batches: Iterable[TaskBatch], normalizer: Normalizer,
                steps: tuple[int | SolverConfig, ...], *, n_samples: int = 4, seed: int = 0,
                reference: SolverConfig = SolverConfig("dopri5", rtol=1e-5, atol=1e-5)) -> dict[str, Any]:
    """RMSE (physical units, per variable) between the samples of each solver in `steps` (an int K: Euler
    with K steps, keyed "K"; a SolverConfig: keyed "method:steps") and the reference solve of the same
    noise; also the mean NFE of the reference."""
    dev = next(model.parameters()).device
    std = torch.tensor(normalizer.std, dtype=torch.float32)
    solvers = {(str(k) if isinstance(k, int) else f"{k.method}:{k.steps}"):
               (SolverConfig("euler", k) if isinstance(k, int) else k) for k in steps}
    sse = {k: np.zeros(len(NAMES)) for k in solvers}
    count, ref_nfe, gen = 0, [], torch.Generator().manual_seed(seed)
    for batch in batches:
        b = batch.to(dev)
        y0 = torch.randn((b.xt.shape[0], n_samples, b.xt.shape[1], b.yt.shape[2]), generator=gen, dtype=b.yt.dtype)
        ref = sample(model, b.xc, b.yc, b.xt, n_samples=n_samples, solver=reference, y0=y0.to(dev))
        ref_nfe.append(ref.nfe)
        for k, solver in solvers.items():
            s = sample(model, b.xc, b.yc, b.xt, n_samples=n_samples, solver=solver, y0=y0.to(dev)).samples
            sse[k] += ((s - ref.samples).cpu().float() * std).pow(2).sum((0, 1, 2)).double().numpy()
        count += y0.shape[0] * y0.shape[1] * y0.shape[2]
    return {
        "reference": reference.describe(), "reference_nfe_mean": float(np.mean(ref_nfe)),
        "n_samples": n_samples, "units": model_units(),
        "rmse_to_reference": {k: dict(zip(NAMES, np.sqrt(sse[k] / count).tolist())) for k in solvers},
    }
