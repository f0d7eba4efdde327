"""Answers of /v1/extrapolate as JSON (Open-Meteo-like columns with a `units` block) or as a CF netCDF
of the same content (samples on a `sample` axis with CF `realization` semantics)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import xarray as xr

from flownp.inference import LL_KIND, LL_UNITS
from ingest.variables import BY_NAME, NAMES


def summarise(samples: np.ndarray, quantiles: list[float]) -> dict[str, np.ndarray]:
    """samples (S, n, 4) ERA5 units -> mean, std (ddof=1 when S > 1) (n, 4), quantiles (Q, n, 4)."""
    s = samples.shape[0]
    return {"mean": samples.mean(0), "std": samples.std(0, ddof=1 if s > 1 else 0),
            "quantiles": np.quantile(samples, quantiles, axis=0) if quantiles else np.zeros((0,) + samples.shape[1:])}


def _cols(a: np.ndarray) -> dict[str, list[Any]]:
    """(..., 4) -> {variable: nested lists (...)}."""
    return {n: a[..., j].tolist() for j, n in enumerate(NAMES)}


def extrapolation_body(meta: dict[str, Any], lat: list[float], lon: list[float], out: dict[str, Any],
                       include: list[str], quantiles: list[float]) -> dict[str, Any]:
    """The JSON answer. `out` from engine.run_extrapolate; `meta`: model, sampler, context, timing."""
    samples = out["samples"]
    stats = summarise(samples, quantiles)
    body: dict[str, Any] = {
        **{k: meta[k] for k in ("model", "context", "sampler")},
        "latitude": lat, "longitude": lon,
        "sample": list(range(samples.shape[0])),
        "units": {**{n: BY_NAME[n].era5_units for n in NAMES}, "latitude": "degrees_north",
                  "longitude": "degrees_east", "log_likelihood": "nats"},
    }
    if "samples" in include:
        body["samples"] = _cols(samples)
    if "mean" in include:
        body["mean"] = _cols(stats["mean"])
    if "std" in include:
        body["std"] = {**_cols(stats["std"]), "ddof": 1 if samples.shape[0] > 1 else 0}
    if "quantiles" in include:
        body["quantiles"] = {"levels": quantiles, **_cols(stats["quantiles"])}
    if "ll" in out:
        ll = out["ll"]
        body["log_likelihood"] = {
            "values": ll["joint"].tolist(), "values_normalised": ll["joint_normalised"].tolist(),
            "kind": LL_KIND, "units": LL_UNITS, "estimator": ll["estimator"], "n_probes": ll["n_probes"],
            "spread": None if ll["spread"] is None else ll["spread"].tolist(),
            **meta["log_likelihood"], "nfe": ll["nfe"],
            "exact_density": ll["exact_density"], "scored_by": ll["scored_by"],
            "in_sampling_solve": ll.get("in_sampling_solve", False),
        }
    body["timing"] = meta["timing"]
    return body


def sampler_text(sampler: dict[str, Any]) -> str:
    """'ode: euler, 8 steps', 'lfm: euler, 8 steps per block, 4 blocks', 'distilled: 2 one-step maps'."""
    if sampler.get("maps") is not None:
        return f"{sampler['name']}: {sampler['maps']} one-step maps"
    per = f" per block, {sampler['blocks']} blocks" if (sampler.get("blocks") or 1) > 1 else ""
    return f"{sampler['name']}: {sampler['solver']}, {sampler['steps']} steps{per}"


def extrapolation_netcdf(body: dict[str, Any], samples: np.ndarray) -> bytes:
    """The same content as a CF-1.10 netCDF (classic 64-bit offset format: readable from memory by
    xarray with scipy, and by netCDF4)."""
    ds = xr.Dataset(coords={
        "sample": ("sample", np.arange(samples.shape[0], dtype=np.int32),
                   {"standard_name": "realization", "long_name": "sample (ensemble member)"}),
        "latitude": ("point", np.asarray(body["latitude"], np.float64),
                     {"standard_name": "latitude", "units": "degrees_north"}),
        "longitude": ("point", np.asarray(body["longitude"], np.float64),
                      {"standard_name": "longitude", "units": "degrees_east"}),
    })
    for j, n in enumerate(NAMES):
        v = BY_NAME[n]
        attrs = {"standard_name": v.standard_name, "long_name": v.long_name, "units": v.era5_units,
                 "coordinates": "latitude longitude"}
        ds[n] = (("sample", "point"), samples[..., j], attrs)
        if "mean" in body:
            ds[f"{n}_mean"] = ("point", np.asarray(body["mean"][n]), {**attrs, "cell_methods": "sample: mean"})
        if "std" in body:
            ds[f"{n}_std"] = ("point", np.asarray(body["std"][n]),
                              {**attrs, "standard_name": f"{v.standard_name} standard_error",
                               "cell_methods": "sample: standard_deviation"})
        if "quantiles" in body and body["quantiles"]["levels"]:
            ds[f"{n}_quantile"] = (("quantile", "point"), np.asarray(body["quantiles"][n]),
                                   {**attrs, "cell_methods": "sample: quantile"})
    if "quantiles" in body and body["quantiles"]["levels"]:
        ds = ds.assign_coords(quantile=("quantile", np.asarray(body["quantiles"]["levels"], np.float64)))
    if "log_likelihood" in body:
        ll = body["log_likelihood"]
        ds["log_likelihood"] = ("sample", np.asarray(ll["values"], np.float64), {
            "long_name": f"log-likelihood, {ll['kind']}", "units": "nats", "estimator": ll["estimator"],
            "n_probes": ll["n_probes"], "solver": ll["solver"], "steps": ll["steps"],
            "density_units": ll["units"], "exact_density": int(ll["exact_density"]), "scored_by": ll["scored_by"]})
    ds.attrs = {"Conventions": "CF-1.10", "title": "FlowNP spatial extrapolation",
                "institution": "flownp-weather", "source": f"FlowNP model {body['model']['version']}",
                "history": f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} flownp-weather service",
                "model_version": body["model"]["version"], "model_synthetic": int(body["model"]["synthetic"]),
                "sampler": sampler_text(body["sampler"]), "sampler_name": body["sampler"]["name"],
                "seed": str(body["sampler"]["seed"]), "n_context": body["context"]["n"],
                "context_time": body["context"].get("time") or ""}
    return bytes(ds.to_netcdf(format="NETCDF3_64BIT", engine="scipy"))
