"""A small Python client (httpx) that speaks xarray.

    from service.client import Client
    with Client("http://127.0.0.1:8000") as c:                 # api_key="..." when the server wants one
        ctx = c.circle(index=range(0, 1245, 3))             # or any Dataset with latitude/longitude
        ...                                                     # fill ctx["sp"], ["t2m"], ["u10"], ["v10"]
        out = c.extrapolate(ctx, targets="circle", num_samples=8, seed=0)   # xarray.Dataset
        out.t2m.mean("sample")    # with "circle" targets log_likelihood only when asked: include=[..., "log_likelihood"]

Datasets have one dimension `point` with coordinates `latitude`, `longitude` (degrees) and variables
`sp` [Pa], `t2m` [K], `u10`, `v10` [m s-1]; answers put samples on a `sample` dimension.
"""

from __future__ import annotations

import io
import time
from typing import Any, Iterable

import httpx
import numpy as np
import xarray as xr

from ingest.region import MEMPHIS, Region
from ingest.variables import NAMES


class ServiceError(RuntimeError):
    """An error answer: HTTP status, the stable code and the server's message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _points(ds: xr.Dataset) -> dict[str, list[float]]:
    return {"latitude": np.asarray(ds["latitude"], float).tolist(),
            "longitude": np.asarray(ds["longitude"], float).tolist()}


def observations(ds: xr.Dataset) -> dict[str, Any]:
    """A Dataset (point) with latitude, longitude and the four variables -> the API's JSON object."""
    return {**_points(ds), "values": {n: np.asarray(ds[n], float).tolist() for n in NAMES}}


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 120.0, transport: httpx.BaseTransport | None = None, retries: int = 3) -> None:
        """`retries`: how often a request refused with 503 (overloaded, or still loading) is sent again after
        the server's Retry-After, with its X-Retry-Ticket so that it keeps its place in line."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)
        self.retries = retries

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST with retries of 503 answers (Retry-After, capped at 30 s; the retry ticket sent back)."""
        headers: dict[str, str] = {}
        for attempt in range(self.retries + 1):
            r = self._http.post(path, json=body, headers=headers)
            if r.status_code != 503 or attempt == self.retries:
                return r
            if "x-retry-ticket" in r.headers:
                headers = {"X-Retry-Ticket": r.headers["x-retry-ticket"]}
            time.sleep(min(float(r.headers.get("retry-after", 1)), 30.0))
        return r

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise ServiceError(r.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ServiceError(r.status_code, "http_error", r.text[:200]) from None
        return r

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def models(self) -> dict[str, Any]:
        return self._check(self._http.get("/v1/models")).json()

    @staticmethod
    def circle(index: Iterable[int] | None = None, region: Region = MEMPHIS) -> xr.Dataset:
        """The region's circle points (or a subset) as a Dataset of locations to fill or to target."""
        idx = np.arange(region.n_points) if index is None else np.asarray(list(index))
        return xr.Dataset(coords={"latitude": ("point", region.circle_lat[idx]),
                                  "longitude": ("point", region.circle_lon[idx])})

    def extrapolate(self, context: xr.Dataset, targets: xr.Dataset | str = "circle", **options: Any) -> xr.Dataset:
        """Samples at the targets as a Dataset (sample, point) in ERA5 units, with `log_likelihood`
        (sample) and summaries; options are the request's fields (num_samples, steps, seed, ...)."""
        body = {"context": observations(context), "targets": targets if isinstance(targets, str) else _points(targets),
                **options, "format": "netcdf"}
        r = self._check(self._post("/v1/extrapolate", body))
        return xr.open_dataset(io.BytesIO(r.content), engine="scipy").load()

    def extrapolate_json(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._check(self._post("/v1/extrapolate", body)).json()

    def log_likelihood(self, context: xr.Dataset, observed: xr.Dataset, **options: Any) -> dict[str, Any]:
        """Joint and per-point log-likelihood (nats) of the observed values given the context."""
        body = {"context": observations(context), "targets": observations(observed), **options}
        return self._check(self._post("/v1/log-likelihood", body)).json()
