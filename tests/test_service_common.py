"""Shared helpers for the service tests: small valid requests and a TestClient that waits for /readyz."""

from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ingest.region import MEMPHIS as R

EXAMPLES = Path(__file__).resolve().parents[1] / "service" / "examples"


def values(lat: np.ndarray, lon: np.ndarray) -> dict[str, list[float]]:
    """Smooth plausible fields in ERA5 units (Pa, K, m s-1)."""
    lat, lon = np.asarray(lat, float), np.asarray(lon, float)
    return {"sp": (100500.0 - 120.0 * (lat - 35)).tolist(), "t2m": (276.0 - 0.9 * (lat - 35)).tolist(),
            "u10": (3.0 + 0.1 * (lat - 35)).tolist(), "v10": (-1.0 + 0.1 * (lon + 91)).tolist()}


def small_request(n_ctx: int = 60, n_tgt: int = 6, **kw: Any) -> dict[str, Any]:
    """A cheap valid /v1/extrapolate body: seeded context/targets on the circle, 2 samples, 2 steps. The
    context is at least what the models in the tests were trained on (50 for the embedded default)."""
    idx = np.random.default_rng(0).permutation(R.n_points)
    ci, ti = idx[:n_ctx], idx[n_ctx:n_ctx + n_tgt]
    lat, lon = R.circle_lat[ci], R.circle_lon[ci]
    body = {"context": {"latitude": lat.tolist(), "longitude": lon.tolist(), "values": values(lat, lon)},
            "targets": {"latitude": R.circle_lat[ti].tolist(), "longitude": R.circle_lon[ti].tolist()},
            "num_samples": 2, "steps": 2, "seed": 7, "log_likelihood": {"steps": 2}}
    body.update(kw)
    return body


def small_ll_request(**kw: Any) -> dict[str, Any]:
    ex = small_request()
    t = ex["targets"]
    body = {"context": ex["context"], "targets": {**t, "values": values(t["latitude"], t["longitude"])},
            "steps": 2, "seed": 3}
    body.update(kw)
    return body


def example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def wait_ready(client: Any, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError("service not ready")


@contextmanager
def running(settings: Any = None) -> Iterator[Any]:
    """A TestClient (in a `with` block, so the lifespan runs) on a fresh app, ready."""
    with warnings.catch_warnings():  # starlette's notice about httpx vs httpx2 in its test client
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(settings or Settings()), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def wait_for(pred: Any, timeout: float = 30.0) -> bool:
    """Whether pred() turned true within timeout seconds (polled)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.02)
    return False
