"""Synthetic GP weather: sampler vs exact moments, the oracle, ERA5 netCDF layouts, seeded seasons."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from scipy.stats import multivariate_normal

from ingest.io import sha256_file
from ingest.normalize import Normalizer
from ingest.region import MEMPHIS
from ingest.synthetic import (
    MANIFEST_NAME,
    GPWeather,
    GPWeatherConfig,
    difference_matrix,
    parse_int_list,
    season_times,
    synthesize,
    synthesize_cli,
    write_era5_netcdf,
)
from ingest.variables import era5_to_model

N_MC = 3000
REF = Normalizer.reference()


@pytest.fixture(scope="module")
def gp() -> GPWeather:
    return GPWeather(GPWeatherConfig())


@pytest.fixture(scope="module")
def maps(gp: GPWeather) -> np.ndarray:
    return gp.sample_maps(N_MC, 1234)


@pytest.fixture(scope="module")
def points(gp: GPWeather, maps: np.ndarray) -> np.ndarray:
    return gp.to_points(maps)  # (N, P, 4)


def _lookup() -> np.ndarray:
    lut = np.full((MEMPHIS.size, MEMPHIS.size), -1)
    ci = MEMPHIS.circle_index
    lut[ci[:, 0], ci[:, 1]] = np.arange(len(ci))
    return lut


# ---- configuration ---------------------------------------------------------------------------------
def test_config_round_trip_and_validation() -> None:
    cfg = GPWeatherConfig(sp_std=1.1, wind_small_kernel="matern32", time_correlation_hours=6.0)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert GPWeatherConfig.from_dict(d) == cfg
    with pytest.raises(ValueError):
        GPWeatherConfig(sp_kernel="cubic")
    with pytest.raises(ValueError):
        GPWeatherConfig(noise_sp=0.0)
    with pytest.raises(ValueError):
        GPWeatherConfig.from_dict({**d, "bogus": 1.0})


def test_difference_matrix() -> None:
    d = difference_matrix(5)
    x = np.arange(5.0) ** 2
    np.testing.assert_allclose(d @ x, [1.0, 2.0, 4.0, 6.0, 7.0])  # one-sided, central, one-sided


# ---- sampler vs exact moments ----------------------------------------------------------------------
def test_sample_shapes_and_seeding(gp: GPWeather) -> None:
    a = gp.sample_maps(3, 7)
    b = gp.sample_maps(3, np.random.default_rng(7))
    assert a.shape == (3, 41, 41, 4) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, gp.sample_maps(3, 8))
    assert gp.sample_maps(2, 0, dtype=np.float32).dtype == np.float32


def test_empirical_covariance_matches_exact(gp: GPWeather, points: np.ndarray) -> None:
    sel = np.array([0, 100, 622, 623, 664, 1000, 1244])  # edges, centre and its neighbours
    x = points[:, sel].reshape(N_MC, -1)
    mu, cov = gp.mean(sel).reshape(-1), gp.covariance(sel)
    se_mean = np.sqrt(np.diag(cov) / N_MC)
    assert np.max(np.abs(x.mean(0) - mu) / se_mean) < 5.0
    emp = np.cov(x, rowvar=False)
    d = np.sqrt(np.diag(cov))
    se = np.sqrt((np.outer(d, d) ** 2 + cov**2) / N_MC)
    z = np.abs(emp - cov) / se
    assert z.max() < 5.5, z.max()
    np.testing.assert_allclose(np.diag(emp), np.diag(cov), rtol=0.1)


def test_wind_sign_and_pressure_coupling(gp: GPWeather, maps: np.ndarray) -> None:
    """u ~ -dp/dy, v ~ +dp/dx, cold highs: checked in the samples against physics (np.gradient on the
    sampled maps) and against the exact covariance of the same linear combinations."""
    i, j = 20, 20
    dpdy = maps[:, i + 1, j, 0] - maps[:, i - 1, j, 0]  # northward pressure difference
    dpdx = maps[:, i, j + 1, 0] - maps[:, i, j - 1, 0]  # eastward
    u, v, t = maps[:, i, j, 2], maps[:, i, j, 3], maps[:, i, j, 1]
    assert np.corrcoef(u, dpdy)[0, 1] < -0.6
    assert np.corrcoef(v, dpdx)[0, 1] > 0.6
    assert abs(np.corrcoef(u, dpdx)[0, 1]) < 0.15 and abs(np.corrcoef(v, dpdy)[0, 1]) < 0.15
    assert np.corrcoef(t, maps[:, i, j, 0])[0, 1] < -0.05
    # the same in the exact covariance
    lut = _lookup()
    pts = [lut[i, j], lut[i + 1, j], lut[i - 1, j], lut[i, j + 1], lut[i, j - 1]]
    cov = gp.covariance(pts)
    w_dy = np.zeros(20)
    w_dy[4 * 1 + 0], w_dy[4 * 2 + 0] = 1.0, -1.0
    w_dx = np.zeros(20)
    w_dx[4 * 3 + 0], w_dx[4 * 4 + 0] = 1.0, -1.0
    e_u, e_v = np.eye(20)[2], np.eye(20)[3]
    for w, e, emp_x, emp_y in ((w_dy, e_u, u, dpdy), (w_dx, e_v, v, dpdx)):
        exact = e @ cov @ w
        var_x, var_y = e @ cov @ e, w @ cov @ w
        emp = np.cov(emp_x, emp_y)[0, 1]
        se = np.sqrt((var_x * var_y + exact**2) / N_MC)
        assert abs(emp - exact) < 4 * se, (emp, exact, se)


def test_hourly_maps_are_ar1_with_stationary_marginal(gp: GPWeather) -> None:
    # pairs (k * 1000 h, k * 1000 h + lag): pairs are independent (gap >> 12 h), so the within-pair
    # correlation estimates exp(-lag / tau) with many effective samples
    n_pairs, tau = 600, gp.config.time_correlation_hours
    for lag, tol in ((1.0, 0.025), (12.0, 0.12)):
        base = 1000.0 * np.arange(n_pairs)
        hours = np.stack([base, base + lag], axis=1).reshape(-1)
        sp = gp.sample_sequence(hours, int(lag))[:, 20, 20, 0].reshape(n_pairs, 2)
        assert abs(np.corrcoef(sp[:, 0], sp[:, 1])[0, 1] - np.exp(-lag / tau)) < tol
        assert abs(np.corrcoef(sp[:-1, 1], sp[1:, 0])[0, 1]) < 0.15  # 1000 h apart: independent
        assert 0.9 < sp.std() / gp.config.sp_std < 1.1  # the stationary marginal
    m = gp.sample_maps(48, 3, hourly=True)
    assert m.shape == (48, 41, 41, 4)
    assert np.corrcoef(m[:-1, 20, 20, 0], m[1:, 20, 20, 0])[0, 1] > 0.5
    with pytest.raises(ValueError):
        gp.sample_sequence([0.0, 0.0], 0)


def test_realistic_scales(gp: GPWeather, maps: np.ndarray, points: np.ndarray) -> None:
    pooled = points.reshape(-1, 4)
    std, mean = pooled.std(0), pooled.mean(0)
    assert 1.0 <= std[0] <= 1.5 and abs(mean[0] - 100.1) < 0.2
    assert 4.0 <= std[1] <= 9.0
    assert 2.0 <= std[2] <= 4.0 and 2.0 <= std[3] <= 4.0
    assert abs(maps[:, 20, 20, 1].mean() - 7.5) < 0.5
    north, south = maps[:, -1, :, 1].mean(), maps[:, 0, :, 1].mean()  # latitudes ascending
    assert south - north == pytest.approx(10.0, abs=1.0)  # about -1 degC per degree latitude
    # lower mean pressure to the north-west
    assert gp.grid_mean[-1, 0, 0] < gp.grid_mean[0, -1, 0]
    np.testing.assert_allclose(gp.marginal_std()[:, 0], gp.config.sp_std, rtol=1e-3)


# ---- the oracle ------------------------------------------------------------------------------------
def test_oracle_average_matches_minus_conditional_entropy(gp: GPWeather, points: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    perm = rng.permutation(MEMPHIS.n_points)
    ctx, tgt = perm[:40], perm[40:65]
    res = gp.oracle_log_likelihood(ctx, points[:, ctx], tgt, points[:, tgt], REF)
    ll = res.joint_physical
    assert ll.shape == (N_MC,)
    h = gp.conditional_entropy(ctx, tgt)
    se = ll.std() / np.sqrt(N_MC)
    assert abs(ll.mean() + h) < 4 * se, (ll.mean(), -h, se)
    d = 4 * tgt.size  # log-lik = const - chi2_d / 2: variance d / 2
    assert ll.var() == pytest.approx(d / 2, rel=0.15)

    # power: a sampler whose wind sign or pressure coupling disagreed with the oracle is detected
    flipped_u = points.copy()
    flipped_u[..., 2] = 2 * gp.config.u_mean - flipped_u[..., 2]
    bad = gp.oracle_log_likelihood(ctx, flipped_u[:, ctx], tgt, flipped_u[:, tgt], REF).joint_physical
    assert bad.mean() < -h - 50 * se
    flipped_p = points.copy()
    mu = gp.circle_mean
    flipped_p[..., 0] = 2 * mu[:, 0] - flipped_p[..., 0]
    bad = gp.oracle_log_likelihood(ctx, flipped_p[:, ctx], tgt, flipped_p[:, tgt], REF).joint_physical
    assert bad.mean() < -h - 50 * se


def test_oracle_normalised_vs_physical(gp: GPWeather, points: np.ndarray) -> None:
    ctx, tgt = np.arange(0, 60), np.arange(60, 90)
    r = gp.oracle_log_likelihood(ctx, points[:5, ctx], tgt, points[:5, tgt], REF)
    np.testing.assert_allclose(r.joint - r.joint_physical, tgt.size * REF.log_std_sum, rtol=0, atol=1e-9)
    np.testing.assert_allclose(r.tar_ll, r.joint / tgt.size)
    np.testing.assert_allclose(r.tar_ll_physical, r.joint_physical / tgt.size)
    assert r.log_std_sum == pytest.approx(4.988, abs=1e-3)
    # a single (unbatched) task gives 0-d results equal to the batched ones
    one = gp.oracle_log_likelihood(ctx, points[2, ctx], tgt, points[2, tgt], REF)
    assert one.joint.shape == () and float(one.joint) == pytest.approx(float(r.joint[2]), rel=1e-12)
    assert int(one.n_targets) == tgt.size and int(one.n_context) == ctx.size


def test_oracle_equals_scipy_and_conditional(gp: GPWeather, points: np.ndarray) -> None:
    ctx, tgt = np.array([5, 300, 622, 900]), np.array([10, 623, 1200])
    y_c, y_t = points[7, ctx], points[7, tgt]
    # empty context: the unconditional Gaussian density
    r0 = gp.oracle_log_likelihood(np.zeros(0, int), np.zeros((0, 4)), tgt, y_t, REF)
    ref0 = multivariate_normal(gp.mean(tgt).reshape(-1), gp.covariance(tgt)).logpdf(y_t.reshape(-1))
    assert float(r0.joint_physical) == pytest.approx(ref0, rel=1e-10)
    m0, c0 = gp.conditional([], np.zeros((0, 4)), tgt)
    np.testing.assert_allclose(m0, gp.mean(tgt))
    np.testing.assert_allclose(c0, gp.covariance(tgt), rtol=1e-10, atol=1e-12)
    # with a context: joint minus context density, and the conditional law
    allp = np.concatenate([ctx, tgt])
    y_all = np.concatenate([y_c, y_t]).reshape(-1)
    joint = multivariate_normal(gp.mean(allp).reshape(-1), gp.covariance(allp)).logpdf(y_all)
    marg = multivariate_normal(gp.mean(ctx).reshape(-1), gp.covariance(ctx)).logpdf(y_c.reshape(-1))
    r = gp.oracle_log_likelihood(ctx, y_c, tgt, y_t, REF)
    assert float(r.joint_physical) == pytest.approx(joint - marg, rel=1e-9)
    m, c = gp.conditional(ctx, y_c, tgt)
    assert m.shape == (3, 4) and c.shape == (12, 12)
    assert multivariate_normal(m.reshape(-1), c).logpdf(y_t.reshape(-1)) == pytest.approx(
        float(r.joint_physical), rel=1e-9)
    mb, _ = gp.conditional(ctx, points[:4, ctx], tgt)
    assert mb.shape == (4, 3, 4)
    np.testing.assert_allclose(mb[3], gp.conditional(ctx, points[3, ctx], tgt)[0])


def test_oracle_per_task_indices(gp: GPWeather, points: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    perms = np.stack([rng.permutation(MEMPHIS.n_points)[:50] for _ in range(3)])
    cidx, tidx = perms[:, :30], perms[:, 30:]
    cv = np.stack([points[k, cidx[k]] for k in range(3)])
    tv = np.stack([points[k, tidx[k]] for k in range(3)])
    r = gp.oracle_log_likelihood(cidx, cv, tidx, tv, REF)
    for k in range(3):
        rk = gp.oracle_log_likelihood(cidx[k], cv[k], tidx[k], tv[k], REF)
        assert float(rk.tar_ll) == pytest.approx(r.tar_ll[k], rel=1e-12)
    with pytest.raises(ValueError):
        gp.oracle_log_likelihood([1, 2], points[0, [1, 2]], [2, 3], points[0, [2, 3]], REF)


def test_grid_block_matches_circle_covariance(gp: GPWeather) -> None:
    ci = MEMPHIS.circle_index
    g = ci[:, 0] * MEMPHIS.size + ci[:, 1]
    sel = np.array([0, 622, 1244])
    blk = gp.grid_covariance_block("sp", "u10")[np.ix_(g[sel], g[sel])]
    np.testing.assert_allclose(blk, gp.covariance(sel)[0::4, 2::4], rtol=1e-12, atol=1e-15)


def test_conditioning_on_all_other_points_leaves_the_noise_floor(gp: GPWeather, points: np.ndarray) -> None:
    lut = _lookup()
    tgt = np.array([lut[20, 20], 0])  # the centre and an edge point
    ctx = np.setdiff1d(np.arange(MEMPHIS.n_points), tgt)
    m, c = gp.conditional(ctx, points[0, ctx], tgt)
    sd = np.sqrt(np.diag(c)).reshape(2, 4)
    noise = np.asarray(gp.config.noise)
    assert np.all(sd >= noise * (1 - 1e-9))  # the target's own noise cannot be predicted
    assert np.all(sd[0] < 1.5 * noise)       # interior: near the floor
    assert np.all(sd[1] < 2.5 * noise)       # edge: one-sided neighbours
    assert np.all(np.abs(m - points[0, tgt]) < 6 * sd)


# ---- netCDF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["legacy", "current"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("lon360", [False, True])
def test_write_era5_netcdf_round_trip(tmp_path, gp: GPWeather, layout: str, packed: bool, lon360: bool) -> None:
    m = gp.sample_maps(6, 11)
    times = np.arange("1990-01-31T22", "1990-02-01T04", dtype="datetime64[h]")
    long_names = packed and lon360
    path = write_era5_netcdf(m, times, tmp_path / "x.nc", layout=layout, packed=packed, lon360=lon360,
                             long_names=long_names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nc"]  # atomic: no leftovers
    names = (["surface_pressure", "2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind"]
             if long_names else ["sp", "t2m", "u10", "v10"])
    with xr.open_dataset(path) as ds:
        tdim = "valid_time" if layout == "current" else "time"
        assert ds[names[0]].dims == (tdim, "latitude", "longitude")
        np.testing.assert_array_equal(ds[tdim].values, times.astype("datetime64[ns]"))
        if layout == "current":
            assert int(ds["number"]) == 0 and ds["number"].ndim == 0
            assert list(ds["expver"].values) == ["0001"] * 6 and ds["expver"].dims == ("valid_time",)
        else:
            assert "number" not in ds.variables and "expver" not in ds.variables
        lat, lon = ds["latitude"].values, ds["longitude"].values
        assert lat[0] == 40.0 and lat[-1] == 30.0  # north first
        assert (lon.min(), lon.max()) == ((264.0, 274.0) if lon360 else (-96.0, -86.0))
        units = [ds[n].attrs["units"] for n in names]
        assert units == ["Pa", "K", "m s-1", "m s-1"]
        assert ds[names[1]].attrs["long_name"] == "2 metre temperature"
        assert ds[names[0]].attrs["standard_name"] == "surface_air_pressure"
        assert ds[names[0]].encoding["dtype"] == (np.int16 if packed else np.float32)
        era5 = np.stack([ds[n].values for n in names], axis=-1).astype(np.float64)
        assert 9e4 < era5[..., 0].mean() < 1.1e5 and 250 < era5[..., 1].mean() < 300
        scales = [ds[n].encoding.get("scale_factor", 0.0) for n in names]
    back = era5_to_model(era5[:, ::-1])  # latitudes ascending again
    tol = np.array([max(s / 2, 0) for s in scales]) * np.array([1e-3, 1, 1, 1]) + np.array(
        [1e-5, 3e-5, 1e-6, 1e-6])
    assert np.all(np.abs(back - m) <= tol * 1.01)


def test_write_era5_netcdf_ascending_and_errors(tmp_path, gp: GPWeather) -> None:
    m = gp.sample_maps(2, 0)
    t = np.array(["2001-12-01T00", "2001-12-01T01"], dtype="datetime64[h]")
    p = write_era5_netcdf(m, t, tmp_path / "a.nc", descending_lat=False)
    with xr.open_dataset(p) as ds:
        assert ds["latitude"].values[0] == 30.0
        np.testing.assert_allclose(ds["sp"].values / 1000.0, m[..., 0], atol=1e-5)
    with pytest.raises(ValueError):
        write_era5_netcdf(m, t[:1], tmp_path / "b.nc")
    with pytest.raises(ValueError):
        write_era5_netcdf(m, t, tmp_path / "c.nc", layout="grib")


# ---- seasons of files ------------------------------------------------------------------------------
def test_season_times() -> None:
    t = season_times(1988, (12, 2), days=range(28, 32), hours=(0, 12))
    # Feb 1988 has 29 days: 28, 29; December: 28..31
    assert t.size == (2 + 4) * 2
    assert str(t[0])[:13] == "1988-02-28T00" and str(t[-1])[:13] == "1988-12-31T12"
    assert season_times(1987, (1, 2, 12)).size == (31 + 28 + 31) * 24


def test_synthesize_reproducible_and_manifest(tmp_path) -> None:
    kw = dict(days=range(1, 3), hours=(0, 6, 12, 18), seed=5, progress=False)
    a = synthesize(tmp_path / "a", [1986, 1987], **kw)
    b = synthesize(tmp_path / "b", [1987], **kw)
    c = synthesize(tmp_path / "c", [1987], **{**kw, "seed": 6})
    assert [p.name for p in a] == ["era5_memphis_1986.nc", "era5_memphis_1987.nc"]
    with xr.open_dataset(a[1]) as da, xr.open_dataset(b[0]) as db, xr.open_dataset(c[0]) as dc:
        assert da.sizes["valid_time"] == 3 * 2 * 4
        np.testing.assert_array_equal(da["t2m"].values, db["t2m"].values)  # same seed, same year
        assert not np.array_equal(da["t2m"].values, dc["t2m"].values)
        months = da["valid_time"].dt.month.values
        assert set(months) == {1, 2, 12} and set(da["valid_time"].dt.day.values) == {1, 2}
    assert sha256_file(a[1]) == sha256_file(b[0])  # identical bytes
    man = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    assert man["seed"] == 5 and man["years"] == [1986, 1987] and man["layout"] == "current"
    assert man["files"]["era5_memphis_1986.nc"]["sha256"] == sha256_file(a[0])
    gp = GPWeather.from_manifest(tmp_path / "a")
    assert gp.config == GPWeatherConfig() and gp.region == MEMPHIS
    # a second run with the same settings adds to the manifest
    synthesize(tmp_path / "a", [1990], **kw)
    man = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    assert man["years"] == [1986, 1987, 1990] and len(man["files"]) == 3


def test_parse_int_list() -> None:
    assert parse_int_list("1986,1988-1989") == (1986, 1988, 1989)
    assert parse_int_list(" 12, 1,2 ,1") == (1, 2, 12)
    with pytest.raises(ValueError):
        parse_int_list("5-3")
    with pytest.raises(ValueError):
        parse_int_list("")


def test_synthesize_cli(tmp_path) -> None:
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("synthesize")(synthesize_cli)
    app.command("noop")(lambda: None)  # two commands: `synthesize` stays a subcommand
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["synthesize", "--out", str(out), "--years", "1986", "--days", "1",
                                   "--hours", "0-2", "--seed", "3", "--layout", "legacy", "--packed",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    with xr.open_dataset(out / "era5_memphis_1986.nc") as ds:
        assert ds.sizes["time"] == 3 * 3 and ds["t2m"].encoding["dtype"] == np.int16
    assert json.loads((out / MANIFEST_NAME).read_text())["packed"] is True
    bad = CliRunner().invoke(app, ["synthesize", "--out", str(out), "--layout", "grib"])
    assert bad.exit_code != 0
