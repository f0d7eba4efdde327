"""The Jupyter API against the service: the embedded default loads with `Extrapolator.from_default()`, the
region rule is the service's disc (one `ModelSpace.check_points`), and conversions are the one ModelSpace, so
the same request and seed give the same samples and log-likelihoods."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from flownp.api import Extrapolator
from ingest.region import MEMPHIS as R
from ingest.space import DomainError, ModelSpace
from service.settings import Settings
from tests.test_service_common import running, small_request, values


@pytest.fixture(scope="module")
def ex() -> Extrapolator:
    return Extrapolator.from_default()


def points(lat, lon) -> xr.Dataset:
    return xr.Dataset(coords={"latitude": ("point", np.atleast_1d(lat)), "longitude": ("point", np.atleast_1d(lon))})


def test_from_default_is_the_verified_synthetic_default(ex):
    from flownp import default_model

    man = default_model.read_manifest()
    assert ex.meta["version"] == man["version"] == "synthetic-default" and ex.meta["synthetic"] is True
    assert ex.meta["sha256"] == man["sha256"] and ex.region == R
    # the manifest says what network it is, from the config it was packed with
    assert man["description"] == default_model.describe(man["model_config"])
    assert man["model_config"]["arch"] in man["description"] and "SYNTHETIC" in man["description"]


def test_the_era5_log_jacobian_is_the_change_of_variables_of_the_conversion(ex):
    """log |d normalised / d ERA5| from finite differences of the conversion itself, and the 6.91 nats per
    point (ln 1000, Pa vs kPa) between densities over ERA5 and over model units."""
    x = np.array([[101325.0, 280.0, 3.0, -2.0]])
    h = np.array([10.0, 0.1, 0.1, 0.1])
    diag = [(ex.space.to_normalised(x + h * e)[0, j].astype(np.float64) - ex.space.to_normalised(x)[0, j]) / h[j]
            for j, e in enumerate(np.eye(4))]
    assert ex.space.log_jacobian("era5") == pytest.approx(float(np.log(np.abs(diag)).sum()), abs=1e-3)
    assert ex.space.log_jacobian("era5") - ex.space.log_jacobian("model") == pytest.approx(np.log(1e-3))


def test_square_corner_off_the_disc_is_refused_like_the_service(ex):
    ex._xy(points(35.0 + 4.9, -91.0))  # inside the disc: accepted
    with pytest.raises(ValueError, match="outside"):  # inside the square bounding box, outside the disc
        ex._xy(points(39.9, -95.9))
    with pytest.raises(DomainError) as e:
        ModelSpace(R, ex.normalizer).check_points([39.9], [-95.9], "targets")
    assert e.value.code == "out_of_region"


def test_api_and_service_accept_exactly_the_same_points(ex):
    rng = np.random.default_rng(0)
    b = R.bounds
    lat = rng.uniform(b["south"] - 0.5, b["north"] + 0.5, 400)
    lon = rng.uniform(b["west"] - 0.5, b["east"] + 0.5, 400)
    # and points right on the disc's edge, just inside and just outside
    ang = rng.uniform(0, 2 * np.pi, 50)
    for r in (R.radius_degrees - 1e-7, R.radius_degrees + 1e-7):
        lat = np.r_[lat, R.centre_lat + r * np.sin(ang)]
        lon = np.r_[lon, R.centre_lon + r * np.cos(ang)]
    for la, lo in zip(lat, lon):
        try:
            ModelSpace(R, ex.normalizer).check_points([la], [lo], "context")
            service_ok = True
        except DomainError:
            service_ok = False
        try:
            ex._xy(points(la, lo))
            api_ok = True
        except ValueError:
            api_ok = False
        assert api_ok == service_ok == bool(R.in_circle(la, lo)), (la, lo)


def test_same_request_and_seed_give_the_services_samples(ex):
    body = small_request(num_samples=2, steps=2, seed=11, include=["samples"])
    c, t = body["context"], body["targets"]
    ctx = points(c["latitude"], c["longitude"]).assign({n: ("point", np.asarray(v)) for n, v in c["values"].items()})
    out = ex.extrapolate(ctx, points(t["latitude"], t["longitude"]), num_samples=2, solver="euler:2", seed=11,
                         with_log_likelihood=False)
    with running(Settings(warmup=False)) as client:
        j = client.post("/v1/extrapolate", json=body).json()
    for n in ("sp", "t2m", "u10", "v10"):
        np.testing.assert_allclose(out[n].values, j["samples"][n], rtol=1e-6)



def with_values(ds: xr.Dataset) -> xr.Dataset:
    v = values(ds["latitude"].values, ds["longitude"].values)
    return ds.assign({n: ("point", np.asarray(x)) for n, x in v.items()})


def test_a_context_below_the_trained_minimum_is_refused_like_the_service(ex):
    assert ex.min_context == 50  # the default's n_ctx 50-1000, the service's trained_min_context
    with running(Settings(warmup=False)) as client:
        answers = {n: client.post("/v1/extrapolate", json=small_request(n_ctx=n)) for n in (49, 50)}
    for n_ctx, ok in ((49, False), (50, True)):
        body, r = small_request(n_ctx=n_ctx), answers[n_ctx]
        c, t = body["context"], body["targets"]
        ctx, tg = with_values(points(c["latitude"], c["longitude"])), points(t["latitude"], t["longitude"])
        if ok:
            assert r.status_code == 200
            ex.extrapolate(ctx, tg, num_samples=1, solver="euler:1", with_log_likelihood=False)
            continue
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_few"
        with pytest.raises(ValueError, match="context has 49 point.*at least 50"):
            ex.extrapolate(ctx, tg, num_samples=1, solver="euler:1", with_log_likelihood=False)
        with pytest.raises(ValueError, match="at least 50"):
            ex.log_likelihood(ctx, with_values(tg), solver="euler:1")
