"""One canonical layout for any ERA5 single-level file, and the cut to the region's circle.

`canonicalize` accepts the legacy CDS layout (dimension `time`) and the current one (since 2024:
dimension `valid_time`, coordinates `number` and `expver`), packed int16 values (decoded by xarray),
float32 or float64, latitudes in either order, longitudes in -180..180 or 0..360, short (t2m) or long
(2m_temperature) variable names, a scalar time, an `expver` dimension mixing ERA5 and ERA5T, and GRIB
through cfgrib (optional extra `grib`). It returns dims (time, latitude, longitude), latitude ascending,
longitude ascending in -180..180, data variables sp [Pa], t2m [K], u10, v10 [m/s] and nothing else.
Every problem raises `LayoutError` naming the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ingest.region import MEMPHIS, Region
from ingest.variables import BY_NAME, NAMES, VARIABLES, resolve_alias


class LayoutError(ValueError):
    """A raw file cannot be read as ERA5 single-level data for the region."""


# unit spellings seen in ERA5 files (and a few conversions for files written by other tools)
_UNIT_FACTORS: dict[str, dict[str, tuple[float, float]]] = {
    "sp": {"Pa": (1.0, 0.0), "pa": (1.0, 0.0), "hPa": (100.0, 0.0), "kPa": (1000.0, 0.0)},
    "t2m": {"K": (1.0, 0.0), "k": (1.0, 0.0), "degC": (1.0, 273.15), "C": (1.0, 273.15),
            "°C": (1.0, 273.15), "celsius": (1.0, 273.15)},
    "u10": {"m s**-1": (1.0, 0.0), "m s-1": (1.0, 0.0), "m/s": (1.0, 0.0), "m s^-1": (1.0, 0.0)},
}
_UNIT_FACTORS["v10"] = _UNIT_FACTORS["u10"]


def _name(source: str | None, obj: Any) -> str:
    if source:
        return source
    if isinstance(obj, (str, Path)):
        return str(obj)
    return str(getattr(obj, "encoding", {}).get("source", "<in-memory dataset>"))


def open_raw(path: str | Path, chunks: dict[str, int] | None = None) -> xr.Dataset:
    """Open a raw netCDF (or GRIB, with the `grib` extra) file lazily. Raises LayoutError if unreadable."""
    path = Path(path)
    if not path.exists():
        raise LayoutError(f"{path}: no such file")
    kwargs: dict[str, Any] = {"chunks": chunks} if chunks is not None else {}
    if path.suffix.lower() in (".grib", ".grib2", ".grb", ".grb2"):
        try:
            import cfgrib  # noqa: F401
        except ImportError as exc:
            raise LayoutError(
                f"{path}: GRIB needs the optional extra: pip install 'flownp-weather[grib]'"
            ) from exc
        kwargs["engine"] = "cfgrib"
    try:
        return xr.open_dataset(path, **kwargs)
    except Exception as exc:  # netCDF4/HDF5 raise many types for a truncated or foreign file
        raise LayoutError(f"{path}: not a readable netCDF/GRIB file ({type(exc).__name__}: {exc})") from exc


def _rename_variables(ds: xr.Dataset, src: str) -> xr.Dataset:
    found: dict[str, str] = {}
    for var in ds.data_vars:
        attrs = ds[var].attrs
        canon = resolve_alias(str(var)) or resolve_alias(str(attrs.get("GRIB_shortName", "")))
        if canon is None:
            continue
        if canon in found:
            raise LayoutError(f"{src}: variables {found[canon]!r} and {var!r} are both {canon}")
        found[canon] = str(var)
    missing = [n for n in NAMES if n not in found]
    if missing:
        wanted = ", ".join(f"{n} ({BY_NAME[n].cds_name})" for n in missing)
        raise LayoutError(
            f"{src}: missing variable(s) {wanted}; the file holds {sorted(map(str, ds.data_vars))}"
        )
    ds = ds[[found[n] for n in NAMES]]
    return ds.rename({found[n]: n for n in NAMES if found[n] != n})


def _canonical_time(ds: xr.Dataset, src: str) -> xr.Dataset:
    if "valid_time" in ds.dims:
        if "time" in ds.coords and "time" not in ds.dims:
            ds = ds.drop_vars("time")
        ds = ds.rename({"valid_time": "time"})
    elif "time" not in ds.dims:
        if "time" in ds.coords and ds["time"].ndim == 0:
            ds = ds.expand_dims("time")
        elif "valid_time" in ds.coords and ds["valid_time"].ndim == 0:
            ds = ds.rename({"valid_time": "time"}).expand_dims("time")
        else:
            raise LayoutError(f"{src}: no time or valid_time coordinate")
    elif "valid_time" in ds.coords:  # GRIB: time dim with a valid_time coord (step 0 for analyses)
        ds = ds.drop_vars("valid_time")
    if "step" in ds.dims:
        raise LayoutError(f"{src}: forecast steps are not supported (expected analyses)")
    if not np.issubdtype(ds["time"].dtype, np.datetime64):
        raise LayoutError(f"{src}: time coordinate is not decoded as datetimes")
    return ds


def _drop_extras(ds: xr.Dataset, src: str) -> xr.Dataset:
    if "number" in ds.dims:
        if ds.sizes["number"] != 1:
            raise LayoutError(f"{src}: {ds.sizes['number']} ensemble members; expected the reanalysis")
        ds = ds.isel(number=0)
    if "expver" in ds.dims:  # ERA5 (1) and ERA5T (5) mixed: take the first valid value per time
        parts = [ds.isel(expver=i, drop=True) for i in range(ds.sizes["expver"])]
        merged = parts[0]
        for p in parts[1:]:
            merged = merged.combine_first(p)
        ds = merged
    extra = [c for c in ds.coords if c not in ("time", "latitude", "longitude")]
    return ds.drop_vars(extra)


def _canonical_grid(ds: xr.Dataset, src: str) -> xr.Dataset:
    ren = {a: b for a, b in (("lat", "latitude"), ("lon", "longitude")) if a in ds.dims}
    ds = ds.rename(ren)
    for c in ("latitude", "longitude"):
        if c not in ds.dims:
            raise LayoutError(f"{src}: no {c} dimension (dims are {dict(ds.sizes)})")
    lon = ds["longitude"].values.astype(np.float64)
    if lon.max() > 180.0:
        ds = ds.assign_coords(longitude=((lon + 180.0) % 360.0) - 180.0)
    if not ds.indexes["longitude"].is_monotonic_increasing:
        ds = ds.sortby("longitude")
    if not ds.indexes["latitude"].is_monotonic_increasing:
        ds = ds.sortby("latitude")
    return ds


def _canonical_units(ds: xr.Dataset, src: str) -> xr.Dataset:
    out = {}
    for n in NAMES:
        da = ds[n]
        units = str(da.attrs.get("units", "")).strip()
        if units == "":
            factor, offset = 1.0, 0.0  # ERA5 files always say; a bare file is taken as ERA5 units
        elif units in _UNIT_FACTORS[n]:
            factor, offset = _UNIT_FACTORS[n][units]
        else:
            raise LayoutError(f"{src}: variable {n} has units {units!r}; expected {BY_NAME[n].era5_units}")
        if (factor, offset) != (1.0, 0.0):
            da = da * factor + offset
        out[n] = da.assign_attrs(units=BY_NAME[n].era5_units, long_name=BY_NAME[n].long_name,
                                 standard_name=BY_NAME[n].standard_name)
    return ds.assign(out)


def canonicalize(obj: xr.Dataset | str | Path, *, source: str | None = None,
                 chunks: dict[str, int] | None = None) -> xr.Dataset:
    """Any ERA5 single-level dataset or file -> dims (time, latitude, longitude), variables sp [Pa],
    t2m [K], u10, v10 [m/s], latitude and longitude ascending (-180..180). Lazy if the input is."""
    src = _name(source, obj)
    ds = open_raw(obj, chunks) if isinstance(obj, (str, Path)) else obj
    ds = _rename_variables(ds, src)
    ds = _canonical_time(ds, src)
    ds = _canonical_grid(ds, src)
    ds = _drop_extras(ds, src)
    ds = _canonical_units(ds, src)
    for n in NAMES:
        extra_dims = set(ds[n].dims) - {"time", "latitude", "longitude"}
        if extra_dims:
            raise LayoutError(f"{src}: variable {n} has unexpected dimensions {sorted(extra_dims)}")
    ds = ds.transpose("time", "latitude", "longitude")
    ds.attrs = {"source": src}
    return ds


def cut_region(ds: xr.Dataset, region: Region = MEMPHIS, *, source: str | None = None,
               tol: float = 1e-3) -> xr.Dataset:
    """Canonical dataset -> the region's size x size grid with the exact grid coordinates.
    Raises LayoutError if the file's grid does not hold every grid point of the region."""
    src = source or ds.attrs.get("source", "<dataset>")
    lat = ds["latitude"].values.astype(np.float64)
    lon = ds["longitude"].values.astype(np.float64)

    def pick(have: np.ndarray, want: np.ndarray) -> np.ndarray | None:
        if have.size == 0:
            return None
        idx = np.clip(np.searchsorted(have, want), 0, have.size - 1)
        idx_lo = np.clip(idx - 1, 0, have.size - 1)
        best = np.where(np.abs(have[idx_lo] - want) < np.abs(have[idx] - want), idx_lo, idx)
        return best if np.all(np.abs(have[best] - want) <= tol) else None

    i_lat, i_lon = pick(lat, region.lats), pick(lon, region.lons)
    if i_lat is None or i_lon is None:
        def span(a: np.ndarray) -> str:
            step = f", step {np.median(np.diff(a)):g}" if a.size > 1 else ""
            return f"{a.min():g}..{a.max():g} ({a.size} values{step})" if a.size else "nothing"
        b = region.bounds
        raise LayoutError(
            f"{src}: the grid does not cover the {region.name} region: it has latitudes {span(lat)} and "
            f"longitudes {span(lon)}; needs every {region.resolution}-degree point of latitudes "
            f"{b['south']:g}..{b['north']:g} and longitudes {b['west']:g}..{b['east']:g}"
        )
    out = ds.isel(latitude=i_lat, longitude=i_lon)
    return out.assign_coords(latitude=region.lats, longitude=region.lons)


def to_points(ds: xr.Dataset, region: Region = MEMPHIS) -> xr.DataArray:
    """Region grid (time, latitude, longitude) in ERA5 units -> (time, point, variable) float32 in model
    units (kPa, degC, m/s) over the circle, with per-point latitude/longitude coordinates."""
    il = xr.DataArray(region.circle_index[:, 0], dims="point")
    jl = xr.DataArray(region.circle_index[:, 1], dims="point")
    parts = []
    for v in VARIABLES:
        da = ds[v.name].isel(latitude=il, longitude=jl, drop=True)
        parts.append((da * v.scale + v.offset).astype(np.float32))
    out = xr.concat(parts, dim=xr.Variable("variable", list(NAMES)), coords="minimal", compat="override")
    out = out.transpose("time", "point", "variable")
    return out.assign_coords(
        point=np.arange(region.n_points),
        latitude=("point", region.circle_lat), longitude=("point", region.circle_lon),
        units=("variable", [v.model_units for v in VARIABLES]),
    ).rename("values")


def check_finite(values: np.ndarray, times: np.ndarray, source: str) -> None:
    """Raise LayoutError naming the file, variable and first time if any value is NaN or infinite."""
    bad = ~np.isfinite(values)
    if bad.any():
        t, p, v = np.argwhere(bad)[0]
        raise LayoutError(
            f"{source}: {int(bad.sum())} non-finite value(s) in the region, first {NAMES[v]} at "
            f"{np.datetime_as_string(times[t], unit='h')} (point {p})"
        )
