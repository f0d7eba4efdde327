"""The service through TestClient (lifespan in a `with` block): answers, units, reproducibility, netCDF,
models, probes, metrics, auth, readiness, deadline and overload."""

from __future__ import annotations

import hashlib
import io
import threading
import time

import numpy as np
import pytest
import xarray as xr

from service.settings import Settings
from tests.test_service_common import example, running, small_ll_request, small_request, wait_ready


@pytest.fixture(scope="module")
def client():
    with running() as c:
        yield c


def test_extrapolate_json_echoes_coordinates_and_labels_everything(client):
    body = small_request(quantiles=[0.25, 0.75])
    r = client.post("/v1/extrapolate", json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["latitude"] == body["targets"]["latitude"] and j["longitude"] == body["targets"]["longitude"]
    assert j["model"] == {"version": "synthetic-default", "synthetic": True}
    assert j["units"]["t2m"] == "K" and j["units"]["sp"] == "Pa" and j["units"]["u10"] == "m s-1"
    assert j["sample"] == [0, 1] and j["sampler"] == {"name": "ode", "solver": "euler", "steps": 2, "blocks": 1,
                                                      "maps": None, "exact_density": True, "scored_by": "model",
                                                      "seed": 7, "nfe": 2}
    t2m = np.asarray(j["samples"]["t2m"])
    assert t2m.shape == (2, 6) and np.all((t2m > 200) & (t2m < 340))  # kelvin, not normalised
    assert np.allclose(j["mean"]["sp"], np.mean(j["samples"]["sp"], axis=0))
    assert j["quantiles"]["levels"] == [0.25, 0.75] and np.asarray(j["quantiles"]["u10"]).shape == (2, 6)
    ll = j["log_likelihood"]
    assert len(ll["values"]) == 2 and all(np.isfinite(ll["values"]))
    assert ll["kind"].startswith("joint") and ll["units"].startswith("nats")
    # the default model's targets are independent given its GP base: 'auto' is the exact block trace
    assert ll["estimator"] == "exact-blocks" and ll["n_probes"] == 1
    assert ll["solver"] == "midpoint" and ll["steps"] == 2
    assert ll["exact_density"] is True and ll["scored_by"] == "model"  # a global flow scores its own samples
    assert j["timing"]["engine_ms"] > 0


def test_a_request_naming_no_solver_runs_the_models_measured_one(client):
    """The default model records midpoint 4 for both sampling and likelihoods (docs/results.md §5.8; the
    global fallbacks are Euler 8 / midpoint 2 / midpoint 8), so a request that names no solver draws and
    scores its samples in one midpoint-4 solve; one that names either part runs what it names, the rest from
    the global default, and then scores its samples in a separate solve."""
    man = client.get("/v1/models/synthetic-default").json()
    assert man["solvers"]["sample"] == man["solvers"]["log_likelihood"] == "midpoint:4"
    body = small_request()
    body.pop("steps")
    body.pop("log_likelihood")
    j = client.post("/v1/extrapolate", json={**body, "include": ["mean", "log_likelihood"]}).json()
    assert (j["sampler"]["solver"], j["sampler"]["steps"], j["sampler"]["nfe"]) == ("midpoint", 4, 8)
    assert (j["log_likelihood"]["solver"], j["log_likelihood"]["steps"]) == ("midpoint", 4)
    assert j["log_likelihood"]["in_sampling_solve"] is True and j["log_likelihood"]["nfe"] == 8
    named = client.post("/v1/extrapolate", json={**body, "log_likelihood": {"steps": 8},
                                                 "include": ["log_likelihood"]}).json()
    assert named["log_likelihood"]["in_sampling_solve"] is False and named["log_likelihood"]["steps"] == 8
    j = client.post("/v1/extrapolate", json={**body, "solver": "midpoint", "include": ["mean"]}).json()
    assert (j["sampler"]["solver"], j["sampler"]["steps"]) == ("midpoint", 8)  # the rest from the global default
    ll = small_ll_request()
    ll.pop("steps")
    r = client.post("/v1/log-likelihood", json=ll).json()
    assert (r["solver"], r["steps"]) == ("midpoint", 4)
    r = client.post("/v1/log-likelihood", json={**ll, "solver": "euler"}).json()
    assert (r["solver"], r["steps"]) == ("euler", 8)  # named solver, the global default's steps


def test_same_seed_same_answer_and_seed_drawn_when_absent(client):
    body = small_request()
    a, b = client.post("/v1/extrapolate", json=body).json(), client.post("/v1/extrapolate", json=body).json()
    assert a["samples"] == b["samples"] and a["log_likelihood"]["values"] == b["log_likelihood"]["values"]
    c = client.post("/v1/extrapolate", json={**body, "seed": 8}).json()
    assert c["samples"] != a["samples"]
    body.pop("seed")
    d = client.post("/v1/extrapolate", json=body).json()
    again = client.post("/v1/extrapolate", json={**body, "seed": d["sampler"]["seed"]}).json()
    assert again["samples"] == d["samples"]  # the echoed seed reproduces an unseeded answer


def test_circle_targets_are_the_circle_minus_the_context(client):
    body = small_request(targets="circle", include=["mean"])
    j = client.post("/v1/extrapolate", json=body).json()
    assert len(j["latitude"]) == 1245 - 60 and "samples" not in j and "log_likelihood" not in j
    ctx = set(zip(body["context"]["latitude"], body["context"]["longitude"]))
    assert not ctx & set(zip(j["latitude"], j["longitude"]))


def test_netcdf_by_accept_header_and_by_format_opens_in_xarray(client):
    body = small_request()
    j = client.post("/v1/extrapolate", json=body).json()
    for r in (client.post("/v1/extrapolate", json=body, headers={"Accept": "application/x-netcdf"}),
              client.post("/v1/extrapolate", json={**body, "format": "netcdf"})):
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-netcdf"
        ds = xr.open_dataset(io.BytesIO(r.content))
        assert ds.attrs["Conventions"].startswith("CF-") and ds["sample"].attrs["standard_name"] == "realization"
        assert ds["t2m"].dims == ("sample", "point") and ds["t2m"].attrs["units"] == "K"
        np.testing.assert_array_equal(ds["latitude"].values, body["targets"]["latitude"])
        np.testing.assert_allclose(ds["t2m"].values, j["samples"]["t2m"])
        np.testing.assert_allclose(ds["log_likelihood"].values, j["log_likelihood"]["values"])
        assert ds["log_likelihood"].attrs["units"] == "nats" and "estimator" in ds["log_likelihood"].attrs
        assert "t2m_quantile" in ds and ds["quantile"].size == 3


def test_log_likelihood_hutchinson_spread_and_exact_trace(client):
    j = client.post("/v1/log-likelihood", json=small_ll_request(estimator="hutchinson", n_probes=3)).json()
    assert j["estimator"] == "hutchinson-rademacher" and j["n_probes"] == 3 and j["spread"] > 0
    assert j["kind"].startswith("joint") and j["n_targets"] == 6
    assert j["per_point"] == pytest.approx(j["joint"] / 6)
    # ERA5 units <-> normalised: differ by n * log|d normalised / d ERA5 units|
    ex = client.post("/v1/log-likelihood", json=small_ll_request(estimator="exact")).json()
    assert ex["estimator"] == "exact-blocks" and ex["spread"] is None and np.isfinite(ex["joint"])
    assert ex["joint"] != ex["joint_normalised"]
    # the probe mean is an unbiased estimate of the exact trace: close for a tiny model and 3 probes
    assert abs(j["joint"] - ex["joint"]) < 5 * max(j["spread"], 1.0)


def test_models_announce_the_synthetic_default(client):
    j = client.get("/v1/models").json()
    (m,) = j["models"]
    assert j["default"] == m["version"] == "synthetic-default" and m["synthetic"] is True
    assert "SYNTHETIC" in m["description"] and m["source"] == "embedded" and len(m["sha256"]) == 64
    # what it was trained on and its real-map figures are announced
    assert "broad" in m["trained_on"]["data"] and m["real_map"]["dense"]["rmse"]["sp"] > 0
    assert m["variables"]["t2m"]["units"] == "K" and m["region"]["circle_points"] == 1245
    assert client.get("/v1/models/synthetic-default").json()["sha256"] == m["sha256"]
    r = client.get("/v1/models/v9999")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_readme_example_requests_answer(client):
    """The README's curl examples post these very files."""
    r = client.post("/v1/extrapolate", json=example("extrapolate"))
    assert r.status_code == 200, r.text
    assert r.json()["context"]["time"] == "2017-01-15T12:00:00+00:00" and len(r.json()["latitude"]) == 3
    r = client.post("/v1/log-likelihood", json=example("log_likelihood"))
    assert r.status_code == 200, r.text


def test_probes_docs_and_metrics(client):
    assert client.get("/livez").json() == {"status": "alive"}
    assert client.get("/readyz").json()["status"] == "ready"
    spec = client.get("/openapi.json").json()
    assert "/v1/extrapolate" in spec["paths"] and "ExtrapolateRequest" in spec["components"]["schemas"]
    client.post("/v1/extrapolate", json=small_request())
    client.post("/v1/extrapolate", json={"nope": 1})
    text = client.get("/metrics").text
    assert 'flownp_requests_total{method="POST",route="/v1/extrapolate",status="200"}' in text
    assert 'status="422"' in text and "flownp_request_seconds_bucket" in text
    assert "flownp_in_flight_requests" in text and 'flownp_solver_evaluations_total{model="synthetic-default"' in text
    assert "flownp_points_served_total" in text and "flownp_samples_served_total" in text


def test_auth_on_with_plain_and_hashed_keys(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# keys\nsha256:" + hashlib.sha256(b"from-file").hexdigest() + "\n")
    with running(Settings(api_keys=["s3cret"], api_keys_file=keyfile)) as c:
        assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "from-file"}).status_code == 200
        r = c.post("/v1/extrapolate", json=small_request(), headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200
        assert c.post("/v1/extrapolate", json=small_request()).status_code == 401


@pytest.mark.filterwarnings("ignore")
def test_readyz_is_503_until_warmed_up(monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.engine import Engine

    gate = threading.Event()
    real = Engine.warm_up
    monkeypatch.setattr(Engine, "warm_up", lambda self, lm: (gate.wait(30), real(self, lm)))
    with TestClient(create_app(Settings())) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "retry-after" in r.headers
        assert c.get("/livez").status_code == 200
        r = c.post("/v1/extrapolate", json=small_request())
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        gate.set()
        wait_ready(c)
        assert c.post("/v1/extrapolate", json=small_request()).status_code == 200


def test_deadline_gives_504_and_overload_gives_503_with_retry_after(monkeypatch):
    import service.routes.inference as routes_mod

    with running(Settings(workers=1, max_queue=1)) as c:
        r = c.post("/v1/extrapolate", json=small_request(timeout_s=1e-6))
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        gate, started = threading.Event(), threading.Event()
        real = routes_mod.run_extrapolate

        def slow(*a, **kw):
            started.set()
            gate.wait(30)
            return real(*a, **kw)

        monkeypatch.setattr(routes_mod, "run_extrapolate", slow)
        first: list = []
        threads = [threading.Thread(target=lambda: first.append(c.post("/v1/extrapolate", json=small_request())))
                   for _ in range(2)]  # one runs, one waits in the queue
        threads[0].start()
        assert started.wait(30)
        threads[1].start()
        while c.app.state.engine.admission.jobs < 2:
            time.sleep(0.01)
        a = c.post("/v1/extrapolate", json=small_request())
        assert a.status_code == 503 and a.json()["error"]["code"] == "overloaded" and a.headers["retry-after"] == "1"
        b = c.post("/v1/extrapolate", json=small_request())
        assert b.status_code == 503 and "x-retry-ticket" not in b.headers  # one place in line, already held
        gate.set()
        for t in threads:
            t.join(30)
        assert [r.status_code for r in first] == [200, 200]
        post = lambda ticket=None: c.post("/v1/extrapolate", json=small_request(),  # noqa: E731
                                          headers={"X-Retry-Ticket": ticket} if ticket else {})
        assert post(a.headers["x-retry-ticket"]).status_code == 200
        assert post().status_code == 200
        assert post("forged-or-expired").status_code == 200  # an unknown ticket is just a newcomer
        assert 'flownp_rejected_total{reason="overloaded"} 2.0' in c.get("/metrics").text


def test_accept_header_negotiation():
    from service.errors import ApiError
    from service.http import choose_format

    assert choose_format(None, "") == "json" and choose_format(None, "*/*") == "json"
    assert choose_format(None, "application/x-netcdf") == "netcdf"
    assert choose_format(None, "application/json, application/x-netcdf;q=0.1") == "json"
    assert choose_format(None, "application/x-netcdf, application/json;q=0.5") == "netcdf"
    assert choose_format("json", "application/x-netcdf") == "json"  # the body's `format` wins
    with pytest.raises(ApiError) as e:
        choose_format(None, "text/html")
    assert e.value.status == 406


def test_python_client_retries_a_refusal_with_its_ticket():
    import httpx

    from service.client import Client, ServiceError

    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-retry-ticket"))
        if len(seen) < 3:
            return httpx.Response(503, headers={"Retry-After": "0", "X-Retry-Ticket": "t1"},
                                  json={"error": {"code": "overloaded", "message": "busy"}})
        return httpx.Response(200, json={"ok": True})

    with Client("http://test", transport=httpx.MockTransport(answer)) as c:
        assert c.extrapolate_json({}) == {"ok": True}
    assert seen == [None, "t1", "t1"]  # the first try has no ticket, every retry sends it back
    seen.clear()
    with Client("http://test", transport=httpx.MockTransport(answer), retries=1) as c:
        with pytest.raises(ServiceError) as e:
            c.extrapolate_json({})
    assert e.value.status == 503 and e.value.code == "overloaded" and len(seen) == 2
