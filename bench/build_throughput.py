"""Build throughput: maps/s of `build` over a synthetic winter season divided by the maps/s of merely
reading the same files with xarray (goal: ratio >= 0.5, i.e. the pipeline costs at most 2x the read).
Peak memory (max RSS) of each phase is reported. Run: python bench/build_throughput.py [--days 31]

The 2x goal is out of reach by construction: a build must also hash every source (sha256, recorded in
the manifest) and write its shards (circle points only, 74% of the raw bytes), each of which costs about
as much as the read. So the bench also times that floor (read + sha256 + writing the same values with the
same netCDF chunking, done by hand without any of the build's logic) and prints build over floor: the
cost of everything the build does beyond the unavoidable I/O.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import netCDF4
import xarray as xr

from ingest.build import build_store
from ingest.io import sha256_file
from ingest.store import Store
from ingest.synthetic import synthesize


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def floor_seconds(files: list[Path], store: Path, work: Path) -> float:
    """Read every file with xarray, sha256 it, and write the store's values (time, point, variable) float32
    to a fresh netCDF with the build's chunking: the I/O any build must do."""
    values = Store.open(store).dataset()["values"].values  # prepared before the clock starts
    t = time.perf_counter()
    for f in files:
        with xr.open_dataset(f) as ds:
            ds.load()
        sha256_file(f)
    with netCDF4.Dataset(work / "floor.nc", "w", format="NETCDF4") as nc:
        for name, n in zip(("time", "point", "variable"), values.shape):
            nc.createDimension(name, n)
        v = nc.createVariable("values", "f4", ("time", "point", "variable"),
                              chunksizes=(min(len(values), 256), *values.shape[1:]))
        for a in range(0, len(values), 2048):
            v[a:a + 2048] = values[a:a + 2048]
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--days", type=int, default=31, help="days per winter month (31: a full season)")
    ap.add_argument("--years", default="1986,1988", help="years to synthesize")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    try:
        years = [int(y) for y in args.years.split(",")]
        files = synthesize(work / "raw", years, days=range(1, args.days + 1), seed=0, progress=False)
        n_maps = sum(xr.open_dataset(f).sizes["valid_time"] for f in files)
        read_s, build_s = [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            for f in files:
                with xr.open_dataset(f) as ds:
                    ds.load()
            read_s.append(time.perf_counter() - t)
            rss_read = rss_mb()
            out = work / f"store{r}"
            t = time.perf_counter()
            build_store(files, out, progress=False)
            build_s.append(time.perf_counter() - t)
            rss_build = rss_mb()
        floor = min(floor_seconds(files, work / "store0", work) for _ in range(args.repeats))
        read, build = min(read_s), min(build_s)
        res = {
            "maps": n_maps, "raw_MB": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "read_maps_per_s": round(n_maps / read, 1), "build_maps_per_s": round(n_maps / build, 1),
            "ratio_build_over_read": round(read / build, 3), "goal": ">= 0.5",
            "floor_maps_per_s": round(n_maps / floor, 1), "ratio_build_over_floor": round(floor / build, 3),
            "peak_rss_MB_after_read": round(rss_read, 1), "peak_rss_MB_after_build": round(rss_build, 1),
            "repeats": args.repeats, "timing": "best of repeats",
        }
        print(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
