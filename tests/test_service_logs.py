"""Logs and answers that tell the truth (issue 15 item 5, D7 and D8): a failed reload is logged at ERROR, a
permanent load failure is reported as such on every route, and flownp-serve's log configuration keeps
the service's own INFO lines (as text or JSON lines)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from flownp import default_model
from service.settings import Settings
from tests.test_service_common import running, small_request
from tests.test_service_process import _copy_default


def _client(settings: Settings) -> Any:
    from fastapi.testclient import TestClient

    from service.app import create_app

    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.mark.filterwarnings("ignore")
def test_a_failed_reload_is_logged_at_error(tmp_path, caplog):
    path = _copy_default(tmp_path)
    digest = default_model.read_manifest()["sha256"]
    with running(Settings(checkpoint=path, checkpoint_sha256=digest, warmup=False)) as c:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with caplog.at_level(logging.INFO, logger="flownp"):
            r = c.post("/v1/admin/reload")
        assert r.status_code == 409 and "still serving model" in r.json()["error"]["message"]
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR and rec.name.startswith("flownp")]
    assert errors and "reload" in errors[0].getMessage() and "sha256 mismatch" in errors[0].getMessage()


@pytest.mark.filterwarnings("ignore")
def test_a_permanent_load_failure_is_reported_as_such_on_every_route(tmp_path):
    path = _copy_default(tmp_path)
    with _client(Settings(checkpoint=path, checkpoint_sha256="0" * 64)) as c:
        for _ in range(600):
            if c.get("/readyz").json()["error"]["code"] == "load_failed":
                break
            time.sleep(0.05)
        for r in (c.get("/v1/models"), c.post("/v1/extrapolate", json=small_request())):
            err = r.json()["error"]
            assert r.status_code == 503 and err["code"] == "load_failed", r.text
            assert "failed to load" in err["message"] and "retry shortly" not in err["message"]
            assert str(tmp_path) not in r.text and r.headers["retry-after"] == "30"
        r = c.post("/v1/admin/reload")
        msg = r.json()["error"]["message"]
        assert r.status_code == 409 and "None" not in msg and "nothing is served" in msg


def test_the_log_config_keeps_the_service_lines_and_writes_json_lines():
    from service.logs import log_config

    cfg = log_config("info", "json")
    assert cfg["loggers"]["flownp"]["level"] == "INFO" and cfg["formatters"]["flownp"]["()"].endswith("JsonFormatter")
    text = log_config("warning", "text")
    assert text["loggers"]["flownp"]["level"] == "WARNING" and "JsonFormatter" not in json.dumps(text)
    with pytest.raises(ValueError):
        log_config("info", "yaml")
    from service.logs import JsonFormatter

    rec = logging.LogRecord("flownp.service", logging.INFO, __file__, 1, "models ready: %s", ("x",), None)
    line = json.loads(JsonFormatter().format(rec))
    assert line["message"] == "models ready: x" and line["level"] == "INFO" and line["logger"] == "flownp.service"
