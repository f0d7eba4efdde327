"""Stores built from files made of the real geocat map placed at other times (train/valid/test years)."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from ingest.build import BuildSettings, StoreError, build_store
from ingest.cli import app
from ingest.layout import LayoutError
from ingest.normalize import StatsAccumulator
from ingest.store import Store


@pytest.fixture(scope="module")
def geocat(geocat_file):
    with xr.open_dataset(geocat_file) as ds:
        return ds[["sp", "t2m", "u10", "v10"]].load()


def year_file(geocat, path, year, hours=6, shift=0.0):
    """`hours` hourly copies of the real map in January `year`, temperature shifted by hour + shift."""
    times = pd.date_range(f"{year}-01-01", periods=hours, freq="h")
    ds = geocat.drop_vars("time").expand_dims(time=times)
    ds["t2m"] = ds.t2m + xr.DataArray(np.arange(hours) + shift, dims="time")
    ds.drop_encoding().to_netcdf(path)
    return path


def test_geocat_store_and_inspect_json(geocat_file, tmp_path):
    res = CliRunner().invoke(app, ["build", str(geocat_file), "--out", str(tmp_path / "s"), "--quiet"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "s"), "--json"])
    facts = json.loads(res.output)
    assert facts["n_points"] == 1245 and facts["variables"] == ["sp", "t2m", "u10", "v10"]
    assert facts["maps_per_split"]["train"] == 1  # 1995 is a train year
    assert facts["units"] == {"sp": "kPa", "t2m": "degC", "u10": "m/s", "v10": "m/s"}
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["sources"][0]["sha256"] == "4efcb5928e8031d1babc39f261d7c17cf8ab2e0a810a5c0c952f6b471cd1f9c3"


def test_berlin_is_refused_by_the_cli(berlin_file, tmp_path):
    res = CliRunner().invoke(app, ["build", str(berlin_file), "--out", str(tmp_path / "s"), "--quiet"])
    assert res.exit_code == 2
    assert "does not cover the memphis region" in res.output and "Traceback" not in res.output


def test_split_statistics_and_incremental_build(geocat, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    f86 = year_file(geocat, raw / "y1986.nc", 1986, hours=5)
    f88 = year_file(geocat, raw / "y1988.nc", 1988, hours=3, shift=50.0)  # valid: must not move stats
    f89 = year_file(geocat, raw / "y1989.nc", 1989, hours=4)
    m = build_store([f86, f88], tmp_path / "s", progress=False)
    assert m["maps_per_split"] == {"train": 5, "valid": 3, "test": 0, "unused": 0}
    s = Store.open(tmp_path / "s")
    _, train = s.load("train", normalized=False)
    expect = StatsAccumulator().update(train).normalizer()
    assert s.normalizer.mean == pytest.approx(expect.mean, rel=1e-12)
    assert s.normalizer.std == pytest.approx(expect.std, rel=1e-12)
    # re-run with one new file: only it is processed, nothing else changes
    shard88 = (tmp_path / "s" / m["sources"][1]["shard"]).stat().st_mtime_ns
    m2 = build_store([f86, f88, f89], tmp_path / "s", progress=False)
    assert m2["maps_per_split"]["test"] == 4 and len(m2["sources"]) == 3
    assert (tmp_path / "s" / m["sources"][1]["shard"]).stat().st_mtime_ns == shard88
    assert Store.open(tmp_path / "s").normalizer == s.normalizer
    t, v = Store.open(tmp_path / "s").load("test", normalized=False)
    assert len(t) == 4 and np.all(t.astype("datetime64[Y]").astype(int) + 1970 == 1989)
    # values are the physical ones of the source: temperature of hour h is the map's + h
    np.testing.assert_allclose(v[:, :, 1] - v[0, :, 1], np.arange(4)[:, None] * np.ones((1, 1245)), atol=1e-4)


def test_overlap_and_bad_file_leave_the_store_consistent(geocat, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = year_file(geocat, raw / "a.nc", 1986, hours=3)
    build_store([good], tmp_path / "s", progress=False)
    before = (tmp_path / "s" / "manifest.json").read_text()
    dup = year_file(geocat, raw / "b.nc", 1986, hours=2, shift=1.0)  # same times, other bytes
    with pytest.raises(StoreError, match="overlaps the times of a.nc"):
        build_store([dup], tmp_path / "s", progress=False)
    bad = year_file(geocat, raw / "c.nc", 1990, hours=2)
    ds = xr.open_dataset(bad).load()
    ds["sp"].loc[dict(time=ds.time[1], latitude=35.0, longitude=-91.0)] = np.inf
    ds.drop_encoding().to_netcdf(raw / "d.nc")
    with pytest.raises(LayoutError, match=r"d.nc: .*non-finite value\(s\) in the region, first sp"):
        build_store([raw / "d.nc"], tmp_path / "s", progress=False)
    assert (tmp_path / "s" / "manifest.json").read_text() == before
    leftovers = [p.name for p in (tmp_path / "s").rglob("*") if p.name.startswith(".")]
    assert leftovers == [] and len(list((tmp_path / "s" / "shards").iterdir())) == 1


def test_a_file_in_the_gap_of_another_is_added_and_a_shared_time_is_refused(geocat, tmp_path):
    def at(path, times):
        ds = geocat.drop_vars("time").expand_dims(time=pd.DatetimeIndex(times))
        ds.drop_encoding().to_netcdf(path)
        return path

    jan_dec = at(tmp_path / "jd.nc", ["1986-01-01T00", "1986-01-01T01", "1986-12-31T23"])
    feb = at(tmp_path / "feb.nc", ["1986-02-01T00", "1986-02-01T01"])  # inside jd's range, no shared time
    build_store([jan_dec], tmp_path / "s", progress=False)
    m = build_store([feb], tmp_path / "s", progress=False)
    assert m["maps_per_split"]["train"] == 5 and len(m["sources"]) == 2
    clash = at(tmp_path / "x.nc", ["1986-03-01T00", "1986-12-31T23"])  # shares one map with jd.nc
    with pytest.raises(StoreError, match="overlaps the times of jd.nc"):
        build_store([clash], tmp_path / "s", progress=False)


def test_reference_statistics_option(geocat_file, tmp_path):
    build_store([geocat_file], tmp_path / "s", progress=False, settings=BuildSettings(stats="reference"))
    assert Store.open(tmp_path / "s").normalizer.source == "reference"
    with pytest.raises(StoreError, match="stats='reference'"):
        build_store([geocat_file], tmp_path / "s", progress=False, settings=BuildSettings(stats="train"))


def test_store_without_train_years_says_what_to_do(geocat, tmp_path):
    f = year_file(geocat, tmp_path / "t.nc", 1989, hours=2)
    build_store([f], tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="--stats reference"):
        _ = Store.open(tmp_path / "s").normalizer


DEAD_PID = 2**22 + 12345  # above Linux's largest pid (pid_max <= 2**22): no such process


def test_a_rerun_removes_the_temporaries_of_killed_writers(geocat, tmp_path):
    """D16: kill -9 leaves `.<shard>.nc.XXXX.part` and `.manifest.json.XXXX.part`; the rerun that writes
    those files again removes them (a live writer's temporary stays)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    a = year_file(geocat, raw / "a.nc", 1986, hours=3)
    build_store([a], tmp_path / "ref", progress=False)
    (shard,) = [p.name for p in (tmp_path / "ref" / "shards").iterdir()]
    store = tmp_path / "s"
    (store / "shards").mkdir(parents=True)
    stale = [store / "shards" / f".{shard}.{DEAD_PID}.k9x2.part", store / "shards" / f".{shard}.q1w2e3r4.part",
             store / f".manifest.json.{DEAD_PID}.zz.part"]
    live = store / "shards" / f".{shard}.{os.getppid()}.live.part"  # our parent process is alive
    for p in stale + [live]:
        p.write_bytes(b"half a file")
    build_store([a], store, progress=False)
    assert [p for p in stale if p.exists()] == [] and live.exists()
    assert (store / "shards" / shard).read_bytes() == (tmp_path / "ref" / "shards" / shard).read_bytes()


def test_atomic_writes_fsync_the_directory_after_the_rename(tmp_path, monkeypatch):
    import stat

    import ingest.io as io

    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(io.os, "fsync", spy)
    io.write_json_atomic(tmp_path / "m.json", {"a": 1})
    assert synced == ["file", "dir"] and json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
