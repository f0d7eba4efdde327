"""Read a store built by `ingest.build`: its manifest, normaliser and the maps of a split.

`Store.dataset()` combines the shards lazily with `xarray.open_mfdataset` (dask); `Store.load()`
returns one split as a numpy array (time, point, variable), in model units or normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ingest.build import SPLIT_CODES, StoreError, read_manifest
from ingest.io import sha256_json
from ingest.normalize import Normalizer, quantize_float16
from ingest.region import Region
from ingest.split import SPLITS, YearSplit


@dataclass
class Store:
    """A built store directory."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        s = cls(Path(path))
        _ = s.manifest  # fail early if it is not a store
        return s

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)

    @property
    def manifest_sha256(self) -> str:
        return sha256_json(self.manifest)

    @property
    def region(self) -> Region:
        return Region.from_dict(self.manifest["region"])

    @property
    def split(self) -> YearSplit:
        return YearSplit.from_dict(self.manifest["split"])

    @property
    def normalizer(self) -> Normalizer:
        """The store's normaliser (train-year statistics unless built with reference constants)."""
        d = self.manifest["statistics"].get("normalizer")
        if d is None:
            raise StoreError(
                f"{self.path}: no train-year maps, so no train statistics; add train-year files or "
                "rebuild with --stats reference"
            )
        return Normalizer.from_dict(d)

    def dataset(self) -> xr.Dataset:
        """All shards as one lazy dataset with `values` (time, point, variable), sorted by time."""
        shards = [self.path / e["shard"] for e in self.manifest["sources"]]
        if not shards:
            raise StoreError(f"{self.path}: the store holds no maps")
        missing = [str(s) for s in shards if not s.exists()]
        if missing:
            raise StoreError(f"{self.path}: shard(s) missing: {missing[:3]}")
        ds = xr.open_mfdataset(shards, combine="nested", concat_dim="time", data_vars="minimal",
                               coords="minimal", compat="override", join="override",
                               chunks={"time": 1024})
        return ds.sortby("time")

    def load(self, split: str, *, normalized: bool = True, float16_parity: bool = False,
             normalizer: Normalizer | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Maps of one split -> (times (T,) datetime64[ns], values (T, P, 4) float32).

        `normalized`: normalise with `normalizer` (default: the store's); else model units
        (kPa, degC, m/s). `float16_parity`: round model-unit values to float16 first, as the earlier
        pipeline did (off by default)."""
        if split not in (*SPLITS, "unused", "all"):
            raise ValueError(f"split must be one of {SPLITS + ('unused', 'all')}, got {split!r}")
        with self.dataset() as ds:  # closed when read: no file handles outlive the call
            if split != "all":
                code = SPLIT_CODES.index(split)
                ds = ds.isel(time=np.flatnonzero(ds["split"].values == code))
            times = ds["time"].values
            values = np.asarray(ds["values"].values, dtype=np.float32)
        if float16_parity:
            values = quantize_float16(values)
        if normalized:
            values = (normalizer or self.normalizer).normalize(values).astype(np.float32)
        return times, values

    def inspect(self) -> dict[str, Any]:
        """The manifest facts a person asks first (JSON-serialisable)."""
        m = self.manifest
        return {
            "store": str(self.path), "format_version": m["format_version"],
            "package_version": m["package_version"], "updated": m["updated"],
            "region": m["region"]["name"], "grid": m["grid"],
            "n_points": m["circle"]["n_points"],
            "variables": [v["name"] for v in m["variables"]],
            "units": {v["name"]: v["units"] for v in m["variables"]},
            "maps_per_split": m["maps_per_split"], "years_per_split": m["years_per_split"],
            "n_sources": len(m["sources"]),
            "time_range": [min((e["time_start"] for e in m["sources"]), default=None),
                           max((e["time_end"] for e in m["sources"]), default=None)],
            "statistics": {k: v for k, v in m["statistics"].items() if k != "by_year"},
            "settings": m["settings"], "manifest_sha256": self.manifest_sha256,
        }
