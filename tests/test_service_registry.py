"""A registry-backed service: an existing registry serves the embedded default until a version is promoted,
then the promoted one (by POST /v1/admin/reload or by the registry watch, FLOWNP_REGISTRY_POLL_S); a
missing or mistyped registry path is a load error (503), never the default; a failed watch read or reload
keeps the old models; the served models and default are one immutable snapshot; per-model minimum context
(the smallest over the model's training lineage)."""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path

import pytest

from flownp.registry import Registry
from ingest.io import atomic_path
from flownp import default_model
from service.app import create_app
from service.settings import Settings
from tests.test_service_common import running, small_request, wait_for

DEFAULT_PT = default_model.default_paths()[0]


def watching(settings: Settings, poll_s: float) -> Settings:
    """`settings` with a registry watch interval below the allowed minimum (FLOWNP_REGISTRY_POLL_S >= 1 s),
    set on the object without validation, so the watch tests take a fraction of a second."""
    return settings.model_copy(update={"registry_poll_s": poll_s})


def set_current(reg: Registry, version: str) -> None:
    """Point CURRENT at `version` as Registry._promote writes it (atomically), without its sha256 check."""
    with atomic_path(reg.root / "CURRENT") as tmp:
        tmp.write_text(version + "\n")


def wait_load_failed(c) -> dict:
    for _ in range(200):
        r = c.get("/readyz")
        if r.status_code == 503 and r.json()["error"]["code"] == "load_failed":
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"/readyz never said load_failed: {r.status_code} {r.text}")


@pytest.mark.parametrize("kind", ["missing", "file", "other directory"])
def test_a_path_that_is_not_a_registry_is_a_load_error_not_the_default(tmp_path, kind, caplog):
    caplog.set_level(logging.ERROR, logger="flownp.service")
    root = tmp_path / "registry"
    if kind == "file":
        root.write_text("v0001\n")
    elif kind == "other directory":  # e.g. FLOWNP_REGISTRY set to a run directory by mistake
        root.mkdir()
        (root / "best.pt").write_bytes(DEFAULT_PT.read_bytes())
    with warnings.catch_warnings():  # starlette's notice about httpx in its test client (as in `running`)
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(registry=root, warmup=False))) as c:  # never ready: not `running`
        wait_load_failed(c)
        assert c.get("/v1/models").status_code == 503
        r = c.post("/v1/admin/reload")  # still not a registry: refused, nothing served
        assert r.status_code == 409 and r.json()["error"]["code"] == "reload_failed"
        assert "FLOWNP_REGISTRY" in r.text and str(tmp_path) not in r.text
    want = {"missing": "does not exist", "file": "not a directory", "other directory": "not a model registry"}[kind]
    assert "model loading failed: registry (FLOWNP_REGISTRY): " in caplog.text and want in caplog.text


def test_an_existing_empty_registry_serves_the_embedded_default(tmp_path):
    root = tmp_path / "registry"
    (root / "lost+found").mkdir(parents=True)  # a fresh volume, nothing written to it yet
    (root / ".lock").write_text("")
    with running(Settings(registry=root, warmup=False)) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["default"] == "synthetic-default"


def test_empty_registry_serves_the_embedded_default_until_a_promotion_and_reload(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.root.mkdir()  # an existing registry with nothing promoted: no CURRENT, no versions yet
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
    reg.root.mkdir()
    default = lambda c: c.get("/v1/models").json()["default"]  # noqa: E731
    with running(watching(Settings(registry=reg.root, warmup=False), 0.05)) as c:
        assert default(c) == "synthetic-default"
        reg.add(DEFAULT_PT, metrics={"tar_ll": 0.0}, promote=True)
        assert wait_for(lambda: default(c) == "v0001"), "the watch did not reload after the first promotion"
        reg.add(DEFAULT_PT, metrics={"tar_ll": 1.0})  # not promoted: the watch has nothing to load yet
        (reg.versions_dir / "v0002" / "model.pt").write_bytes(b"tampered")  # corrupted on disk
        set_current(reg, "v0002")  # then made current (promote() would refuse the bad sha256)
        assert wait_for(lambda: "registry watch: reload failed" in caplog.text), "no failed reload logged"
        assert "registry read failed" not in caplog.text
        assert default(c) == "v0001" and c.get("/readyz").status_code == 200  # still the old, verified model
        assert c.post("/v1/extrapolate", json=small_request()).json()["model"]["version"] == "v0001"
        reg.promote("v0001")  # roll back: the watch sees CURRENT equal to what is served, nothing to do
        time.sleep(0.3)
        assert default(c) == "v0001"


def test_a_registry_read_error_is_logged_as_such_and_keeps_the_served_model(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flownp.service")
    reg = Registry(tmp_path / "registry")
    reg.add(DEFAULT_PT, metrics={}, promote=True)
    with running(watching(Settings(registry=reg.root, warmup=False), 0.05)) as c:
        assert c.get("/v1/models").json()["default"] == "v0001"
        set_current(reg, "v0009")  # a dangling CURRENT: reading the registry fails
        assert wait_for(lambda: "registry watch: registry read failed" in caplog.text), "no read failure logged"
        assert "reload failed" not in caplog.text
        assert c.get("/readyz").status_code == 200 and c.get("/v1/models").json()["default"] == "v0001"
        set_current(reg, "v0001")


def test_the_poll_interval_is_off_or_at_least_a_second():
    from pydantic import ValidationError

    assert Settings().registry_poll_s == 0 and Settings(registry_poll_s=1).registry_poll_s == 1.0
    assert Settings(registry_poll_s=30).registry_poll_s == 30.0
    for bad in (0.001, 0.5, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="0 .no registry watch. or at least 1 seconds"):
            Settings(registry_poll_s=bad)


def test_without_the_setting_no_watch_runs(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.root.mkdir()
    with running(Settings(registry=reg.root, warmup=False)) as c:
        assert c.app.state.watcher is None
        reg.add(DEFAULT_PT, metrics={}, promote=True)
        time.sleep(0.3)
        assert c.get("/v1/models").json()["default"] == "synthetic-default"


def test_served_models_and_default_are_one_immutable_snapshot(tmp_path):
    from service.engine import Engine, Served
    from service.metrics import Metrics

    reg = Registry(tmp_path / "registry")
    reg.root.mkdir()
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


def test_a_fine_tune_keeps_the_minimum_context_of_its_base(tmp_path: Path):
    """Fine-tuned on n_ctx 950-1000 from a base pretrained on 50-1000: the model was trained on 50 points,
    so the service accepts 50 (FineTuner.payload records trained_n_ctx_min over the lineage)."""
    import hashlib

    from flownp.checkpoint import load_checkpoint, save_checkpoint
    from service.engine import load_models

    def write(name: str, **changes) -> Path:
        ck = load_checkpoint(DEFAULT_PT)
        ck["task_config"] = {**ck["task_config"], "n_ctx_min": 950, "n_ctx_max": 1000}
        ck.update(changes)
        path = tmp_path / name
        save_checkpoint(path, {k: v for k, v in ck.items() if k not in ("format", "format_version", "versions")})
        (tmp_path / f"{name}.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
        return path

    ft = write("ft.pt", trained_n_ctx_min=50)
    (lm,) = load_models(Settings(checkpoint=ft)).values()
    assert lm.trained_min_context == 50 == lm.info["trained_min_context"] and lm.min_context(Settings()) == 50
    with running(Settings(checkpoint=ft, warmup=False)) as c:
        assert c.post("/v1/extrapolate", json=small_request(n_ctx=60)).status_code == 200
        r = c.post("/v1/extrapolate", json=small_request(n_ctx=49))
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_few"
    # without the lineage record only the last stage's task_config is known
    (lm,) = load_models(Settings(checkpoint=write("old_ft.pt"))).values()
    assert lm.trained_min_context == 950
