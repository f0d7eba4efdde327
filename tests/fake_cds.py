"""A small fake Copernicus Climate Data Store for tests (127.0.0.1 only).

It speaks the current CDS API ("retrieve/v1", OGC-processes-like) that `cdsapi` >= 0.7.2 uses for a
personal access token without a colon (through `ecmwf.datastores.legacy_client.LegacyClient`):

- ``GET  {api}/catalogue/v1/messages``                     -> ``{"messages": []}`` (no key needed)
- ``GET  {api}/retrieve/v1/processes/{dataset}``            -> ``{"id": dataset, ...}``
- ``POST {api}/retrieve/v1/processes/{dataset}/execution``  (json ``{"inputs": request}``)
  -> 201, a job document whose links hold ``rel: monitor`` -> ``{api}/retrieve/v1/jobs/{id}``
- ``GET  {api}/retrieve/v1/jobs/{id}?log=True&request=True`` -> the job document (``status``)
- ``GET  {api}/retrieve/v1/jobs/{id}``                      -> the job document (links: ``rel: results``)
- ``GET  {api}/retrieve/v1/jobs/{id}/results``              -> ``{"asset": {"value": {href, file:size, type}}}``
- ``HEAD/GET /download/{id}/{name}``                         -> the file (``Accept-Ranges: bytes``, Range)

Every ``retrieve`` endpoint checks the ``PRIVATE-TOKEN`` header (401 with a JSON title/detail
otherwise). Errors are JSON bodies with ``title`` and ``detail`` like the real service.

The answer to a retrieval is a real small netCDF file built from the request in the current CDS
layout: dimension ``valid_time``, scalar coordinate ``number``, coordinate ``expver`` along
``valid_time``, latitude descending (north first), longitude ascending, float32 ``t2m`` [K],
``sp`` [Pa], ``u10``, ``v10`` [m s-1]; only the requested times that exist in the calendar.

Failure injection (attributes of :class:`FakeCDS`, change them at any time):
``refuse`` (a predicate on the request, answered ``refuse_status`` (400) with ``refuse_title`` and
``refuse_detail``), ``submit_errors`` (500 on the next N submissions), ``fail_transfers`` (the next N
downloads send the full Content-Length, the share ``cut_fraction`` of the bytes, then drop the
connection), ``corrupt_files`` (the next N jobs serve a truncated file whose advertised size matches
the truncated bytes, so only content verification can catch it), ``fail_jobs`` (the next N jobs end
``failed``), ``running_polls`` (status polls answered ``running`` before ``successful``; each costs
the client a 1 s sleep), ``zip_results`` (answer with a zip of two netCDF members, as the CDS does
for mixed step types).
"""

from __future__ import annotations

import calendar
import io
import json
import socket
import tempfile
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import xarray as xr

API_PREFIX = "/api"
FAKE_KEY = "00000000-1111-2222-3333-444444444444"

_LONG_NAMES = {
    "2m_temperature": ("t2m", "2 metre temperature", "K", 167),
    "surface_pressure": ("sp", "Surface pressure", "Pa", 134),
    "10m_u_component_of_wind": ("u10", "10 metre U wind component", "m s**-1", 165),
    "10m_v_component_of_wind": ("v10", "10 metre V wind component", "m s**-1", 166),
}


# ---- the data -------------------------------------------------------------------------------------
def requested_times(request: dict[str, Any]) -> pd.DatetimeIndex:
    """The valid datetimes (UTC, naive) a request asks for; invalid dates (Feb 30) are ignored."""
    out = []
    for y in sorted({int(v) for v in request["year"]}):
        for m in sorted({int(v) for v in request["month"]}):
            last = calendar.monthrange(y, m)[1]
            for d in sorted({int(v) for v in request["day"]}):
                if d > last:
                    continue
                for t in sorted({int(str(v).split(":")[0]) for v in request["time"]}):
                    out.append(datetime(y, m, d, t))
    return pd.DatetimeIndex(out)


def build_dataset(request: dict[str, Any], seed: int = 0) -> xr.Dataset:
    """The ERA5 answer to `request` in the current CDS netCDF layout (0.25-degree grid)."""
    north, west, south, east = (float(v) for v in request["area"])
    lat = np.round(np.arange(north, south - 1e-9, -0.25), 4)
    lon = np.round(np.arange(west, east + 1e-9, 0.25), 4)
    times = requested_times(request)
    rng = np.random.default_rng(seed)
    shape = (len(times), len(lat), len(lon))
    hours = np.asarray(times.hour, dtype=np.float64)[:, None, None]
    lat_g = lat[None, :, None]
    fields = {
        "t2m": 285.0 - 0.8 * (lat_g - 30.0) - 4.0 * np.cos(2 * np.pi * (hours - 15) / 24)
        + rng.normal(0.0, 1.0, shape),
        "sp": 100200.0 - 30.0 * (lon[None, None, :] + 91.0) + rng.normal(0.0, 80.0, shape),
        "u10": 2.0 + rng.normal(0.0, 3.0, shape),
        "v10": -1.0 + rng.normal(0.0, 3.0, shape),
    }
    data_vars = {}
    for cds_name in request["variable"]:
        short, long_name, units, param = _LONG_NAMES[cds_name]
        data_vars[short] = xr.Variable(
            ("valid_time", "latitude", "longitude"),
            np.broadcast_to(fields[short], shape).astype(np.float32),
            {"GRIB_paramId": param, "GRIB_shortName": short, "GRIB_units": units,
             "long_name": long_name, "units": units, "GRIB_stepType": "instant"},
        )
    coords = {
        "number": xr.Variable((), np.int64(0), {"long_name": "ensemble member numerical id"}),
        "valid_time": xr.Variable("valid_time", times.values, {"standard_name": "time", "long_name": "time"}),
        "latitude": xr.Variable("latitude", lat, {"units": "degrees_north", "standard_name": "latitude"}),
        "longitude": xr.Variable("longitude", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        "expver": xr.Variable("valid_time", np.array(["0001"] * len(times), dtype="<U4"),
                              {"long_name": "Experiment version"}),
    }
    return xr.Dataset(data_vars, coords, {
        "GRIB_centre": "ecmf", "Conventions": "CF-1.7", "institution": "European Centre for Medium-Range Weather Forecasts",
        "history": "fake CDS for tests",
    })


def netcdf_bytes(ds: xr.Dataset) -> bytes:
    """`ds` as netCDF4 bytes (valid_time as int64 seconds since 1970, like the CDS)."""
    enc: dict[str, dict[str, Any]] = {v: {"zlib": True, "complevel": 1} for v in ds.data_vars}
    enc["valid_time"] = {"units": "seconds since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int64"}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "answer.nc"
        ds.to_netcdf(path, engine="netcdf4", encoding=enc)
        return path.read_bytes()


def zip_bytes(ds: xr.Dataset) -> bytes:
    """`ds` split into two netCDF members of a zip (like a CDS answer with mixed step types)."""
    names = list(ds.data_vars)
    half = max(1, len(names) // 2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data_stream-oper_stepType-instant.nc", netcdf_bytes(ds[names[:half]]))
        zf.writestr("data_stream-oper_stepType-accum.nc", netcdf_bytes(ds[names[half:]]))
    return buf.getvalue()


# ---- the server -----------------------------------------------------------------------------------
@dataclass
class Recorded:
    """One HTTP request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any = None


@dataclass
class Job:
    """A submitted job: its request, its answer bytes (as served) and the correct netCDF bytes."""

    id: str
    dataset: str
    request: dict[str, Any]
    status: str = "accepted"
    polls_left: int = 0
    failed: bool = False
    data: bytes = b""
    good: bytes = b""
    file_name: str = "data.nc"
    content_type: str = "application/netcdf"


@dataclass
class FakeCDS:
    """The fake service; use as a context manager (`with FakeCDS() as cds: cds.url`)."""

    key: str = FAKE_KEY
    datasets: tuple[str, ...] = ("reanalysis-era5-single-levels",)
    refuse: Callable[[dict[str, Any]], bool] | None = None
    refuse_status: int = 400
    refuse_title: str = "invalid request"
    refuse_detail: str = "Request has not produced a valid combination of values, please check your selection."
    submit_errors: int = 0
    fail_transfers: int = 0
    cut_fraction: float = 1 / 3  # share of the bytes a failing transfer sends before dropping
    corrupt_files: int = 0
    fail_jobs: int = 0
    running_polls: int = 0
    zip_results: bool = False
    accept_ranges: bool = True
    received: list[Recorded] = field(default_factory=list)
    jobs: dict[str, Job] = field(default_factory=dict)
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "FakeCDS":
        fake = self

        class Handler(_Handler):
            cds = fake

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeCDS":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def root(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://{self.host}:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        """The API url to give the client (CDSAPI_URL)."""
        return self.root + API_PREFIX

    # ---- what the tests look at --------------------------------------------------------------------
    def submissions(self) -> list[Recorded]:
        """Every POST to an execution endpoint (accepted, refused or failed)."""
        with self._lock:
            return [r for r in self.received if r.method == "POST" and r.path.endswith("/execution")]

    def downloads(self) -> list[Recorded]:
        """Every GET of a result file."""
        with self._lock:
            return [r for r in self.received if r.method == "GET" and r.path.startswith("/download/")]

    def good_bytes_for(self, request: dict[str, Any]) -> bytes:
        """The correct netCDF bytes of the last successful job that answered `request`."""
        with self._lock:
            jobs = [j for j in self.jobs.values() if j.request == request and not j.failed and j.data == j.good]
        if not jobs:
            raise KeyError("no correct answer was produced for this request")
        return jobs[-1].good

    # ---- internals used by the handler -------------------------------------------------------------
    def _take(self, knob: str) -> bool:
        """Decrement a failure counter; True if a failure must be injected now."""
        with self._lock:
            n = getattr(self, knob)
            if n > 0:
                setattr(self, knob, n - 1)
                return True
            return False

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.received.append(rec)

    def _new_job(self, dataset: str, request: dict[str, Any]) -> Job:
        job = Job(id=uuid.uuid4().hex, dataset=dataset, request=request, polls_left=self.running_polls)
        job.failed = self._take("fail_jobs")
        if not job.failed:
            ds = build_dataset(request, seed=len(self.jobs))
            job.good = netcdf_bytes(ds)
            if self.zip_results:
                job.data, job.file_name, job.content_type = zip_bytes(ds), "data.zip", "application/zip"
                job.good = job.data
            else:
                job.data = job.good
            if self._take("corrupt_files"):
                job.data = job.data[: len(job.data) // 2]
        with self._lock:
            self.jobs[job.id] = job
        return job


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler (keep-alive, Content-Length on every answer)."""

    cds: FakeCDS
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr log
        pass

    # ---- helpers -----------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, title: str, detail: str) -> None:
        self._send_json(status, {"type": "about:blank", "title": title, "status": status, "detail": detail,
                                 "instance": self.path})

    def _read_body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode(errors="replace")

    def _recorded(self, body: Any = None) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        self.cds._record(Recorded(self.command, parts.path, parse_qs(parts.query),
                                  {k.lower(): v for k, v in self.headers.items()}, body))
        return parts.path, parse_qs(parts.query)

    def _authorised(self) -> bool:
        if self.headers.get("PRIVATE-TOKEN") == self.cds.key:
            return True
        self._error(401, "Authentication failed", "The provided API key is not valid or is missing.")
        return False

    def _job_doc(self, job: Job) -> dict[str, Any]:
        base = f"{self.cds.url}/retrieve/v1"
        links = [{"href": f"{base}/jobs/{job.id}", "rel": "self", "type": "application/json"}]
        if job.status in ("successful", "failed"):
            links.append({"href": f"{base}/jobs/{job.id}/results", "rel": "results"})
        return {
            "processID": job.dataset, "type": "process", "jobID": job.id, "status": job.status,
            "created": _now(), "updated": _now(), "links": links,
            "metadata": {"request": {"ids": job.request}, "log": []},
        }

    # ---- verbs -------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path, query = self._recorded()
        if path.startswith("/download/"):
            return self._serve_file(path, head=False)
        if path == f"{API_PREFIX}/catalogue/v1/messages":
            return self._send_json(200, {"messages": []})
        if not path.startswith(f"{API_PREFIX}/retrieve/v1/"):
            return self._error(404, "not found", path)
        if not self._authorised():
            return
        rest = path[len(f"{API_PREFIX}/retrieve/v1/"):].split("/")
        if rest[0] == "processes" and len(rest) == 2:
            if rest[1] not in self.cds.datasets:
                return self._error(404, "dataset not found", f"dataset {rest[1]} not found")
            return self._send_json(200, {"id": rest[1], "title": rest[1], "version": "1.0.0",
                                         "links": [], "jobControlOptions": ["async-execute"]})
        if rest[0] == "jobs" and len(rest) >= 2 and rest[1] in self.cds.jobs:
            job = self.cds.jobs[rest[1]]
            if len(rest) == 2:
                if "log" in query and job.status in ("accepted", "running"):
                    job.status = "running" if job.polls_left > 0 else ("failed" if job.failed else "successful")
                    job.polls_left -= 1
                return self._send_json(200, self._job_doc(job))
            if len(rest) == 3 and rest[2] == "results":
                return self._results(job)
        return self._error(404, "not found", path)

    def do_HEAD(self) -> None:
        path, _ = self._recorded()
        if path.startswith("/download/"):
            return self._serve_file(path, head=True)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        body = self._read_body()
        path, _ = self._recorded(body)
        prefix = f"{API_PREFIX}/retrieve/v1/processes/"
        if not (path.startswith(prefix) and path.endswith("/execution")):
            return self._error(404, "not found", path)
        if not self._authorised():
            return
        dataset = path[len(prefix):-len("/execution")]
        if dataset not in self.cds.datasets:
            return self._error(404, "dataset not found", f"dataset {dataset} not found")
        if self.cds._take("submit_errors"):
            return self._error(500, "internal server error", "the broker is temporarily unavailable")
        request = (body or {}).get("inputs") if isinstance(body, dict) else None
        if not isinstance(request, dict):
            return self._error(400, "invalid request", "missing 'inputs'")
        if self.cds.refuse is not None and self.cds.refuse(request):
            return self._error(self.cds.refuse_status, self.cds.refuse_title, self.cds.refuse_detail)
        job = self.cds._new_job(dataset, request)
        doc = self._job_doc(job)
        doc["links"].append({"href": f"{self.cds.url}/retrieve/v1/jobs/{job.id}", "rel": "monitor",
                             "type": "application/json"})
        return self._send_json(201, doc)

    # ---- results and files -------------------------------------------------------------------------
    def _results(self, job: Job) -> None:
        if job.status == "failed":
            return self._error(400, "The job has failed", "MARS returned an error (fake failure injected)")
        if job.status != "successful":
            return self._error(404, "results not ready", f"job {job.id} is {job.status}")
        href = f"{self.cds.root}/download/{job.id}/{job.file_name}"
        return self._send_json(200, {"asset": {"value": {
            "type": job.content_type, "href": href, "file:size": len(job.data),
            "file:checksum": "", "file:local_path": href,
        }}})

    def _serve_file(self, path: str, head: bool) -> None:
        parts = path.split("/")
        job = self.cds.jobs.get(parts[2]) if len(parts) == 4 else None
        if job is None or not job.data:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = job.data
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and self.cds.accept_ranges and not head:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            status = 206
        payload = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", job.content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.cds.accept_ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        if self.cds._take("fail_transfers"):
            self.wfile.write(payload[: max(1, int(len(payload) * self.cds.cut_fraction))])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(payload)
