"""Python API for analysis (Jupyter): extrapolate xarray observations in ERA5 units with a FlowNP model.

    from flownp.api import Extrapolator
    ex = Extrapolator.from_registry("registry")            # or .from_checkpoint("run/best.pt"), .from_default()
    ctx = ex.circle_dataset(values, index)                  # or any Dataset with latitude/longitude
    out = ex.extrapolate(ctx, targets="circle", num_samples=16)   # the model's default sampler
    out.t2m.mean("sample"); out.log_likelihood
    ex.samplers["offered"]; ex.extrapolate(ctx, sampler="distilled")  # "ode", "lfm", "distilled": what it offers

Datasets have one dimension `point` with coordinates `latitude`, `longitude` (degrees north / east,
-180..180) and data variables `sp` [Pa], `t2m` [K], `u10`, `v10` [m s-1] (ERA5 units). Points must lie in
the disc the model was trained on, and a context needs at least `Extrapolator.min_context` points, the
fewest the model was trained on in any stage. This module is a thin xarray face over `flownp.inference`
(the loaded model, sampling, log-likelihoods) and `ingest.space.ModelSpace` (every conversion, the region
and range checks, the circle targets): the service calls the same two, so both answer the same. Domain
errors are `ingest.space.DomainError` (a ValueError, with the service's 422 code). Log-likelihoods are in
nats over ERA5 units (a density over Pa, K, m s-1), labelled in their `units` attribute (docs/protocol.md §6),
and say who scored them (`scored_by`) and whether they are the samples' exact density (`exact_density`: 0
for a distilled sampler's samples, scored by its teacher).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from flownp import inference
from flownp.inference import LL_KIND, LL_UNITS, LoadedModel, parse_solver
from ingest.normalize import Normalizer
from ingest.region import Region
from ingest.space import DomainError, ModelSpace
from ingest.variables import BY_NAME, NAMES

__all__ = ["Extrapolator", "calibration", "plot_fields"]


class Extrapolator:
    """A loaded model (`flownp.inference.LoadedModel`: network, ModelSpace, lineage facts) with xarray in
    and out. Shapes inside: context (1, n_ctx, 2|4)."""

    def __init__(self, loaded: LoadedModel, meta: dict[str, Any] | None = None) -> None:
        self.loaded, self.meta = loaded, meta or {}
        self.model: Any = loaded.model.eval()
        self.space: ModelSpace = loaded.space
        self.normalizer: Normalizer = loaded.normalizer
        self.region: Region = loaded.region
        # fewest context points accepted: the smallest n_ctx of the model's training lineage (as the service)
        self.min_context = loaded.min_context()

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Extrapolator":
        from flownp.checkpoint import load_checkpoint

        ck = load_checkpoint(path)
        lm = inference.build_model(str(path), ck, None, "checkpoint")
        return cls(lm, {"checkpoint": str(path), "kind": ck.get("kind"), "step": ck.get("step")})

    @classmethod
    def from_default(cls) -> "Extrapolator":
        """The embedded default model (SYNTHETIC: trained on generated GP weather, not ERA5), its sha256
        checked against its manifest before loading, as the service does."""
        lm = inference.default_model()
        info = lm.info
        return cls(lm, {"version": lm.version, "synthetic": True, "sha256": info["sha256"], "kind": info["kind"],
                        "step": info["step"], "description": info.get("description")})

    @classmethod
    def from_registry(cls, root: str | Path, version: str | None = None) -> "Extrapolator":
        """A registry version (default: the current one), read once and checked against its sha256."""
        from flownp.registry import Registry

        ck, digest, version = Registry(root).load(version)
        lm = inference.build_model(version, ck, digest, "registry")
        return cls(lm, {"checkpoint": str(Path(root) / "versions" / version / "model.pt"), "kind": ck.get("kind"),
                        "step": ck.get("step"), "version": version})

    @property
    def samplers(self) -> dict[str, Any]:
        """What the model offers (`offered`), its `default` and how it was chosen (flownp.samplers.manifest)."""
        return self.loaded.samplers

    # ---- conversions (all through the ModelSpace) ----------------------------------------------
    @staticmethod
    def _latlon(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
        for c in ("latitude", "longitude"):
            if c not in ds.coords and c not in ds:
                raise ValueError(f"dataset needs a '{c}' coordinate (degrees)")
        return np.asarray(ds["latitude"], float), np.asarray(ds["longitude"], float)

    def _xy(self, ds: xr.Dataset) -> torch.Tensor:
        lat, lon = self._latlon(ds)
        self.space.check_points(lat, lon, "points")
        return torch.from_numpy(self.space.xy(lat, lon))

    def _check_context_size(self, context: xr.Dataset) -> None:
        """DomainError (a ValueError) when the context has fewer points than the model was trained on
        (the service's 422 too_few): below it the model extrapolates outside its training distribution."""
        if "latitude" not in context.coords and "latitude" not in context:
            return  # _xy says what is missing
        n = int(np.asarray(context["latitude"]).size)
        if n < self.min_context:
            raise DomainError("too_few", f"context has {n} point(s); this model needs at least {self.min_context} "
                              "(the fewest it was trained on)")

    def _era5(self, ds: xr.Dataset) -> np.ndarray:
        missing = [n for n in NAMES if n not in ds]
        if missing:
            raise DomainError("missing_variable", f"dataset lacks variables {missing} (ERA5 short names, ERA5 units)")
        era5 = np.stack([np.asarray(ds[n], float) for n in NAMES], -1)
        self.space.check_values(era5)
        return era5

    def _values(self, ds: xr.Dataset) -> torch.Tensor:
        return torch.from_numpy(self.space.to_normalised(self._era5(ds)))

    def _to_era5(self, y: np.ndarray) -> np.ndarray:
        """Normalised (..., 4) -> ERA5 units (..., 4)."""
        return self.space.to_era5(y)

    def _task(self, context: xr.Dataset, targets: xr.Dataset, with_values: bool = False) -> inference.Task:
        self._check_context_size(context)
        xc, yc, xt = self._xy(context)[None], self._values(context)[None], self._xy(targets)[None]
        return inference.Task(xc, yc, xt, self._values(targets)[None] if with_values else None)

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
            lat, lon = self.space.circle_targets(*self._latlon(context))
            if lat.size == 0:
                raise DomainError("too_few", "the context covers every circle point: no 'circle' targets are left")
            return xr.Dataset(coords={"latitude": ("point", lat), "longitude": ("point", lon)})
        return targets

    # ---- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def extrapolate(self, context: xr.Dataset, targets: xr.Dataset | str = "circle", *, num_samples: int = 8,
                    solver: str | None = None, seed: int = 0, with_log_likelihood: bool = True,
                    ll_solver: str | None = None, sampler: str | None = None) -> xr.Dataset:
        """Samples (sample, point) of the four variables at the targets, in ERA5 units, with each sample's
        joint log-likelihood given the context (nats over ERA5 units: its `units` attribute). `sampler`: 'ode',
        'lfm' or 'distilled', one the model offers (`samplers`; else DomainError sampler_not_offered); None:
        its default. Solvers ('euler:16', 'midpoint:50', ...; per block for 'lfm', none for 'distilled'): by
        default the model's measured ones (its manifest's `solvers`), else Euler 16 for sampling and midpoint
        50 for the likelihoods."""
        self._check_context_size(context)
        plan = self.loaded.plan(sampler)
        if solver and not plan.uses_solver:
            raise DomainError("not_applicable", f"sampler 'distilled' runs {plan.maps} one-step map(s) and takes "
                              "no solver")
        tg = self._targets(context, targets)
        task = self._task(context, tg)
        smp = parse_solver(solver) if solver else self.loaded.solver("sample", parse_solver("euler:16"))
        lls = parse_solver(ll_solver) if ll_solver else self.loaded.solver("log_likelihood", parse_solver("midpoint:50"))
        res = inference.extrapolate(self.loaded, task, num_samples=num_samples, solver=smp, seed=seed,
                                    with_ll=with_log_likelihood, ll_solver=lls, estimator="auto", sampler=plan.name)
        out = tg[["latitude", "longitude"]].copy()
        for j, n in enumerate(NAMES):
            out[n] = (("sample", "point"), res["samples"][..., j], {"units": BY_NAME[n].era5_units})
        if with_log_likelihood:
            ll = res["ll"]
            out["log_likelihood"] = ("sample", ll["joint"], {"units": "nats", "density_units": LL_UNITS,
                                                             "kind": LL_KIND, "estimator": ll["estimator"],
                                                             "solver": ll["solver"],
                                                             "exact_density": int(ll["exact_density"]),
                                                             "scored_by": ll["scored_by"]})
        used = res["sampler"]
        what = (f"{used['maps']} one-step maps" if used["maps"] is not None else
                smp.describe() + (f" per block, {used['blocks']} blocks" if used["blocks"] > 1 else ""))
        out.attrs.update({"sampler": f"{plan.name}: {what}", "sampler_name": plan.name, "nfe": int(res["nfe"]),
                          "exact_density": int(plan.exact_density), "seed": seed, "n_context": int(task.xc.shape[1]),
                          "model": str(self.meta.get("version") or self.meta.get("checkpoint", ""))})
        return out

    def log_likelihood(self, context: xr.Dataset, observed: xr.Dataset, *, solver: str | None = None,
                       estimator: str = "auto", n_probes: int = 1) -> xr.Dataset:
        """Joint log-likelihood (nats over ERA5 units) of observed values at their points given the context
        (solver: by default the model's measured one, else midpoint 100; per block for an LFM). A distilled
        model is scored by its teacher (attrs `scored_by`, `exact_density` 0)."""
        task = self._task(context, observed, with_values=True)
        sol = parse_solver(solver) if solver else self.loaded.solver("log_likelihood", parse_solver("midpoint:100"))
        res = inference.log_likelihood(self.loaded, task, solver=sol, estimator=estimator, n_probes=n_probes)
        joint, n = res["joint"], res["n_targets"]
        attrs = {"units": "nats", "density_units": LL_UNITS}
        return xr.Dataset({"log_likelihood": ((), joint, {**attrs, "kind": LL_KIND}),
                           "log_likelihood_per_point": ((), joint / n, attrs)},
                          attrs={"estimator": res["estimator"], "solver": res["solver"], "n_probes": res["n_probes"],
                                 "units": LL_UNITS, "scored_by": res["scored_by"],
                                 "exact_density": int(res["exact_density"])})


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
    """Coverage of the central `levels` intervals per variable, as rank coverage (flownp.scores.rank_coverage):
    its mean is the level itself for calibrated samples at any sample count (the raw empirical quantile
    interval of S samples covers about (S - 1) / (S + 1) at 90%). out has a `sample` dimension first."""
    from flownp.scores import rank_coverage

    rows = {}
    for n in NAMES:
        s = torch.as_tensor(np.asarray(out[n].values, dtype=np.float64)).reshape(1, out.sizes["sample"], -1, 1)
        y = torch.as_tensor(np.asarray(truth[n], dtype=np.float64)).reshape(1, -1, 1)
        rows[n] = ("level", [float(rank_coverage(s, y, q).mean()) for q in levels])
    return xr.Dataset(rows, coords={"level": list(levels)})
