"""Raw ERA5 files -> a store: one netCDF shard per source file plus `manifest.json`.

Store layout (a directory):
    manifest.json            what is in the store: sources (sha256), years per split, region, circle,
                             per-year statistics and the train-year normaliser, settings, versions
    shards/<stem>-<sha>.nc   `values` (time, point, variable) float32 in model units (kPa, degC, m/s),
                             with time, point latitude/longitude, variable units and the split of each map

Why shards of netCDF rather than one zarr store: a re-run only adds shards for new files (nothing is
rewritten), every shard is written under a temporary name and renamed when complete, and the manifest
is replaced atomically after each shard, so a crash loses at most the file being processed and never
leaves a store that says more than it holds. Readers combine the shards lazily with
`xarray.open_mfdataset` (dask), and any netCDF tool can read them. Raw files are read lazily in time
blocks (dask chunks), so memory stays bounded by the block size, not the file size.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import netCDF4
import numpy as np
from tqdm.auto import tqdm

from ingest import __version__
from ingest.io import atomic_path, sha256_file, write_json_atomic
from ingest.layout import LayoutError, canonicalize, check_finite, cut_region
from ingest.normalize import Normalizer, StatsAccumulator
from ingest.region import MEMPHIS, Region
from ingest.split import PROTOCOL_SPLIT, SPLITS, YearSplit
from ingest.variables import VARIABLES

STORE_FORMAT = "flownp-weather-store"
STORE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLIT_CODES = ("train", "valid", "test", "unused")  # `split` flag values in shards


class StoreError(ValueError):
    """A store cannot be built or read as asked."""


@dataclass(frozen=True)
class BuildSettings:
    """How a store is built. `stats`: 'train' (statistics of the train years, the default) or
    'reference' (the earlier code's constants, for parity). `block`: maps read per block."""

    stats: str = "train"
    block: int = 2048

    def __post_init__(self) -> None:
        if self.stats not in ("train", "reference"):
            raise ValueError(f"stats must be 'train' or 'reference', got {self.stats!r}")
        if self.block < 1:
            raise ValueError("block must be >= 1")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _empty_manifest(region: Region, split: YearSplit, settings: BuildSettings) -> dict[str, Any]:
    return {
        "format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION,
        "package_version": __version__, "created": _now(), "updated": _now(),
        "region": region.to_dict(),
        "grid": {"n_lat": region.size, "n_lon": region.size, "resolution_deg": region.resolution,
                 **region.bounds},
        "circle": {"n_points": region.n_points, "radius_index": region.circle_radius_index,
                   "order": "row-major over (i_lat ascending, i_lon ascending)"},
        "variables": [{"name": v.name, "units": v.model_units, "long_name": v.long_name,
                       "source_units": v.era5_units} for v in VARIABLES],
        "split": split.to_dict(), "settings": asdict(settings), "sources": [],
        "statistics": {"by_year": {}}, "maps_per_split": {}, "years_per_split": {},
    }


def read_manifest(store: str | Path) -> dict[str, Any]:
    """The manifest of a store directory. Raises StoreError if there is none."""
    import json

    path = Path(store) / MANIFEST
    if not path.exists():
        raise StoreError(f"{store}: not a store (no {MANIFEST})")
    m = json.loads(path.read_text())
    if m.get("format") != STORE_FORMAT:
        raise StoreError(f"{store}: {MANIFEST} is not a {STORE_FORMAT} manifest")
    if m.get("format_version", 0) > STORE_FORMAT_VERSION:
        raise StoreError(f"{store}: store format {m['format_version']} is newer than this code")
    return m


def _summarise(m: dict[str, Any]) -> None:
    """Recompute the derived manifest fields (maps/years per split, train statistics) in place."""
    split = YearSplit.from_dict(m["split"])
    maps = {s: 0 for s in (*SPLITS, "unused")}
    years: dict[str, set[int]] = {s: set() for s in (*SPLITS, "unused")}
    train = StatsAccumulator()
    for y, acc in m["statistics"]["by_year"].items():
        s = split.of(int(y))
        a = StatsAccumulator.from_dict(acc)
        maps[s] += a.count // m["circle"]["n_points"]
        years[s].add(int(y))
        if s == "train":
            train = train.merge(a)
    m["maps_per_split"] = maps
    m["years_per_split"] = {s: sorted(v) for s, v in years.items()}
    stats = m["statistics"]
    if train.count:
        stats["train"] = {"maps": train.count // m["circle"]["n_points"],
                          "mean": train.mean.tolist(), "std": train.std.tolist(),
                          "mean_wind_speed": train.mean_speed}
    else:
        stats.pop("train", None)
    if m["settings"]["stats"] == "reference":
        stats["normalizer"] = Normalizer.reference().to_dict()
    elif train.count:
        stats["normalizer"] = train.normalizer("train").to_dict()
    else:
        stats["normalizer"] = None
    m["updated"] = _now()


def _write_shard(path: Path, times: np.ndarray, blocks: Iterable[np.ndarray], split: YearSplit,
                 region: Region) -> None:
    """Stream (time, point, variable) blocks into a CF netCDF shard written atomically."""
    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            nc.Conventions = "CF-1.8"
            nc.title = "flownp-weather store shard: ERA5 values on the region's circle points"
            nc.createDimension("time", len(times))
            nc.createDimension("point", region.n_points)
            nc.createDimension("variable", len(VARIABLES))
            t = nc.createVariable("time", "i8", ("time",))
            t.units, t.calendar, t.standard_name = "hours since 1970-01-01 00:00:00", "standard", "time"
            t[:] = times.astype("datetime64[h]").astype(np.int64)
            p = nc.createVariable("point", "i4", ("point",))
            p.long_name = "circle point index (row-major over i_lat, i_lon)"
            p[:] = np.arange(region.n_points)
            for name, vals, units in (("latitude", region.circle_lat, "degrees_north"),
                                      ("longitude", region.circle_lon, "degrees_east")):
                c = nc.createVariable(name, "f8", ("point",))
                c.units, c.standard_name = units, name
                c[:] = vals
            var = nc.createVariable("variable", str, ("variable",))
            unit = nc.createVariable("units", str, ("variable",))
            for i, v in enumerate(VARIABLES):
                var[i], unit[i] = v.name, v.model_units
            sp = nc.createVariable("split", "i1", ("time",))
            sp.long_name = "year split of each map"
            sp.flag_values = np.arange(len(SPLIT_CODES), dtype=np.int8)
            sp.flag_meanings = " ".join(SPLIT_CODES)
            years = times.astype("datetime64[Y]").astype(int) + 1970
            sp[:] = np.array([SPLIT_CODES.index(split.of(int(y))) for y in np.unique(years)],
                             dtype=np.int8)[np.searchsorted(np.unique(years), years)]
            vals = nc.createVariable("values", "f4", ("time", "point", "variable"),
                                     chunksizes=(min(len(times), 256), region.n_points, len(VARIABLES)))
            vals.coordinates = "latitude longitude units split"
            vals.long_name = "ERA5 values in model units (kPa, degC, m/s, m/s)"
            start = 0
            for block in blocks:
                vals[start:start + len(block)] = block
                start += len(block)
            if start != len(times):
                raise StoreError(f"{path}: wrote {start} maps, expected {len(times)}")


def _shard_times(path: Path) -> np.ndarray:
    """The map times of a shard, datetime64[ns]."""
    try:
        with netCDF4.Dataset(path) as nc:
            hours = np.asarray(nc["time"][:], dtype=np.int64)
    except OSError as e:
        raise StoreError(f"{path}: shard of the store cannot be read ({e}); rebuild the store") from e
    return (np.datetime64("1970-01-01T00", "h") + hours.astype("timedelta64[h]")).astype("datetime64[ns]")


def _ingest_file(raw: Path, sha: str, store: Path, m: dict[str, Any], settings: BuildSettings,
                 region: Region) -> dict[str, Any]:
    src = str(raw)
    ds = cut_region(canonicalize(raw), region, source=src)  # lazy backend arrays: read per block below
    times = ds["time"].values
    if len(times) == 0:
        raise LayoutError(f"{src}: holds no maps")
    if len(np.unique(times)) != len(times):
        raise LayoutError(f"{src}: duplicated times")
    have = {e["name"]: e for e in m["sources"]}
    for e in m["sources"]:
        t0, t1 = np.datetime64(e["time_start"]), np.datetime64(e["time_end"])
        # a file may fall in a gap of another's range (February after a January+December file): only
        # shared times are an overlap, so compare with the shard's own times when the ranges meet
        if np.any((times >= t0) & (times <= t1)) and len(np.intersect1d(times, _shard_times(store / e["shard"]))):
            raise StoreError(f"{src}: overlaps the times of {e['name']} already in the store")
    name = raw.name
    if name in have:
        raise StoreError(f"{src}: a different file named {name} is already in the store")
    split = YearSplit.from_dict(m["split"])
    years = times.astype("datetime64[Y]").astype(int) + 1970
    accs: dict[int, StatsAccumulator] = {}
    flat = region.circle_index[:, 0] * region.size + region.circle_index[:, 1]

    def blocks() -> Iterable[np.ndarray]:
        for a in range(0, len(times), settings.block):
            b = min(a + settings.block, len(times))
            # per variable (nb, P) in model units; np.take keeps the result C-contiguous (x[:, flat] would
            # not), so the statistics below reduce it without a copy
            cols = [v.era5_to_model(np.take(np.asarray(ds[v.name][a:b].values).reshape(b - a, -1), flat, axis=1))
                    .astype(np.float32, copy=False) for v in VARIABLES]
            block = np.stack(cols, axis=-1).astype(np.float32, copy=False)
            check_finite(block, times[a:b], src)
            for y in np.unique(years[a:b]):
                rows = years[a:b] == y
                accs.setdefault(int(y), StatsAccumulator()).update_columns(
                    [c if rows.all() else c[rows] for c in cols])
            yield block

    shard = Path("shards") / f"{raw.stem}-{sha[:12]}.nc"
    _write_shard(store / shard, times, blocks(), split, region)
    ds.close()
    return {
        "entry": {"name": name, "path": os.path.abspath(raw), "sha256": sha, "bytes": raw.stat().st_size,
                  "shard": str(shard), "n_maps": int(len(times)),
                  "time_start": str(times.min().astype("datetime64[s]")),
                  "time_end": str(times.max().astype("datetime64[s]")),
                  "maps_per_year": {str(y): int((years == y).sum()) for y in np.unique(years)}},
        "stats": accs,
    }


SYNTHETIC_MANIFEST = "gp_weather_manifest.json"
PRIOR_MANIFEST = "broad_prior_manifest.json"  # ingest.prior.PRIOR_MANIFEST_NAME


def _record_synthetic(raw: Path, sha: str, m: dict[str, Any]) -> None:
    """If `raw` was written by `flownp-ingest synthesize`, record the law it was drawn from, so that
    evaluation can compute the exact oracle. Mixing laws (or synthetic and real files) is refused."""
    import json

    side = raw.parent / SYNTHETIC_MANIFEST
    law = None
    if side.exists():
        d = json.loads(side.read_text())
        entry = d.get("files", {}).get(raw.name, {})
        if d.get("kind") == "gp_weather" and entry.get("sha256") == sha:
            law = {"kind": "gp_weather", "config": d["config"], "region": d.get("region", m["region"])}
    prior_side = raw.parent / PRIOR_MANIFEST
    if law is None and prior_side.exists():  # ingest.prior: per-map laws from (seed, map time)
        d = json.loads(prior_side.read_text())
        entry = d.get("files", {}).get(raw.name, {})
        if d.get("kind") == "broad_prior" and entry.get("sha256") == sha:
            law = {"kind": "broad_prior", "version": d.get("version"), "config": d["config"],
                   "seed": d["seed"], "region": d.get("region", m["region"])}
    if not m["sources"]:
        m["synthetic"] = law
    elif m.get("synthetic") != law:
        raise StoreError(f"{raw}: mixes {'synthetic' if law else 'real'} data into a store of "
                         f"{'synthetic' if m.get('synthetic') else 'real'} data (or another synthetic law)")


def build_store(raw_files: Iterable[str | Path], out: str | Path, *, settings: BuildSettings | None = None,
                split: YearSplit = PROTOCOL_SPLIT, region: Region = MEMPHIS,
                progress: bool = True) -> dict[str, Any]:
    """Add raw ERA5 files to the store at `out` (created if absent) and return its manifest.

    Files already in the store (same sha256) are skipped; files whose times overlap the store's are
    refused. The split, region and settings of an existing store win; passing different ones is an error.
    """
    out = Path(out)
    raw = [Path(f) for f in raw_files]
    if not raw:
        raise StoreError("no raw files given")
    if (out / MANIFEST).exists():
        m = read_manifest(out)
        if settings is not None and asdict(settings)["stats"] != m["settings"]["stats"]:
            raise StoreError(f"{out}: store was built with stats={m['settings']['stats']!r}")
        if YearSplit.from_dict(m["split"]) != split or Region.from_dict(m["region"]) != region:
            raise StoreError(f"{out}: store was built with another year split or region")
        settings = BuildSettings(**m["settings"])
    else:
        settings = settings or BuildSettings()
        m = _empty_manifest(region, split, settings)
    known = {e["sha256"] for e in m["sources"]}
    todo = []
    for f in raw:
        sha = sha256_file(f) if f.exists() else ""
        if not f.exists():
            raise StoreError(f"{f}: no such file")
        if sha in known:
            continue
        todo.append((f, sha))
        known.add(sha)
    for f, sha in tqdm(todo, desc="build", unit="file", disable=not progress):
        _record_synthetic(f, sha, m)
        res = _ingest_file(f, sha, out, m, settings, region)
        m["sources"].append(res["entry"])
        by_year = m["statistics"]["by_year"]
        for y, acc in res["stats"].items():
            prev = StatsAccumulator.from_dict(by_year[str(y)]) if str(y) in by_year else StatsAccumulator()
            by_year[str(y)] = prev.merge(acc).to_dict()
        m["sources"].sort(key=lambda e: e["time_start"])
        _summarise(m)
        write_json_atomic(out / MANIFEST, m)  # after every shard: a crash loses at most one file
    if not (out / MANIFEST).exists():
        _summarise(m)
        write_json_atomic(out / MANIFEST, m)
    return m
