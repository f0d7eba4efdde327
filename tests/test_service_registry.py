"""A registry-backed service: the embedded default until a version is promoted, then the promoted one (by
POST /v1/admin/reload or by the registry watch, FLOWNP_REGISTRY_POLL_S); a failed watch reload keeps the
old models; the served models and default are one immutable snapshot; per-model minimum context."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pytest

from flownp.registry import Registry
from service import default_model
from service.settings import Settings
from tests.test_service_common import running, small_request

DEFAULT_PT = default_model.default_paths()[0]


def wait_for(pred, timeout: float = 30.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_empty_registry_serves_the_embedded_default_until_a_promotion_and_reload(tmp_path):
    reg = Registry(tmp_path / "registry")  # nothing promoted: no CURRENT, not even a directory
    with running(Settings(registry=reg.root, warmup=False)) as c:
        assert c.get("/readyz").json()["default"] == "synthetic-default"
        (m,) = c.get("/v1/models").json()["models"]
        assert m["version"] == "synthetic-default" and m["synthetic"] is True and m["source"] == "embedded"
        assert c.post("/v1/extrapolate", json=small_request()).json()["model"]["synthetic"] is True
        r = c.post("/v1/admin/reload")  # nothing promoted yet: still the default, not an error
        assert r.status_code == 200 and r.json()["default"] == "synthetic-default"
        reg.add(DEFAULT_PT, metrics={"tar_ll": 0.0}, promote=True)
        r = c.post("/v1/admin/reload")
        assert r.status_code == 200, r.text
        assert r.json() == {"default": "v0001", "previous_default": "synthetic-default", "models": ["v0001"]}
        j = c.get("/v1/models").json()
        assert j["default"] == "v0001" and [m["synthetic"] for m in j["models"]] == [False]
        ans = c.post("/v1/extrapolate", json=small_request()).json()
        assert ans["model"] == {"version": "v0001", "synthetic": False}


def test_unpromoted_versions_alone_still_fall_back_to_the_default(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.add(DEFAULT_PT, metrics={})  # added, never promoted
    with running(Settings(registry=reg.root, warmup=False)) as c:
        assert c.get("/v1/models").json()["default"] == "synthetic-default"


def test_registry_watch_picks_up_promotions_and_survives_a_bad_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flownp.service")
    reg = Registry(tmp_path / "registry")
    default = lambda c: c.get("/v1/models").json()["default"]  # noqa: E731
    with running(Settings(registry=reg.root, registry_poll_s=0.05, warmup=False)) as c:
        assert default(c) == "synthetic-default"
        reg.add(DEFAULT_PT, metrics={"tar_ll": 0.0}, promote=True)
        assert wait_for(lambda: default(c) == "v0001"), "the watch did not reload after the first promotion"
        reg.add(DEFAULT_PT, metrics={"tar_ll": 1.0}, promote=True)
        (reg.versions_dir / "v0002" / "model.pt").write_bytes(b"tampered")  # promoted, then corrupted on disk
        assert wait_for(lambda: "registry watch: reload failed" in caplog.text), "no failed reload logged"
        assert default(c) == "v0001" and c.get("/readyz").status_code == 200  # still the old, verified model
        assert c.post("/v1/extrapolate", json=small_request()).json()["model"]["version"] == "v0001"
        reg.promote("v0001")  # roll back: the watch sees CURRENT equal to what is served, nothing to do
        time.sleep(0.3)
        assert default(c) == "v0001"


def test_without_the_setting_no_watch_runs(tmp_path):
    reg = Registry(tmp_path / "registry")
    with running(Settings(registry=reg.root, warmup=False)) as c:
        assert c.app.state.watcher is None
        reg.add(DEFAULT_PT, metrics={}, promote=True)
        time.sleep(0.3)
        assert c.get("/v1/models").json()["default"] == "synthetic-default"


def test_served_models_and_default_are_one_immutable_snapshot(tmp_path):
    from service.engine import Engine, Served
    from service.metrics import Metrics

    reg = Registry(tmp_path / "registry")
    engine = Engine(Settings(registry=reg.root, warmup=False), Metrics())
    engine.load()
    before = engine.served
    assert isinstance(before, Served) and before.default == "synthetic-default"
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.default = "v0001"  # type: ignore[misc]
    with pytest.raises(TypeError):
        before.models["x"] = before.models["synthetic-default"]  # type: ignore[index]
    reg.add(DEFAULT_PT, metrics={}, promote=True)
    assert engine.registry_changed()
    engine.reload()
    after = engine.served
    assert after is not before and (after.default, list(after.models)) == ("v0001", ["v0001"])
    assert (before.default, list(before.models)) == ("synthetic-default", ["synthetic-default"])  # untouched
    assert engine.get(None) is after.models["v0001"] and not engine.registry_changed()
    engine.shutdown()


def test_minimum_context_comes_from_the_checkpoint_unless_the_setting_is_larger():
    from service.engine import load_models

    (lm,) = load_models(Settings()).values()
    assert lm.trained_min_context == 50 == lm.info["trained_min_context"]  # the default's n_ctx 50-1000
    assert lm.min_context(Settings()) == 50 and lm.min_context(Settings(min_context=80)) == 80
    with running(Settings(min_context=80, warmup=False)) as c:
        r = c.post("/v1/extrapolate", json=small_request(n_ctx=70))
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_few"
    with running(Settings(warmup=False)) as c:
        assert c.post("/v1/extrapolate", json=small_request(n_ctx=50)).status_code == 200
        r = c.post("/v1/extrapolate", json=small_request(n_ctx=49))
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_few" and "50" in r.json()["error"]["message"]


def test_a_checkpoint_without_a_task_config_keeps_the_setting(tmp_path: Path):
    import hashlib

    from flownp.checkpoint import load_checkpoint, save_checkpoint
    from service.engine import load_models

    ck = load_checkpoint(DEFAULT_PT)
    ck.pop("task_config")
    path = tmp_path / "old.pt"
    save_checkpoint(path, {k: v for k, v in ck.items() if k not in ("format", "format_version", "versions")})
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    (lm,) = load_models(Settings(checkpoint=path, checkpoint_sha256=sha)).values()
    assert lm.trained_min_context is None and lm.min_context(Settings()) == 1
