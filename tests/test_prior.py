"""The broad weather prior: config validation, fixed fields, fronts, the per-map oracle against Monte
Carlo, reproducibility, speed, and the synthesize --law broad -> build -> oracle round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest
import xarray as xr

from flownp.jobs.baselines.idw import IDWPredictor
from flownp.jobs.baselines.oracle import PriorOraclePredictor
from ingest.normalize import Normalizer
from ingest.prior import (
    PARAMS_PATTERN,
    PRIOR_MANIFEST_NAME,
    BroadPriorConfig,
    BroadWeatherPrior,
    MapParams,
    map_seed,
    prior_from_law,
)
from ingest.region import MEMPHIS
from ingest.synthetic import GPWeather, season_times
from ingest.variables import era5_to_model

REF = Normalizer.reference()
N_MC = 3000


@pytest.fixture(scope="module")
def prior() -> BroadWeatherPrior:
    return BroadWeatherPrior()


@pytest.fixture(scope="module")
def front_params(prior: BroadWeatherPrior) -> MapParams:
    """One parameter draw with a front through the circle (seeded search)."""
    p1 = BroadWeatherPrior(BroadPriorConfig(p_front=1.0, front_offset_max_km=150.0))
    return p1.draw_params(7)


# ---- configuration ---------------------------------------------------------------------------------
def test_config_round_trip_and_validation() -> None:
    cfg = BroadPriorConfig(t2m_mean=(-5.0, 30.0), kernels=("se", "matern32"), p_front=0.25)
    assert BroadPriorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    bad = [
        (dict(t2m_mean=(35.0, -15.0)), "min 35.0 > max -15.0"),
        (dict(sp_length_km=(-100.0, 1500.0)), "sp_length_km must be > 0"),
        (dict(noise_sp=(0.0, 0.01)), "noise_sp must be > 0"),
        (dict(sp_std=(-1.0, 1.0)), "sp_std must be >= 0"),
        (dict(kernels=("se", "cubic")), r"unknown kernel name\(s\) \['cubic'\]"),
        (dict(sp_kernels=()), "non-empty"),
        (dict(p_front=1.5), r"p_front is a probability and must be in \[0, 1\]"),
        (dict(p_front=-0.1), "p_front"),
        (dict(anisotropy_max=0.5), "anisotropy_max must be >= 1"),
        (dict(front_dt=(1.0, float("nan"))), "finite"),
        (dict(sp_mean=(100.0,)), r"\(min, max\) pair"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            BroadPriorConfig(**kw)
    with pytest.raises(ValueError, match="unknown BroadPriorConfig field"):
        BroadPriorConfig.from_dict({"t2m_mean": [0, 1], "bogus": 1})


def test_params_round_trip(prior: BroadWeatherPrior, front_params: MapParams) -> None:
    for p in (front_params, prior.draw_params(1)):
        assert MapParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


# ---- fixed fields and the mean ---------------------------------------------------------------------
def test_terrain_is_fixed_smooth_and_rises_to_the_north_west(prior: BroadWeatherPrior) -> None:
    h = prior.terrain_m
    assert np.array_equal(h, BroadWeatherPrior().terrain_m)          # deterministic
    assert not np.array_equal(h, BroadWeatherPrior(BroadPriorConfig(terrain_seed=1)).terrain_m)
    assert h.shape == (41, 41) and h.min() == pytest.approx(0.0) and h.max() == pytest.approx(600.0)
    nw, se = h[30:, :10].mean(), h[:10, 30:].mean()                  # lat ascending, lon ascending
    assert nw > se + 250.0, (nw, se)
    assert max(np.abs(np.diff(h, axis=0)).max(), np.abs(np.diff(h, axis=1)).max()) < 60.0  # smooth
    d = prior.diurnal_pattern
    assert abs(d.mean()) < 1e-12 and np.abs(d).max() == pytest.approx(1.0)


def test_extra_mean_terrain_diurnal_and_front(prior: BroadWeatherPrior, front_params: MapParams) -> None:
    p0 = MapParams(front_params.gp, 1.0, 0.0, 0.0, None)
    m0 = prior.extra_mean(p0)
    np.testing.assert_allclose(m0[..., 0], -0.012 * prior.terrain_m)                 # kPa
    np.testing.assert_allclose(m0[..., 1], -6.5e-3 * prior.terrain_m)                # degC
    assert np.all(m0[..., 2:] == 0.0)
    p1 = MapParams(front_params.gp, 1.0, 0.0, 3.0, None)
    np.testing.assert_allclose(prior.extra_mean(p1)[..., 1] - m0[..., 1], 3.0 * prior.diurnal_pattern)
    # the front: t2m jump dt, trough along the line, the mean wind veers clockwise by veer_deg
    f = front_params.front
    assert f is not None
    m = prior.extra_mean(front_params) - prior.extra_mean(dataclasses.replace(front_params, front=None))
    d = prior.front_distance_km(f)
    warm, cold, line = d > 4 * max(f.width_km, f.trough_width_km), d < -4 * max(f.width_km, f.trough_width_km), np.abs(d) < 5.0
    assert warm.any() and cold.any() and line.any()
    assert m[..., 1][warm].mean() - m[..., 1][cold].mean() == pytest.approx(f.dt, rel=0.02)
    assert m[..., 0][line].mean() < -0.9 * f.trough_kpa and np.abs(m[..., 0][warm]).max() < 0.05 * f.trough_kpa
    ang = lambda sel: math.degrees(math.atan2(m[..., 3][sel].mean(), m[..., 2][sel].mean()))  # noqa: E731
    turn = (ang(warm) - ang(cold)) % 360.0                            # clockwise from warm to cold
    assert turn == pytest.approx(f.veer_deg, abs=2.0)
    speed = np.hypot(m[..., 2][cold].mean(), m[..., 3][cold].mean())
    assert speed == pytest.approx(f.wind_speed, rel=0.02)


def test_draws_span_all_seasons_and_terrain(prior: BroadWeatherPrior) -> None:
    _, maps = prior.sample_maps(300, 3)
    t_centre = maps[:, 20, 20, 1]
    assert t_centre.min() < -5.0 and t_centre.max() > 25.0           # winter and summer both
    sp = maps[..., 0]
    assert (sp[:, 35:, :6].mean() - sp[:, :6, 35:].mean()) < -4.0     # ~7 kPa lower on the high NW
    assert np.isfinite(maps).all()


# ---- the exact per-map law against Monte Carlo ------------------------------------------------------
def test_map_law_covariance_equals_gpweather(prior: BroadWeatherPrior, front_params: MapParams) -> None:
    law = prior.law(front_params)
    pts = np.array([0, 17, 400, 622, 901, 1244])
    np.testing.assert_allclose(law.covariance(pts), GPWeather.covariance(law, pts), rtol=1e-10, atol=1e-12)
    # anisotropy: a ratio != 1 really changes the lat vs lon correlation
    assert front_params.length_ratio != pytest.approx(1.0, abs=0.05)
    iso = prior.law(MapParams(front_params.gp, 1.0, 0.0, 0.0, front_params.front))
    assert not np.allclose(iso.covariance(pts), law.covariance(pts))


def test_oracle_matches_monte_carlo(prior: BroadWeatherPrior, front_params: MapParams) -> None:
    """Maps from ONE parameter draw (front included): empirical mean/covariance at a few points match
    the exact law, and the average oracle log-likelihood matches minus the conditional entropy."""
    law = prior.law(front_params)
    maps = law.sample_maps(N_MC, 11)
    pts_all = law.to_points(maps)                                   # (N, P, 4)
    # the prior's own sampling path draws from this same law: first map of a stream
    rng = np.random.default_rng(5)
    p, m1 = prior.sample_map(rng)
    rng2 = np.random.default_rng(5)
    assert prior.draw_params(rng2) == p
    np.testing.assert_array_equal(prior.law(p).sample_one(rng2), m1)

    pts = np.array([0, 300, 622, 1000, 1244])
    x = pts_all[:, pts].reshape(N_MC, -1)
    mu, cov = law.mean(pts).reshape(-1), law.covariance(pts)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(x.mean(0) - mu) < 5.0 * sd / math.sqrt(N_MC)), (x.mean(0) - mu) / sd
    emp = np.cov(x, rowvar=False)
    se = np.sqrt((np.outer(sd, sd) ** 2 + cov ** 2) / N_MC)
    assert np.all(np.abs(emp - cov) < 5.0 * se + 1e-12)

    rng = np.random.default_rng(0)
    perm = rng.permutation(MEMPHIS.n_points)
    ctx, tgt = perm[:40], perm[40:52]
    res = law.oracle_log_likelihood(ctx, pts_all[:, ctx], tgt, pts_all[:, tgt], REF)
    ll = res.joint_physical
    h = law.conditional_entropy(ctx, tgt)
    assert abs(ll.mean() + h) < 4.0 * ll.std() / math.sqrt(N_MC), (ll.mean(), -h)
    # knowing the front matters: the same GP without it scores far worse on these maps
    no_front = prior.law(MapParams(front_params.gp, front_params.length_ratio, front_params.t2m_grad_east,
                                   front_params.diurnal_amp, None))
    near = np.flatnonzero(np.abs(prior.front_distance_km(front_params.front)[MEMPHIS.circle_index[:, 0],
                                                                             MEMPHIS.circle_index[:, 1]]) < 60.0)
    tn = np.setdiff1d(near, ctx)[:12]
    good = law.oracle_log_likelihood(ctx, pts_all[:500, ctx], tn, pts_all[:500, tn], REF).joint.mean()
    bad = no_front.oracle_log_likelihood(ctx, pts_all[:500, ctx], tn, pts_all[:500, tn], REF).joint.mean()
    assert good > bad + 5.0, (good, bad)


def test_fronts_are_sharp_jumps_a_smooth_gp_cannot_make() -> None:
    base = dict(kernels=("se",), t2m_small_std=(0.2, 0.3), t2m_large_length_km=(400.0, 1500.0),
                front_dt=(8.0, 12.0), front_width_km=(10.0, 20.0), front_offset_max_km=200.0,
                diurnal_amp=(0.0, 0.0))
    with_f = BroadWeatherPrior(BroadPriorConfig(p_front=1.0, **base))
    without = BroadWeatherPrior(BroadPriorConfig(p_front=0.0, **base))

    def max_step(maps: np.ndarray) -> np.ndarray:  # largest t2m step between neighbouring cells
        t = maps[..., 1]
        return np.maximum(np.abs(np.diff(t, axis=1)).max((1, 2)), np.abs(np.diff(t, axis=2)).max((1, 2)))

    pf, mf = with_f.sample_maps(40, 1)
    _, m0 = without.sample_maps(40, 1)
    assert all(p.front is not None for p in pf)
    jumps, smooth = max_step(mf), max_step(m0)
    dts = np.array([p.front.dt for p in pf])
    assert np.all(jumps > 0.45 * dts), jumps / dts
    assert np.median(jumps) > 3.0 * np.max(smooth), (np.median(jumps), smooth.max())
    # across the front (3 widths each side, close along the normal) the jump is ~ dt in every map
    for p, m in zip(pf[:10], mf[:10]):
        d = with_f.front_distance_km(p.front)
        w = p.front.width_km
        a, b = (d > 3 * w) & (d < 3 * w + 40), (d < -3 * w) & (d > -3 * w - 40)
        if a.any() and b.any():
            assert m[..., 1][a].mean() - m[..., 1][b].mean() > 0.6 * p.front.dt


def test_season_from_time(prior: BroadWeatherPrior) -> None:
    seasonal = BroadWeatherPrior(BroadPriorConfig(season_from_time=True, season_jitter_degc=5.0))
    jan = season_times(1990, [1], range(1, 11), [0, 12])
    jul = season_times(1990, [7], range(1, 11), [0, 12])
    tj = np.array([seasonal.params_at(0, t).gp.t2m_mean for t in jan])
    tl = np.array([seasonal.params_at(0, t).gp.t2m_mean for t in jul])
    # centre 10 -/+ 20 cos(2 pi (day - 20) / 365.25), +- 5 jitter: early Jan <= -4, early Jul >= 22.5
    assert tj.max() < -4.0 and tl.min() > 22.5 and tj.min() >= -15.0 and tl.max() <= 35.0, (tj, tl)
    assert tj.std() > 2.0 and tl.std() > 2.0  # the jitter is there
    # off (the default): the same stream, time ignored; on: only t2m_mean differs
    off, on = prior.params_at(0, jan[0]), seasonal.params_at(0, jan[0])
    assert dataclasses.replace(on.gp, t2m_mean=off.gp.t2m_mean) == off.gp and on.front == off.front
    ps, _ = seasonal.sample_at_times(jul[:3], 0)
    assert ps == [seasonal.params_at(0, t) for t in jul[:3]]
    with pytest.raises(ValueError, match="season_jitter_degc"):
        BroadPriorConfig(season_jitter_degc=30.0)


# ---- reproducibility and speed -----------------------------------------------------------------------
def test_reproducible_from_seed_and_time(prior: BroadWeatherPrior) -> None:
    t = np.datetime64("1987-07-04T12:00", "ns")
    p1, m1 = prior.sample_map(map_seed(3, t))
    p2, m2 = prior.sample_map(map_seed(3, t))
    assert p1 == p2 and np.array_equal(m1, m2)
    assert prior.params_at(3, t) == p1
    assert prior.params_at(4, t) != p1 and prior.params_at(3, t + np.timedelta64(1, "h")) != p1
    times = season_times(1987, [7], [4], [11, 12, 13])
    ps, ms = prior.sample_at_times(times, 3)
    assert ps[1] == p1 and np.array_equal(ms[1], m1)
    a, b = prior.sample_maps(5, 9), prior.sample_maps(5, 9)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])


def test_sampling_speed(prior: BroadWeatherPrior) -> None:
    prior.sample_maps(5, 0)
    t0 = time.perf_counter()
    prior.sample_maps(200, 1)
    rate = 200 / (time.perf_counter() - t0)
    print(f"broad prior: {rate:.0f} maps/s")
    assert rate > 20.0, rate  # ~150-200 maps/s on one free core; loose for shared CI machines


# ---- files -> store -> per-map oracle --------------------------------------------------------------
def test_cli_round_trip_build_and_prior_oracle(tmp_path) -> None:
    from typer.testing import CliRunner

    from ingest.build import build_store
    from ingest.cli import app
    from ingest.store import Store
    from ingest.tasks import make_eval_set

    raw = tmp_path / "raw"
    res = CliRunner().invoke(app, ["synthesize", "--law", "broad", "--out", str(raw), "--years", "1986,1989",
                                   "--months", "7", "--days", "1", "--hours", "0,6,12,18", "--seed", "5",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "broad_prior_manifest.json" in res.output
    bad = CliRunner().invoke(app, ["synthesize", "--law", "student", "--out", str(raw)])
    assert bad.exit_code != 0 and "law must be" in bad.output
    (tmp_path / "bad.json").write_text(json.dumps({"p_front": 2.0}))
    bad = CliRunner().invoke(app, ["synthesize", "--law", "broad", "--out", str(tmp_path / "x"),
                                   "--prior-config", str(tmp_path / "bad.json")])
    assert bad.exit_code != 0 and "p_front" in bad.output
    man = json.loads((raw / PRIOR_MANIFEST_NAME).read_text())
    assert man["kind"] == "broad_prior" and man["seed"] == 5 and sorted(man["files"]) == [
        "era5_memphis_1986.nc", "era5_memphis_1989.nc"]
    prior, seed = prior_from_law({**man, "region": man["region"]})
    side = json.loads((raw / PARAMS_PATTERN.format(year=1989)).read_text())
    times = season_times(1989, [7], [1], [0, 6, 12, 18])
    assert [prior.params_at(5, t) for t in times] == [MapParams.from_dict(d) for d in side["params"]]
    with xr.open_dataset(raw / "era5_memphis_1989.nc") as ds:  # ERA5 layout (valid_time, Pa, K)
        era5 = np.stack([ds[v].values for v in ("sp", "t2m", "u10", "v10")], -1)[:, ::-1]
    _, expect = prior.sample_at_times(times, 5)
    np.testing.assert_allclose(era5_to_model(era5), expect, atol=2e-3)

    build_store(sorted(raw.glob("era5_memphis_*.nc")), tmp_path / "store", progress=False)
    store = Store.open(tmp_path / "store")
    assert store.manifest["synthetic"]["kind"] == "broad_prior"
    assert store.manifest["maps_per_split"]["train"] == 4 and store.manifest["maps_per_split"]["test"] == 4
    st_times, values = store.load("test")
    es = make_eval_set(st_times, MEMPHIS.n_points, split="test", n_tasks=4, n_ctx_min=150, n_ctx_max=200,
                       n_tgt=80, seed=0)
    batches = list(es.batches(values, MEMPHIS.circle_xy, st_times, batch_size=4))
    oracle = PriorOraclePredictor.from_store(store, "test")
    o = np.concatenate([oracle.log_likelihood(b).numpy() for b in batches])
    idw = np.concatenate([IDWPredictor().log_likelihood(b).numpy() for b in batches])
    assert np.isfinite(o).all() and o.mean() > idw.mean() + 40.0, (o.mean(), idw.mean())  # 80 targets
    # the map_index -> time mapping matters: the neighbouring map's law scores far worse
    wrong = PriorOraclePredictor.from_law(store.manifest["synthetic"], np.roll(st_times, 1), store.normalizer)
    w = np.concatenate([wrong.log_likelihood(b).numpy() for b in batches])
    assert o.mean() > w.mean() + 100.0, (o.mean(), w.mean())
    print(f"prior oracle {o.mean():.1f}, IDW {idw.mean():.1f}, wrong map's law {w.mean():.1f} nats per task (80 targets)")
    s = oracle.sample(batches[0], 3, __import__("torch").Generator().manual_seed(0))
    assert s.shape == (batches[0].yt.shape[0], 3, 80, 4) and np.isfinite(s.numpy()).all()
    from flownp.jobs.evaluate import evaluate_predictor, synthetic_law

    assert synthetic_law(store) is None  # no single GP law: evaluate uses PriorOraclePredictor
    ev = evaluate_predictor(oracle, batches, store.normalizer, n_samples=32, seed=0)
    assert ev["tar_ll"] == pytest.approx(o.mean() / 80, rel=1e-6)
    assert all(0.8 < c < 0.97 for c in ev["coverage90"].values()), ev["coverage90"]  # calibrated samples
