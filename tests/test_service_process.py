"""A real uvicorn process on 127.0.0.1 (flownp-serve's entry point) answering the httpx client with
xarray Datasets; verified model loading (sha256 against the manifest, configured paths only)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from flownp import default_model
from service.cli import stop
from service.client import Client, ServiceError
from service.engine import LoadError, load_models
from service.settings import Settings
from tests.test_service_common import running, values

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_LOG: list[str] = []  # the server's output lines (it logs JSON lines at INFO)


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWNP_")}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--port", str(port), "--log-format", "json"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=lambda: SERVER_LOG.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                time.sleep(0.5)
                raise RuntimeError("".join(SERVER_LOG)[-2000:])
            time.sleep(0.2)
        else:
            raise TimeoutError("server not ready in 90 s")
        yield url
    finally:
        stop(proc)


def test_client_against_a_real_uvicorn_process(server):
    with Client(server) as c:
        assert c.ready() and c.models()["models"][0]["synthetic"] is True
        ctx = c.circle(index=range(0, 1245, 20))  # 63 points: the model needs >= 50
        for n, col in values(ctx.latitude.values, ctx.longitude.values).items():
            ctx[n] = ("point", np.asarray(col))
        tg = c.circle(index=[5, 600, 1200])
        out = c.extrapolate(ctx, tg, num_samples=3, steps=2, seed=1, log_likelihood={"steps": 2})
        assert out["t2m"].dims == ("sample", "point") and out["t2m"].shape == (3, 3)
        assert out["t2m"].attrs["units"] == "K" and out["log_likelihood"].shape == (3,)
        np.testing.assert_array_equal(out["latitude"].values, tg["latitude"].values)
        assert out.attrs["model_synthetic"] == 1
        obs = tg.assign({n: ("point", np.asarray(v)) for n, v in values(tg.latitude.values, tg.longitude.values).items()})
        ll = c.log_likelihood(ctx, obs, steps=2)
        assert np.isfinite(ll["joint"]) and ll["n_targets"] == 3
        with pytest.raises(ServiceError) as e:
            c.extrapolate(ctx, tg, num_samples=10_000)
        assert e.value.status == 422 and e.value.code == "too_many"
        text = httpx.get(server + "/metrics").text
        assert 'route="/v1/extrapolate",status="200"' in text


def _copy_default(tmp_path: Path) -> Path:
    ckpt, _ = default_model.default_paths()
    dst = tmp_path / "model.pt"
    shutil.copyfile(ckpt, dst)
    return dst


def test_flownp_serve_logs_the_service_lines_as_json(server):
    """The service's own INFO lines (models ready) reach the log, one JSON object a line (D7)."""
    def ready_lines() -> list[dict]:
        lines = [json.loads(x) for x in list(SERVER_LOG) if x.startswith("{")]
        return [x for x in lines if x["logger"].startswith("flownp") and x["message"].startswith("models ready")]

    for _ in range(100):  # /readyz turns 200 just before the line is written
        if ready_lines():
            break
        time.sleep(0.05)
    lines = [json.loads(x) for x in list(SERVER_LOG) if x.startswith("{")]
    ready = ready_lines()
    assert ready and ready[0]["level"] == "INFO", SERVER_LOG[-20:]
    assert any(x["logger"].startswith("uvicorn") for x in lines)  # uvicorn's lines are JSON too


def test_embedded_default_is_verified_against_its_manifest(tmp_path, monkeypatch):
    man = default_model.read_manifest()
    assert man["synthetic"] is True and man["sha256"] and man["bytes"] < 3_000_000
    models = load_models(Settings())
    assert list(models) == [man["version"]] and models[man["version"]].info["sha256"] == man["sha256"]
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(default_model.default_paths()[1], root / default_model.MANIFEST)
    data = bytearray(default_model.default_paths()[0].read_bytes())
    data[-100] ^= 1
    (root / default_model.CHECKPOINT).write_bytes(bytes(data))
    monkeypatch.setattr(default_model, "MODELS_DIR", root)
    with pytest.raises(LoadError, match="sha256 mismatch"):
        load_models(Settings())


def test_configured_checkpoint_needs_a_matching_sha256(tmp_path):
    path = _copy_default(tmp_path)
    with pytest.raises(LoadError, match="no recorded sha256"):
        load_models(Settings(checkpoint=path))
    with pytest.raises(LoadError, match="sha256 mismatch"):
        load_models(Settings(checkpoint=path, checkpoint_sha256="0" * 64))
    digest = default_model.read_manifest()["sha256"]
    (tmp_path / "model.pt.sha256").write_text(f"{digest}  model.pt\n")
    models = load_models(Settings(checkpoint=path, checkpoint_version="mine"))
    assert list(models) == ["mine"] and models["mine"].info["source"] == "checkpoint"
    assert models["mine"].info["synthetic"] is False


@pytest.mark.filterwarnings("ignore")
def test_failed_load_keeps_readyz_503_without_leaking_paths(tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app

    path = _copy_default(tmp_path)
    with TestClient(create_app(Settings(checkpoint=path, checkpoint_sha256="0" * 64))) as c:
        for _ in range(200):
            r = c.get("/readyz")
            if r.json()["error"]["code"] == "load_failed":
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["error"]["code"] == "load_failed" and str(tmp_path) not in r.text


def test_registry_versions_are_served_and_selectable(tmp_path):
    from flownp.registry import Registry

    reg = Registry(tmp_path / "reg")
    ckpt = _copy_default(tmp_path)
    reg.add(ckpt, metrics={"tar_ll": 1.0}, promote=True)
    reg.add(ckpt, metrics={"tar_ll": 2.0}, promote=False)
    from tests.test_service_common import small_request

    with running(Settings(registry=tmp_path / "reg", registry_all=True)) as c:
        j = c.get("/v1/models").json()
        assert j["default"] == "v0001" and {m["version"] for m in j["models"]} == {"v0001", "v0002"}
        r = c.post("/v1/extrapolate", json=small_request(model="v0002"))
        assert r.status_code == 200 and r.json()["model"]["version"] == "v0002"
        assert c.post("/v1/extrapolate", json=small_request(model="v0003")).status_code == 404


def test_readme_python_client_example_runs(server):
    """The README's Python snippet, run as written against the real server."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "from service.client import Client")
    block = []
    for ln in lines[start:]:
        if not ln.startswith("    "):
            break
        block.append(ln[4:])
    code = "\n".join(block).replace('"http://127.0.0.1:8000"', repr(server))
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    out = ns["out"]
    assert out["t2m"].dims == ("sample", "point") and out.sizes["sample"] == 8 and np.isfinite(out.log_likelihood).all()
