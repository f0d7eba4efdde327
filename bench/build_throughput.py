"""Build throughput: maps/s of `build` over a synthetic winter season divided by the maps/s of merely
reading the same files with xarray (goal: ratio >= 0.5, i.e. the pipeline costs at most 2x the read).
Peak memory (max RSS) of each phase is reported. Run: python bench/build_throughput.py [--days 31]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import xarray as xr

from ingest.build import build_store
from ingest.synthetic import synthesize


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
        read, build = min(read_s), min(build_s)
        res = {
            "maps": n_maps, "raw_MB": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "read_maps_per_s": round(n_maps / read, 1), "build_maps_per_s": round(n_maps / build, 1),
            "ratio_build_over_read": round(read / build, 3), "goal": ">= 0.5",
            "peak_rss_MB_after_read": round(rss_read, 1), "peak_rss_MB_after_build": round(rss_build, 1),
            "repeats": args.repeats, "timing": "best of repeats",
        }
        print(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
