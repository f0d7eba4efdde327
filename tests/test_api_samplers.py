"""The Python API's sampler choice (issue 16 item 5): `Extrapolator.samplers` lists what the model offers;
`extrapolate(sampler=...)` runs the default or the named one and labels its samples and scores; an
unoffered sampler or a solver for distilled maps is a DomainError with the service's code; the same request
gives the same samples through the API and through the service."""

from __future__ import annotations

import numpy as np
import pytest

from flownp.api import Extrapolator
from ingest.space import DomainError
from service.settings import Settings
from tests.test_service_common import running, small_request
from tests.tiny_samplers import BLOCKS, loaded, tiny_checkpoint, write_served


def _datasets(ex: Extrapolator, body: dict):
    c, t = body["context"], body["targets"]
    r = ex.region
    idx = lambda lat, lon: [int(np.argmin((r.circle_lat - a) ** 2 + (r.circle_lon - b) ** 2))  # noqa: E731
                            for a, b in zip(lat, lon)]
    vals = np.stack([np.asarray(c["values"][n]) for n in ("sp", "t2m", "u10", "v10")], -1)
    return ex.circle_dataset(vals, idx(c["latitude"], c["longitude"])), \
        ex.circle_dataset(None, idx(t["latitude"], t["longitude"]))


@pytest.fixture(scope="module")
def distilled():
    return Extrapolator(loaded("distilled", "lfm"))


def test_samplers_and_the_default_distilled_draw_are_labelled(distilled):
    assert distilled.samplers["offered"] == ["distilled", "lfm"] and distilled.samplers["default"] == "distilled"
    ctx, tgt = _datasets(distilled, small_request())
    out = distilled.extrapolate(ctx, tgt, num_samples=2, seed=7)
    assert out.attrs["sampler_name"] == "distilled" and out.attrs["sampler"] == "distilled: 2 one-step maps"
    assert out.attrs["exact_density"] == 0 and out.attrs["nfe"] == 2
    ll = out["log_likelihood"].attrs
    assert ll["exact_density"] == 0 and ll["scored_by"] == "teacher (lfm)"
    taught = distilled.extrapolate(ctx, tgt, num_samples=2, seed=7, sampler="lfm", solver="euler:2")
    assert taught.attrs["sampler"] == "lfm: euler, 2 steps per block, 2 blocks" and taught.attrs["nfe"] == BLOCKS * 2
    assert taught["log_likelihood"].attrs["exact_density"] == 1
    score = distilled.log_likelihood(ctx, tgt.assign({n: out[n].isel(sample=0) for n in ("sp", "t2m", "u10", "v10")}))
    assert score.attrs["scored_by"] == "teacher (lfm)" and score.attrs["exact_density"] == 0


def test_an_unoffered_sampler_or_a_solver_for_maps_is_a_domain_error(distilled):
    ctx, tgt = _datasets(distilled, small_request())
    with pytest.raises(DomainError, match="offers sampler.s. distilled, lfm") as e:
        distilled.extrapolate(ctx, tgt, sampler="ode")
    assert e.value.code == "sampler_not_offered"
    with pytest.raises(DomainError, match="no solver") as e:
        distilled.extrapolate(ctx, tgt, solver="euler:4")
    assert e.value.code == "not_applicable"


@pytest.mark.parametrize("kind, sampler", [("distilled", None), ("lfm", None)])
def test_the_api_and_the_service_give_the_same_samples(tmp_path, kind, sampler):
    path = write_served(tiny_checkpoint(kind), tmp_path / f"{kind}.pt")
    body = small_request(steps=None if kind == "distilled" else 2, include=["samples"])
    with running(Settings(checkpoint=path, warmup=False)) as c:
        served = c.post("/v1/extrapolate", json=body).json()
    ex = Extrapolator(loaded(kind))
    ctx, tgt = _datasets(ex, body)
    out = ex.extrapolate(ctx, tgt, num_samples=2, seed=7, sampler=sampler, with_log_likelihood=False,
                         solver=None if kind == "distilled" else "euler:2")
    assert served["sampler"]["name"] == out.attrs["sampler_name"] == kind
    np.testing.assert_allclose(np.asarray(served["samples"]["t2m"]), out["t2m"].values, rtol=1e-5)
