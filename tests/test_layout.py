"""Every ERA5 layout variant becomes the same canonical dataset (built from the real geocat sample)."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from ingest.layout import LayoutError, canonicalize, cut_region, to_points
from ingest.region import MEMPHIS


@pytest.fixture(scope="module")
def geocat(geocat_file):
    with xr.open_dataset(geocat_file) as ds:
        return ds.load()


@pytest.fixture(scope="module")
def reference(geocat):
    return cut_region(canonicalize(geocat, source="geocat"))


def _current_layout(ds):
    """Legacy (scalar time) -> current CDS layout: valid_time dimension, number, expver."""
    out = ds.expand_dims("time").rename({"time": "valid_time"})
    return out.assign_coords(number=0, expver=("valid_time", ["0001"]))


VARIANTS = {
    "legacy-scalar-time": lambda ds: ds,
    "current-valid_time": _current_layout,
    "lon-0-360": lambda ds: ds.assign_coords(longitude=ds.longitude % 360).sortby("longitude"),
    "lat-ascending": lambda ds: ds.sortby("latitude"),
    "long-names": lambda ds: ds.rename({"t2m": "2m_temperature", "sp": "surface_pressure",
                                        "u10": "10m_u_component_of_wind", "v10": "10m_v_component_of_wind"}),
    "lat-lon-short-dims": lambda ds: ds.rename({"latitude": "lat", "longitude": "lon"}),
    "float32": lambda ds: ds.assign({v: ds[v].astype("float32") for v in ("t2m", "sp", "u10", "v10")}),
    "hPa-and-degC": lambda ds: ds.assign(sp=(ds.sp / 100).assign_attrs(units="hPa"),
                                          t2m=(ds.t2m - 273.15).assign_attrs(units="degC")),
    # ERA5 (0001) and ERA5T (0005) mixed along an expver dimension, each NaN where the other holds data
    "expver-dimension": lambda ds: xr.concat(
        [ds.expand_dims("time").where(False), ds.expand_dims("time")], dim=pd.Index(["0001", "0005"], name="expver")
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_give_the_same_canonical_data(geocat, reference, name):
    out = cut_region(canonicalize(VARIANTS[name](geocat.copy()), source=name))
    assert list(out.data_vars) == ["sp", "t2m", "u10", "v10"]
    assert out.sizes == {"time": 1, "latitude": 41, "longitude": 41}
    assert np.array_equal(out.latitude, MEMPHIS.lats) and np.array_equal(out.longitude, MEMPHIS.lons)
    tol = 1e-5 if name in ("float32", "hPa-and-degC") else 0
    xr.testing.assert_allclose(out.drop_attrs(), reference.drop_attrs(), rtol=tol, atol=0)
    assert out.t2m.attrs["units"] == "K" and out.sp.attrs["units"] == "Pa"


def test_packed_int16_file_round_trips(geocat, reference, tmp_path):
    path = tmp_path / "packed.nc"
    enc = {v: {"dtype": "int16", "scale_factor": 0.01, "add_offset": 1000.0 if v == "sp" else 0.0,
               "_FillValue": -32767} for v in ("u10", "v10", "t2m")}
    enc["sp"] = {"dtype": "int16", "scale_factor": 2.0, "add_offset": 95000.0, "_FillValue": -32767}
    geocat[["sp", "t2m", "u10", "v10"]].to_netcdf(path, encoding=enc)
    out = cut_region(canonicalize(path))
    assert out.attrs["source"] == str(path)
    for v, step in (("sp", 2.0), ("t2m", 0.01), ("u10", 0.01)):
        assert float(np.abs(out[v] - reference[v]).max()) <= step / 2 + 1e-9


def test_real_file_in_physical_ranges(geocat_file):
    pts = to_points(cut_region(canonicalize(geocat_file)))
    assert pts.shape == (1, 1245, 4)
    sp, t2m = pts.sel(variable="sp"), pts.sel(variable="t2m")
    assert 95.0 < float(sp.min()) and float(sp.max()) < 103.0  # kPa, summer over Memphis
    assert 20.0 < float(t2m.min()) and float(t2m.max()) < 30.0  # degC, a July midday
    # the points carry their exact grid coordinates
    np.testing.assert_array_equal(pts.latitude.values, MEMPHIS.circle_lat)
    np.testing.assert_array_equal(pts.longitude.values, MEMPHIS.circle_lon)


def test_berlin_does_not_cover_the_region(berlin_file):
    with pytest.raises(LayoutError, match=r"feedinlib.*does not cover the memphis region.*52.35\.\.52.6"):
        cut_region(canonicalize(berlin_file))


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda ds: ds.drop_vars("u10"), r"missing variable\(s\) u10 \(10m_u_component_of_wind\)"),
        (lambda ds: ds.assign(sp=ds.sp.assign_attrs(units="bar")), "units 'bar'"),
        (lambda ds: ds.assign(t2m2=ds.t2m.rename("x")).rename({"t2m2": "2m_temperature"}), "both t2m"),
        (lambda ds: ds.drop_vars("time"), "no time or valid_time"),
        (lambda ds: ds.expand_dims(number=[0, 1]), "2 ensemble members"),
        (lambda ds: ds.isel(longitude=slice(0, None, 2)), "does not cover"),
    ],
)
def test_bad_inputs_are_refused_clearly(geocat, mutate, msg):
    with pytest.raises(LayoutError, match=msg):
        cut_region(canonicalize(mutate(geocat.copy()), source="bad.nc"))


def test_unreadable_file_named_in_the_error(tmp_path):
    bad = tmp_path / "truncated.nc"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x07" * 40)  # an HDF5 signature, then garbage
    with pytest.raises(LayoutError, match="truncated.nc: not a readable"):
        canonicalize(bad)
    with pytest.raises(LayoutError, match="no such file"):
        canonicalize(tmp_path / "absent.nc")
