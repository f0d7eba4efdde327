"""Python API for analysis (Jupyter): extrapolate xarray observations in ERA5 units with a FlowNP model.

    from flownp.api import Extrapolator
    ex = Extrapolator.from_registry("registry")            # or .from_checkpoint("run/best.pt"), .from_default()
    ctx = ex.circle_dataset(values, index)                  # or any Dataset with latitude/longitude
    out = ex.extrapolate(ctx, targets="circle", num_samples=16)
    out.t2m.mean("sample"); out.log_likelihood

Datasets have one dimension `point` with coordinates `latitude`, `longitude` (degrees north / east,
-180..180) and data variables `sp` [Pa], `t2m` [K], `u10`, `v10` [m s-1] (ERA5 units). Points must lie in
the disc the model was trained on (`Region.in_circle`, the service's rule too), and a context needs at least
`Extrapolator.min_context` points, the fewest the model was trained on in any stage (the service's
`too_few` rule, from `flownp.jobs.finetune.lineage_n_ctx_min`). Conversion to the model's
space and the log-Jacobian to ERA5 units are the service's (service.convert, through ingest.variables and the
checkpoint's normaliser), so both answer the same. Log-likelihoods are in nats for the values in ERA5 units
(a density over Pa, K, m s-1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from flownp.jobs.evaluate import parse_solver
from flownp.jobs.finetune import lineage_n_ctx_min
from flownp.core.likelihood import log_likelihood
from flownp.core.sampling import sample
from ingest.normalize import Normalizer
from ingest.region import Region
from ingest.variables import BY_NAME, NAMES, era5_to_model
from service import convert


class Extrapolator:
    """A loaded model with its normaliser and region. Shapes inside: context (1, n_ctx, 2|4)."""

    def __init__(self, model: Any, normalizer: Normalizer, region: Region, meta: dict[str, Any] | None = None,
                 trained_min_context: int | None = None):
        self.model, self.normalizer, self.region, self.meta = model.eval(), normalizer, region, meta or {}
        self._log_jac = convert.log_jacobian(normalizer)  # log |d normalised / d ERA5 units| per point
        # fewest context points accepted: the smallest n_ctx of the model's training lineage (as the service)
        self.min_context = max(1, trained_min_context or 0)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Extrapolator":
        from flownp.checkpoint import load_checkpoint, model_from_checkpoint

        ck = load_checkpoint(path)
        return cls(model_from_checkpoint(ck), Normalizer.from_dict(ck["normalizer"]), Region.from_dict(ck["region"]),
                   {"checkpoint": str(path), "kind": ck.get("kind"), "step": ck.get("step")},
                   lineage_n_ctx_min(ck))

    @classmethod
    def from_default(cls) -> "Extrapolator":
        """The service's embedded default model (SYNTHETIC: trained on generated GP weather, not ERA5),
        its sha256 checked against its manifest before loading, as the service does."""
        from flownp.checkpoint import model_from_checkpoint
        from service.engine import default_checkpoint  # lazy: the engine pulls in the web stack

        ck, digest, man = default_checkpoint()
        return cls(model_from_checkpoint(ck), Normalizer.from_dict(ck["normalizer"]), Region.from_dict(ck["region"]),
                   {"version": man["version"], "synthetic": True, "sha256": digest, "kind": ck.get("kind"),
                    "step": ck.get("step"), "description": man.get("description")}, lineage_n_ctx_min(ck))

    @classmethod
    def from_registry(cls, root: str | Path, version: str | None = None) -> "Extrapolator":
        from flownp.registry import Registry

        reg = Registry(root)
        ex = cls.from_checkpoint(reg.model_path(version))
        ex.meta["version"] = version or reg.current()
        return ex

    # ---- conversions (the one place: ERA5 units <-> normalised model space) -------------------
    def _xy(self, ds: xr.Dataset) -> torch.Tensor:
        for c in ("latitude", "longitude"):
            if c not in ds.coords and c not in ds:
                raise ValueError(f"dataset needs a '{c}' coordinate (degrees)")
        lat, lon = np.asarray(ds["latitude"], float), np.asarray(ds["longitude"], float)
        if np.any(lon > 180):
            raise ValueError("longitudes must be in -180..180 degrees east (got 0..360 values)")
        r = self.region
        inside = r.in_circle(lat, lon)
        if not inside.all():
            raise ValueError(f"{int((~inside).sum())} points lie outside the model's region (the disc within "
                             f"{r.radius_degrees:g} degrees of {r.centre_lat:g} N, {r.centre_lon:g} E)")
        return torch.from_numpy(self.region.to_model(lon, lat).astype(np.float32))

    def _check_context_size(self, context: xr.Dataset) -> None:
        """ValueError when the context has fewer points than the model was trained on (the service's 422
        too_few): below it the model extrapolates outside its training distribution."""
        if "latitude" not in context.coords and "latitude" not in context:
            return  # _xy says what is missing
        n = int(np.asarray(context["latitude"]).size)
        if n < self.min_context:
            raise ValueError(f"context has {n} point(s); this model needs at least {self.min_context} "
                             "(the fewest it was trained on)")

    def _values(self, ds: xr.Dataset) -> torch.Tensor:
        missing = [n for n in NAMES if n not in ds]
        if missing:
            raise ValueError(f"dataset lacks variables {missing} (ERA5 short names, ERA5 units)")
        era5 = np.stack([np.asarray(ds[n], float) for n in NAMES], -1)
        model_units = era5_to_model(era5)  # for the range check only
        for j, n in enumerate(NAMES):
            lo, hi = BY_NAME[n].plausible
            if not np.all(np.isfinite(model_units[:, j])) or np.any((model_units[:, j] < lo) | (model_units[:, j] > hi)):
                raise ValueError(f"{n}: values must be finite and physical in {BY_NAME[n].era5_units}")
        return torch.from_numpy(convert.era5_to_normalised(era5, self.normalizer))

    def _to_era5(self, y: np.ndarray) -> np.ndarray:
        """Normalised (..., 4) -> ERA5 units (..., 4)."""
        return convert.normalised_to_era5(y, self.normalizer)

    # ---- datasets ---------------------------------------------------------------------------
    def circle_dataset(self, values_era5: np.ndarray | None = None, index: np.ndarray | None = None) -> xr.Dataset:
        """The region's circle points (or a subset `index`) as a Dataset, with values (P, 4) in ERA5 units."""
        idx = np.arange(self.region.n_points) if index is None else np.asarray(index)
        ds = xr.Dataset(coords={"latitude": ("point", self.region.circle_lat[idx]),
                                "longitude": ("point", self.region.circle_lon[idx])})
        if values_era5 is not None:
            for j, n in enumerate(NAMES):
                ds[n] = ("point", np.asarray(values_era5)[..., j], {"units": BY_NAME[n].era5_units})
        return ds

    def _targets(self, context: xr.Dataset, targets: xr.Dataset | str) -> xr.Dataset:
        if isinstance(targets, str):
            if targets != "circle":
                raise ValueError("targets: a Dataset of points or 'circle'")
            key = lambda lat, lon: set(zip(np.round(lat, 4).tolist(), np.round(lon, 4).tolist()))  # noqa: E731
            taken = key(np.asarray(context["latitude"], float), np.asarray(context["longitude"], float))
            circle = zip(np.round(self.region.circle_lat, 4).tolist(), np.round(self.region.circle_lon, 4).tolist())
            rest = np.array([i for i, p in enumerate(circle) if p not in taken], dtype=int)
            if rest.size == 0:
                raise ValueError("the context covers every circle point: no 'circle' targets are left")
            return self.circle_dataset(index=rest)
        return targets

    # ---- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def extrapolate(self, context: xr.Dataset, targets: xr.Dataset | str = "circle", *, num_samples: int = 8,
                    solver: str = "euler:16", seed: int = 0, with_log_likelihood: bool = True,
                    ll_solver: str = "midpoint:50") -> xr.Dataset:
        """Samples (sample, point) of the four variables at the targets, in ERA5 units, with each sample's
        joint log-likelihood given the context."""
        self._check_context_size(context)
        tg = self._targets(context, targets)
        xc, yc, xt = self._xy(context)[None], self._values(context)[None], self._xy(tg)[None]
        smp = sample(self.model, xc, yc, xt, n_samples=num_samples, solver=parse_solver(solver),
                     generator=torch.Generator().manual_seed(seed)).samples[0]  # (S, n, 4)
        out = tg[["latitude", "longitude"]].copy()
        era5 = self._to_era5(smp.numpy())
        for j, n in enumerate(NAMES):
            out[n] = (("sample", "point"), era5[..., j], {"units": BY_NAME[n].era5_units})
        if with_log_likelihood:
            ll = log_likelihood(self.model, xc.expand(num_samples, -1, -1), yc.expand(num_samples, -1, -1),
                                xt.expand(num_samples, -1, -1), smp, solver=parse_solver(ll_solver), estimator="auto")
            out["log_likelihood"] = ("sample", ll.joint.numpy() + xt.shape[1] * self._log_jac,
                                     {"units": "nats", "estimator": ll.estimator, "solver": ll.solver})
        out.attrs.update({"sampler": solver, "seed": seed, "n_context": int(xc.shape[1]),
                          "model": str(self.meta.get("version") or self.meta.get("checkpoint", ""))})
        return out

    def log_likelihood(self, context: xr.Dataset, observed: xr.Dataset, *, solver: str = "midpoint:100",
                       estimator: str = "auto", n_probes: int = 1) -> xr.Dataset:
        """Joint log-likelihood (nats, ERA5 units) of observed values at their points given the context."""
        self._check_context_size(context)
        xc, yc = self._xy(context)[None], self._values(context)[None]
        xt, yt = self._xy(observed)[None], self._values(observed)[None]
        res = log_likelihood(self.model, xc, yc, xt, yt, solver=parse_solver(solver), estimator=estimator,
                             n_probes=n_probes)
        joint = float(res.joint[0]) + xt.shape[1] * self._log_jac
        return xr.Dataset({"log_likelihood": ((), joint, {"units": "nats"}),
                           "log_likelihood_per_point": ((), joint / xt.shape[1], {"units": "nats"})},
                          attrs={"estimator": res.estimator, "solver": res.solver, "n_probes": res.n_probes})


def plot_fields(out: xr.Dataset, truth: xr.Dataset | None = None, context: xr.Dataset | None = None,
                path: str | None = None) -> Any:
    """Rows: variables; columns: truth (if given), sample mean, sample std. Returns the figure."""
    import matplotlib.pyplot as plt

    cols = ([("truth", truth)] if truth is not None else []) + [("mean", out.mean("sample")), ("std", out.std("sample"))]
    fig, axes = plt.subplots(len(NAMES), len(cols), figsize=(4 * len(cols), 3.2 * len(NAMES)), squeeze=False)
    for i, n in enumerate(NAMES):
        for j, (title, ds) in enumerate(cols):
            ax = axes[i, j]
            sc = ax.scatter(ds["longitude"], ds["latitude"], c=ds[n], s=8, cmap="viridis")
            if context is not None:
                ax.scatter(context["longitude"], context["latitude"], s=1, c="k", alpha=0.4)
            ax.set_title(f"{n} {title} [{BY_NAME[n].era5_units}]", fontsize=9)
            ax.set_aspect("equal")
            fig.colorbar(sc, ax=ax, shrink=0.8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=80)
    return fig


def calibration(out: xr.Dataset, truth: xr.Dataset, levels: tuple[float, ...] = (0.5, 0.8, 0.9)) -> xr.Dataset:
    """Fraction of truth values inside the central `levels` intervals of the samples, per variable."""
    rows = {}
    for n in NAMES:
        s, y = out[n].values, np.asarray(truth[n])
        rows[n] = ("level", [float(np.mean((y >= np.quantile(s, (1 - q) / 2, axis=0)) &
                                            (y <= np.quantile(s, (1 + q) / 2, axis=0)))) for q in levels])
    return xr.Dataset(rows, coords={"level": list(levels)})
