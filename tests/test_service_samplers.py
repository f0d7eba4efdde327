"""Every model kind is served with its samplers (issue 16 item 5): a registry holding a global FlowNP, an
LFM and two distilled samplers (of the LFM, and of the global flow with a recorded default) serves all of
them; each lists what it offers and its default; a request runs the default or the sampler it names, and
is refused one the model does not offer; distilled samples and scores say they are the teacher's; the
deadline stops LFM and distilled solves; the cost counts each sampler's evaluations."""

from __future__ import annotations

import io
import time

import pytest
import xarray as xr

from flownp.core.model import FlowNP
from flownp.registry import Registry
from service.admission import request_cost
from service.sampling import sampling_for
from service.settings import Settings
from tests.test_service_common import running, small_ll_request, small_request, wait_for
from tests.tiny_samplers import BLOCKS, loaded, tiny_checkpoint, write_served

RECORDED = {"default": "ode", "measured": {"by": "bench/sampling_latency.py", "crps_ratio": {"ode": 1.0}}}
VERSIONS = {"v0001": ("flownp", "lfm", None), "v0002": ("lfm", "lfm", None), "v0003": ("distilled", "lfm", None),
            "v0004": ("distilled", "flownp", RECORDED)}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("samplers") / "registry"
    reg = Registry(root)
    for v, (kind, teacher, rec) in VERSIONS.items():
        path = write_served(tiny_checkpoint(kind, teacher, samplers=rec), root.parent / f"{v}.pt")
        assert reg.add(path, metrics={}) == v
    reg.promote("v0002")  # the LFM is the default model
    return root


@pytest.fixture(scope="module")
def client(registry):
    with running(Settings(registry=registry, registry_all=True)) as c:
        yield c


def post(c, model: str | None = None, **kw):
    body = small_request(**kw)
    if model:
        body["model"] = model
    return c.post("/v1/extrapolate", json=body)


# ---- listed with their samplers ---------------------------------------------------------------------
def test_every_kind_is_served_and_listed_with_its_samplers_and_default(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    got = {m["version"]: m for m in r.json()["models"]}
    assert r.json()["default"] == "v0002" and set(got) == set(VERSIONS)
    want = {"v0001": ("flownp", ["ode"], "ode", "model kind"), "v0002": ("lfm", ["lfm"], "lfm", "model kind"),
            "v0003": ("distilled", ["distilled", "lfm"], "distilled", "model kind"),
            "v0004": ("distilled", ["distilled", "ode"], "ode", "recorded comparison")}
    for v, (kind, offered, default, chosen_by) in want.items():
        s = got[v]["samplers"]
        assert (got[v]["model_kind"], s["offered"], s["default"], s["chosen_by"]) == (kind, offered, default, chosen_by)
        assert got[v]["exact_density"] is (kind != "distilled")
    assert got["v0004"]["samplers"]["measured"] == RECORDED["measured"]
    assert got["v0002"]["samplers"]["details"]["lfm"]["blocks"] == BLOCKS
    assert got["v0003"]["samplers"]["details"]["distilled"] == {
        "maps": 2, "evaluations": 2, "exact_density": False,
        "log_likelihood": "the teacher (lfm)'s: the maps define no density"}
    assert client.get("/v1/models/v0003").json()["samplers"] == got["v0003"]["samplers"]


# ---- sampling: the default, or the one named ---------------------------------------------------------
def test_an_lfm_samples_through_its_blocks_and_scores_exactly(client):
    j = post(client).json()  # the default model (v0002, the LFM), its default sampler
    s = j["sampler"]
    assert (s["name"], s["solver"], s["steps"], s["blocks"], s["maps"], s["nfe"]) == ("lfm", "euler", 2, BLOCKS,
                                                                                   None, BLOCKS * 2)
    ll = j["log_likelihood"]
    assert ll["exact_density"] is True and ll["scored_by"] == "model" and ll["blocks"] == BLOCKS
    assert post(client, sampler="lfm").json()["samples"] == j["samples"]  # named = the default


def test_a_distilled_sample_runs_its_maps_and_says_its_scores_are_the_teachers(client):
    r = post(client, "v0003", steps=None)
    assert r.status_code == 200, r.text
    j = r.json()
    assert {k: j["sampler"][k] for k in ("name", "solver", "steps", "blocks", "maps", "nfe", "exact_density")} == {
        "name": "distilled", "solver": None, "steps": None, "blocks": None, "maps": 2, "nfe": 2, "exact_density": False}
    ll = j["log_likelihood"]
    assert ll["exact_density"] is False and ll["scored_by"] == "teacher (lfm)" and ll["blocks"] == BLOCKS
    # the teacher's sampler, on request: the LFM's blocks, scored exactly by the same teacher
    t = post(client, "v0003", sampler="lfm").json()
    assert t["sampler"]["name"] == "lfm" and t["sampler"]["nfe"] == BLOCKS * 2
    assert t["log_likelihood"]["exact_density"] is True and t["log_likelihood"]["scored_by"] == "teacher (lfm)"
    assert t["samples"] != j["samples"]


def test_a_recorded_default_runs_when_no_sampler_is_named(client):
    j = post(client, "v0004").json()
    assert j["sampler"]["name"] == "ode" and j["sampler"]["nfe"] == 2  # the global teacher, Euler 2
    d = post(client, "v0004", sampler="distilled", steps=None).json()
    assert d["sampler"]["name"] == "distilled" and d["log_likelihood"]["scored_by"] == "teacher (flownp)"


@pytest.mark.parametrize("model, sampler, offered", [("v0001", "lfm", "ode"), ("v0002", "ode", "lfm"),
                                                     ("v0002", "distilled", "lfm"),
                                                     ("v0003", "ode", "distilled, lfm")])
def test_a_sampler_the_model_does_not_offer_is_a_422_naming_what_it_offers(client, model, sampler, offered):
    r = post(client, model, sampler=sampler)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "sampler_not_offered" and f"offers sampler(s) {offered}" in err["message"]
    assert model in err["message"]


def test_an_unknown_sampler_name_is_a_validation_error(client):
    r = post(client, sampler="euler")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_choice"


def test_solver_or_steps_for_distilled_maps_are_refused(client):
    for extra in ({"steps": 4}, {"solver": "rk4", "steps": None}):
        r = post(client, "v0003", **extra)  # the default sampler of v0003 is distilled
        assert r.status_code == 422 and r.json()["error"]["code"] == "not_applicable", r.text
    assert post(client, "v0003", sampler="lfm", steps=4).status_code == 200  # the teacher's sampler takes them


def test_the_netcdf_answer_names_the_sampler_and_the_density(client):
    r = post(client, "v0003", steps=None, format="netcdf")
    assert r.status_code == 200
    ds = xr.open_dataset(io.BytesIO(r.content), engine="scipy")
    assert ds.attrs["sampler_name"] == "distilled" and ds.attrs["sampler"] == "distilled: 2 one-step maps"
    ll = ds["log_likelihood"].attrs
    assert ll["exact_density"] == 0 and ll["scored_by"] == "teacher (lfm)"


# ---- scoring -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, scored_by, exact, blocks", [("v0001", "model", True, 1),
                                                             ("v0002", "model", True, BLOCKS),
                                                             ("v0003", "teacher (lfm)", False, BLOCKS),
                                                             ("v0004", "teacher (flownp)", False, 1)])
def test_scoring_says_who_scored(client, model, scored_by, exact, blocks):
    r = client.post("/v1/log-likelihood", json={**small_ll_request(), "model": model})
    assert r.status_code == 200, r.text
    j = r.json()
    assert (j["scored_by"], j["exact_density"], j["blocks"]) == (scored_by, exact, blocks)
    assert j["nfe"] == blocks * 2 * 2  # midpoint 2 per block


def test_a_distilled_model_scores_as_its_teacher_does(client):
    """v0003's scores are its teacher's (the LFM v0002 has other weights, so compare through the API: the
    distilled model's score equals the teacher module's own, run through the same inference)."""
    from flownp.inference import log_likelihood as ll_of
    from tests.test_sampler_stop import _task

    lm = loaded("distilled", "lfm")
    t = _task(lm, with_values=True)
    from flownp.core.solvers import SolverConfig

    a = ll_of(lm, t, solver=SolverConfig("midpoint", 2), estimator="auto")
    lm.model = lm.model.teacher
    b = ll_of(lm, t, solver=SolverConfig("midpoint", 2), estimator="auto")
    assert a["joint"] == pytest.approx(b["joint"], rel=1e-6) and a["scored_by"] != b["scored_by"]


# ---- deadlines ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, extra", [("v0002", {"steps": 64, "include": ["mean"]}),
                                          ("v0003", {"steps": None, "log_likelihood": {"steps": 64}})])
def test_the_deadline_stops_lfm_and_distilled_solves_inside_a_block(registry, monkeypatch, model, extra):
    """Each evaluation sleeps 20 ms: unchecked, these requests run 2.6 s (2 blocks x 64 Euler steps) and
    5 s (2 maps, then the teacher's likelihood, 2 blocks x 64 midpoint steps); the 0.4 s deadline stops them
    at the next evaluation (a few more after the 504, never the rest)."""
    calls = []
    real = FlowNP.velocity

    def slow(self, *a, **kw):
        calls.append(time.monotonic())
        time.sleep(0.02)
        return real(self, *a, **kw)

    with running(Settings(registry=registry, registry_all=True, request_timeout_s=0.4, warmup=False)) as c:
        monkeypatch.setattr(FlowNP, "velocity", slow)
        t0 = time.monotonic()
        r = post(c, model, **extra)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        jobs = lambda: [ln for ln in c.get("/metrics").text.splitlines()  # noqa: E731
                        if ln.startswith("flownp_engine_jobs ")]
        assert wait_for(lambda: jobs() == ["flownp_engine_jobs 0.0"], timeout=5)
        n = len(calls)
        time.sleep(0.1)
        assert len(calls) == n  # nothing runs on
        assert all(t - t0 < 1.2 for t in calls) and n < 60, n


# ---- cost --------------------------------------------------------------------------------------------
BASE = dict(n_ctx=1000, n_tgt=245, num_samples=8)


def test_cost_is_monotone_in_each_samplers_evaluations():
    ode = [request_cost(**BASE, solver="euler", steps=k) for k in (1, 2, 4, 8)]
    lfm = [request_cost(**BASE, solver="euler", steps=2, blocks=n) for n in (1, 2, 4, 8)]
    maps = [request_cost(**BASE, solver=None, steps=0, maps=m) for m in (1, 2, 4)]
    ll = [request_cost(**BASE, solver="euler", steps=1, ll_solver="midpoint", ll_steps=2, estimator="exact-blocks",
                       ll_blocks=n) for n in (1, 2, 4)]
    for seq in (ode, lfm, maps, ll):
        assert all(a < b for a, b in zip(seq, seq[1:])), seq
    # an LFM of N blocks at k steps each costs what its N x k evaluations do; maps are one evaluation each
    assert request_cost(**BASE, solver="euler", steps=2, blocks=4) >= request_cost(**BASE, solver="euler", steps=8)
    assert request_cost(**BASE, solver=None, steps=0, maps=4) == pytest.approx(
        request_cost(**BASE, solver="euler", steps=1, blocks=4), rel=0.01)


@pytest.mark.parametrize("teacher", ["lfm", "flownp"])
def test_a_distilled_request_costs_less_than_its_teachers_ode_request(teacher):
    lm = loaded("distilled", teacher)
    cost = lambda s: s.cost(**BASE, with_ll=False, estimator="none", n_probes=1, gp_base=False)  # noqa: E731
    distilled = sampling_for(lm, "distilled", None, None, None, None, 64)
    taught = sampling_for(lm, teacher if teacher == "lfm" else "ode", None, None, None, None, 64)  # Euler 8
    assert distilled.plan.maps == 2 and cost(distilled) < cost(taught) / 3
    # scored, both integrate the teacher's flows: equal likelihood parts
    with_ll = lambda s: s.cost(**BASE, with_ll=True, estimator="exact-blocks", n_probes=1, gp_base=False)  # noqa: E731
    assert with_ll(taught) - cost(taught) == pytest.approx(with_ll(distilled) - cost(distilled), abs=2)



def test_a_request_drawn_and_scored_in_one_solve_is_charged_its_likelihood_solve_alone():
    lm = loaded("flownp")
    cost = lambda s, ll: s.cost(**BASE, with_ll=ll, estimator="exact-blocks", n_probes=1, gp_base=False)  # noqa: E731
    one = sampling_for(lm, None, "midpoint", 4, "midpoint", 4, 64)
    apart = sampling_for(lm, None, "euler", 8, "midpoint", 4, 64)  # the same 8 sampling evaluations
    assert cost(one, False) == cost(apart, False)
    assert cost(apart, True) - cost(one, True) == pytest.approx(cost(apart, False) - request_cost(
        **BASE, solver="euler", steps=0), rel=0.05)  # the sampling pass, no longer charged

# ---- the OpenAPI document tells the truth about these answers ----------------------------------------
def test_the_answers_of_every_kind_match_the_documented_schemas(client):
    """The schemathesis run (tests/test_service_openapi.py) serves the default FlowNP only: here the
    answers of the LFM and distilled models (null solver, teacher scores) are checked against the same
    document, and the document is checked to say what the fields mean."""
    import jsonschema

    spec = client.get("/openapi.json").json()
    check = lambda obj, name: jsonschema.validate(obj, {"$ref": f"#/components/schemas/{name}",  # noqa: E731
                                                        "components": spec["components"]})
    req = spec["components"]["schemas"]["ExtrapolateRequest"]["properties"]["sampler"]
    assert req["anyOf"][0]["enum"] == ["ode", "lfm", "distilled"] and "teacher" in req["description"]
    used = spec["components"]["schemas"]["SamplerUsed"]["properties"]
    assert "exact_density" in used and used["name"]["enum"] == ["ode", "lfm", "distilled"]
    check(client.get("/v1/models").json(), "Models")
    for v in VERSIONS:
        check(client.get(f"/v1/models/{v}").json(), "ModelInfo")
        name = client.get(f"/v1/models/{v}").json()["samplers"]["default"]
        j = post(client, v, **({"steps": None} if name == "distilled" else {})).json()
        check(j, "Extrapolation")
        check(client.post("/v1/log-likelihood", json={**small_ll_request(), "model": v}).json(), "Score")
    bad = post(client, "v0003", steps=None).json()
    bad["log_likelihood"]["exact_density"] = "no"
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        check(bad, "Extrapolation")
