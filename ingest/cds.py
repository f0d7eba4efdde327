"""ERA5 download from the Copernicus Climate Data Store through the real `cdsapi` client.

One request per year (or per month) of the winter months over the Memphis region. Every file is
retrieved into a temporary name beside its target, verified (it opens, holds sp, t2m, u10, v10 and
exactly the requested times that exist in the calendar on the requested 0.25-degree grid) and only
then renamed; a file that already exists and verifies is skipped, so a rerun resumes where the last
one stopped. Transient failures (connection errors, incomplete transfers, HTTP 5xx, failed jobs, a
file that fails verification) are retried with exponential backoff; a request the CDS refuses (HTTP
4xx: invalid request, licence not accepted) is not retried and raises `RequestRefused` with the
server's message. `download_manifest.json` in the output folder lists each file's sha256 and the
request it answers.

Credentials are cdsapi's own: ``~/.cdsapirc`` (or the file named by CDSAPI_RC) or the environment
variables CDSAPI_URL and CDSAPI_KEY. A personal access token without a colon uses the current CDS API
(``retrieve/v1``); an old ``UID:KEY`` key makes cdsapi use the legacy protocol, which the CDS retired in
September 2024.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar

import numpy as np
import pandas as pd
import requests
import typer
import xarray as xr
from tqdm import tqdm

from ingest.configs import DictConfig
from ingest.io import atomic_path, sha256_file, write_json_atomic
from ingest.parsing import parse_int_list, valid_times
from ingest.layout import LayoutError, canonicalize
from ingest.region import MEMPHIS
from ingest.variables import CDS_NAMES, resolve_alias

LOG = logging.getLogger(__name__)

MANIFEST_NAME = "download_manifest.json"
DEFAULT_CDS_URL = "https://cds.climate.copernicus.eu/api"
GRID_STEP = 0.25  # degrees, the ERA5 single-level grid the CDS returns by default

# HTTP status codes that mean "try again later" even though some are 4xx
_RETRIABLE_4XX = {408, 429}


# ---- errors -------------------------------------------------------------------------------------
class CDSDownloadError(RuntimeError):
    """Base class of the errors of this module (the CLI prints the message, no traceback)."""


class CredentialsError(CDSDownloadError):
    """No usable CDS API credentials (nothing configured, or the server rejected the key)."""


class RequestRefused(CDSDownloadError):
    """The CDS refused a request (HTTP 4xx); retrying the same request cannot help."""

    def __init__(self, message: str, *, status: int | None = None, server_message: str = "",
                 request: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message
        self.request = request


class RetriesExhausted(CDSDownloadError):
    """A request kept failing with transient errors after all retries."""


class VerificationError(ValueError):
    """A downloaded (or existing) file is not the complete answer to its request."""


# ---- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadConfig(DictConfig):
    """What to request and how hard to try. Times are UTC hours; backoff and sleeps in seconds."""

    STRICT_KEYS: ClassVar[bool] = True  # a download config is written by hand: a typo is an error

    dataset: str = "reanalysis-era5-single-levels"
    product_type: str = "reanalysis"
    variables: tuple[str, ...] = CDS_NAMES
    area: tuple[float, float, float, float] = tuple(MEMPHIS.cds_area)  # N, W, S, E in degrees
    years: tuple[int, ...] = tuple(range(1980, 2019))
    months: tuple[int, ...] = (1, 2, 12)
    days: tuple[int, ...] = tuple(range(1, 32))  # invalid dates (Feb 30) are ignored by the CDS
    hours: tuple[int, ...] = tuple(range(24))
    per: str = "year"  # "year" or "month": one request (and one file) per year or per month
    data_format: str = "netcdf"
    download_format: str = "unarchived"
    file_prefix: str = "era5_memphis"
    retries: int = 5  # retries after the first attempt of each request
    backoff_base_s: float = 10.0  # wait before retry k is min(base * 2**(k-1), max)
    backoff_max_s: float = 600.0
    # passed through to cdsapi.Client
    client_timeout_s: float = 60.0  # per HTTP read
    client_retry_max: int = 5  # attempts of each HTTP call inside the client (1 = no client retries)
    client_sleep_max_s: float = 60.0  # cap of the status-poll interval and the client's retry wait
    quiet: bool = False  # silence cdsapi's INFO log lines

    def __post_init__(self) -> None:
        for name in ("variables", "area", "years", "months", "days", "hours"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "area", tuple(float(a) for a in self.area))
        for name, lo, hi in (("months", 1, 12), ("days", 1, 31), ("hours", 0, 23), ("years", 1940, 2200)):
            values = getattr(self, name)
            if not values or any(not lo <= int(v) <= hi for v in values):
                raise ValueError(f"{name} must be a non-empty list of values in {lo}..{hi}, got {values}")
            object.__setattr__(self, name, tuple(sorted({int(v) for v in values})))
        if self.per not in ("year", "month"):
            raise ValueError(f"per must be 'year' or 'month', got {self.per!r}")
        if len(self.area) != 4 or not (self.area[0] > self.area[2] and self.area[3] > self.area[1]):
            raise ValueError(f"area must be [north, west, south, east] with north > south, east > west: {self.area}")
        if not self.variables:
            raise ValueError("variables must not be empty")
        if self.retries < 0 or self.client_retry_max < 1:
            raise ValueError("retries must be >= 0 and client_retry_max >= 1")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.client_sleep_max_s < 0:
            raise ValueError("backoff and sleep times must be >= 0")



@dataclass(frozen=True)
class PlannedRequest:
    """One CDS request and the file that holds its answer."""

    year: int
    month: int | None
    file_name: str
    request: dict[str, Any]


def file_name(cfg: DownloadConfig, year: int, month: int | None = None) -> str:
    """`era5_memphis_{year}.nc` or `era5_memphis_{year}-{month:02d}.nc`."""
    return f"{cfg.file_prefix}_{year}.nc" if month is None else f"{cfg.file_prefix}_{year}-{month:02d}.nc"


def build_request(cfg: DownloadConfig, year: int, month: int | None = None) -> dict[str, Any]:
    """The CDS request (current API form: lists of zero-padded strings) for one year or one month."""
    months = cfg.months if month is None else (month,)
    return {
        "product_type": [cfg.product_type],
        "variable": list(cfg.variables),
        "year": [f"{year:04d}"],
        "month": [f"{m:02d}" for m in months],
        "day": [f"{d:02d}" for d in cfg.days],
        "time": [f"{h:02d}:00" for h in cfg.hours],
        "data_format": cfg.data_format,
        "download_format": cfg.download_format,
        "area": list(cfg.area),
    }


def plan_requests(cfg: DownloadConfig) -> list[PlannedRequest]:
    """All requests of `cfg`, in time order."""
    out = []
    for year in cfg.years:
        months: tuple[int | None, ...] = (None,) if cfg.per == "year" else cfg.months
        for month in months:
            out.append(PlannedRequest(year, month, file_name(cfg, year, month), build_request(cfg, year, month)))
    return out


def requested_times(request: dict[str, Any]) -> pd.DatetimeIndex:
    """Sorted valid datetimes (UTC) of a request: every (year, month, day, hour) that exists."""
    return pd.DatetimeIndex(valid_times(request["year"], request["month"], request["day"],
                                        (int(str(t).split(":")[0]) for t in request["time"])))


def backoff_delay(cfg: DownloadConfig, retry: int) -> float:
    """Seconds to wait before retry number `retry` (1-based): min(base * 2**(retry-1), max)."""
    return float(min(cfg.backoff_base_s * 2 ** (retry - 1), cfg.backoff_max_s))


# ---- credentials --------------------------------------------------------------------------------
def _credentials_help(rc_path: str) -> str:
    return (
        "No CDS API credentials found (looked for the environment variables CDSAPI_URL and CDSAPI_KEY "
        f"and the file {rc_path}).\n"
        "To fix it:\n"
        "  1. log in at https://cds.climate.copernicus.eu and copy your personal access token from your "
        "profile page;\n"
        "  2. create ~/.cdsapirc (or the file named by CDSAPI_RC) with exactly two lines:\n"
        f"       url: {DEFAULT_CDS_URL}\n"
        "       key: <your-personal-access-token>\n"
        "     or set the environment variables instead:\n"
        f"       export CDSAPI_URL={DEFAULT_CDS_URL}\n"
        "       export CDSAPI_KEY=<your-personal-access-token>\n"
        "  3. accept the licence of the dataset once, on its page under 'Download data' (Terms of use)."
    )


def resolve_credentials() -> tuple[str, str, bool]:
    """(url, key, verify_tls) exactly as cdsapi finds them. Raises CredentialsError (never shows the key)."""
    import cdsapi.api

    rc_path = os.environ.get("CDSAPI_RC", os.path.expanduser("~/.cdsapirc"))
    try:
        url, key, verify = cdsapi.api.get_url_key_verify(None, None, None)
    except Exception as exc:  # cdsapi raises a bare Exception for a missing/incomplete configuration
        raise CredentialsError(_credentials_help(rc_path)) from exc
    if not str(url).strip() or not str(key).strip():
        raise CredentialsError(_credentials_help(rc_path))
    if ":" in key:
        LOG.warning("the CDS key has the old 'UID:KEY' form: cdsapi will use the legacy CDS API, retired "
                    "in September 2024; use the personal access token from your CDS profile instead")
    return str(url), str(key), bool(verify)


# ---- verification -------------------------------------------------------------------------------
def _expected_axis(start: float, stop: float) -> np.ndarray:
    n = int(round((stop - start) / GRID_STEP)) + 1
    return start + GRID_STEP * np.arange(n)


def _describe(times: pd.DatetimeIndex, limit: int = 3) -> str:
    shown = ", ".join(t.strftime("%Y-%m-%d %H:%M") for t in times[:limit])
    return shown + (f" ... ({len(times)} in all)" if len(times) > limit else "")


def _load_canonical(path: Path, label: str) -> xr.Dataset:
    """Open `path`, load it into memory, close it and canonicalise it (ingest.layout contract)."""
    try:
        with xr.open_dataset(path, engine="netcdf4") as raw:
            raw.load()
    except Exception as exc:  # netCDF4/HDF5 raise many types for a truncated or foreign file
        raise VerificationError(f"{label}: not a readable netCDF file ({type(exc).__name__}: {exc})") from exc
    try:
        return canonicalize(raw, source=label)
    except LayoutError as exc:
        raise VerificationError(str(exc)) from exc


def verify_file(path: str | os.PathLike, request: dict[str, Any], *, label: str | None = None) -> None:
    """Raise VerificationError unless `path` is the complete answer to `request`: it opens, holds the
    requested variables, exactly the requested valid times, the requested 0.25-degree grid and only
    finite values."""
    path = Path(path)
    label = label or path.name
    ds = _load_canonical(path, label)
    wanted = sorted({resolve_alias(v) or v for v in request["variable"]})
    missing = [v for v in wanted if v not in ds.data_vars]
    if missing:
        raise VerificationError(f"{label}: missing variable(s) {missing}")
    expected = requested_times(request)
    got = pd.DatetimeIndex(ds["time"].values)
    if got.has_duplicates:
        raise VerificationError(f"{label}: duplicated times {_describe(got[got.duplicated()])}")
    lacking, extra = expected.difference(got), got.difference(expected)
    if len(lacking) or len(extra):
        raise VerificationError(
            f"{label}: times differ from the request: {len(got)} in the file, {len(expected)} requested"
            + (f"; missing {_describe(lacking)}" if len(lacking) else "")
            + (f"; unexpected {_describe(extra)}" if len(extra) else "")
        )
    if "area" in request:
        north, west, south, east = (float(a) for a in request["area"])
        for name, want in (("latitude", _expected_axis(south, north)), ("longitude", _expected_axis(west, east))):
            have = ds[name].values.astype(np.float64)
            if have.shape != want.shape or not np.allclose(have, want, atol=1e-3):
                raise VerificationError(
                    f"{label}: {name} has {have.size} values {have.min():g}..{have.max():g}; the request asks "
                    f"for {want.size} values {want.min():g}..{want.max():g} every {GRID_STEP} degrees")
    for v in wanted:
        n_bad = int((~np.isfinite(ds[v].values)).sum())
        if n_bad:
            raise VerificationError(f"{label}: variable {v} has {n_bad} non-finite value(s)")


# ---- zip answers --------------------------------------------------------------------------------
def is_zip(path: Path) -> bool:
    """True if `path` is a zip archive (the CDS zips netCDF members of different step types)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return magic == b"PK\x03\x04" and zipfile.is_zipfile(path)


def merge_zip_to_netcdf(path: Path, *, temp_prefix: str | None = None) -> list[str]:
    """Replace the zip at `path` by one netCDF merging its netCDF members; returns the member names.
    Members are extracted into a temporary folder `{temp_prefix}*.unzip` beside `path`."""
    prefix = temp_prefix or f".{path.name}."
    with tempfile.TemporaryDirectory(prefix=prefix, suffix=".unzip", dir=path.parent) as tmp:
        members: list[str] = []
        datasets: list[xr.Dataset] = []
        with zipfile.ZipFile(path) as zf:
            for i, info in enumerate(zf.infolist()):
                if info.is_dir() or not info.filename.lower().endswith(".nc"):
                    continue
                member = Path(tmp) / f"member{i}.nc"  # never trust the paths inside an archive
                with zf.open(info) as src, open(member, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                members.append(info.filename)
                try:
                    with xr.open_dataset(member, engine="netcdf4") as ds:
                        datasets.append(ds.load())
                except Exception as exc:  # netCDF4/HDF5 raise many types for a broken member
                    raise VerificationError(f"{path.name}: zip member {info.filename} is not a readable "
                                            f"netCDF file ({type(exc).__name__}: {exc})") from exc
        if not members:
            raise VerificationError(f"{path.name}: the CDS answered with a zip holding no netCDF file")
        try:
            merged = xr.merge(datasets, compat="no_conflicts", join="exact", combine_attrs="drop_conflicts")
        except Exception as exc:  # members on different grids or times cannot make one file
            raise VerificationError(f"{path.name}: cannot merge the zip members {members}: {exc}") from exc
    merged.to_netcdf(path, engine="netcdf4")
    return members


# ---- the client ---------------------------------------------------------------------------------
ClientFactory = Callable[..., Any]


class _LazyClient:
    """Creates the cdsapi client at the first request that needs one (a rerun with every file present
    needs neither credentials nor the network)."""

    def __init__(self, cfg: DownloadConfig, factory: ClientFactory | None, progress: bool) -> None:
        self.cfg, self.factory, self.progress = cfg, factory, progress
        self._client: Any = None

    def get(self) -> Any:
        if self._client is None:
            url, key, verify = resolve_credentials()
            if self.factory is None:
                import cdsapi

                factory: ClientFactory = cdsapi.Client
            else:
                factory = self.factory
            self._client = factory(
                url=url, key=key, verify=verify, quiet=self.cfg.quiet, progress=self.progress,
                timeout=self.cfg.client_timeout_s, retry_max=self.cfg.client_retry_max,
                sleep_max=self.cfg.client_sleep_max_s,
            )
        return self._client


# ---- error classification -----------------------------------------------------------------------
def _server_message(exc: requests.HTTPError) -> str:
    """The server's JSON title/detail, or the exception text."""
    resp = exc.response
    try:
        body = resp.json() if resp is not None else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("title", "detail", "message", "reason") if body.get(k)]
        if parts:
            return ": ".join(parts)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _transient(exc: BaseException) -> bool:
    """Errors worth retrying: network trouble, incomplete transfers, 5xx, failed jobs, bad files."""
    from ecmwf.datastores import processing

    if isinstance(exc, (requests.RequestException, processing.DownloadError, processing.ProcessingFailedError,
                        processing.LinkError, VerificationError)):
        return True
    if isinstance(exc, AssertionError):  # multiurl asserts the transferred size
        return True
    return type(exc) is Exception  # cdsapi's legacy protocol raises bare Exceptions for server errors


def _raise_if_refused(exc: BaseException, item: PlannedRequest) -> None:
    """Turn an HTTP 401 or a malformed url into CredentialsError and a 4xx answer to the request itself
    (the dataset or the job submission) into RequestRefused; return for anything else."""
    bad_url = (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL)
    if isinstance(exc, bad_url):
        raise CredentialsError(
            f"The CDS url is not valid ({exc}). Set 'url: {DEFAULT_CDS_URL}' in ~/.cdsapirc or CDSAPI_URL."
        ) from exc
    if not isinstance(exc, requests.HTTPError) or exc.response is None:
        return
    status = exc.response.status_code
    if status is None or not 400 <= status < 500 or status in _RETRIABLE_4XX:
        return
    message = _server_message(exc)
    if status == 401:
        raise CredentialsError(
            f"The CDS rejected the API key (HTTP 401: {message}). Check the key in ~/.cdsapirc (or "
            "CDSAPI_KEY): it must be the personal access token shown on your CDS profile page."
        ) from exc
    if "/processes/" not in str(exc.response.url or ""):
        return  # a 4xx about a job (e.g. the results of a job that failed on the server): transient
    hint = ""
    if status == 403:
        hint = (" If the licence is not accepted, accept it on the dataset's page under 'Download data' "
                "(Terms of use) and rerun.")
    raise RequestRefused(
        f"The CDS refused the request for {item.file_name} (HTTP {status}): {message}. "
        f"It is not retried: fix the request or the account and rerun.{hint}",
        status=status, server_message=message, request=item.request,
    ) from exc


# ---- download -----------------------------------------------------------------------------------
@dataclass
class FileRecord:
    """One file of a download run."""

    name: str
    path: str
    status: str  # "downloaded" or "skipped" (already present and verified)
    sha256: str
    size_bytes: int
    request: dict[str, Any]
    attempts: int = 0
    members: list[str] = field(default_factory=list)  # zip members merged into the file, if any


@dataclass
class DownloadReport:
    """What `download_era5` did."""

    out_dir: str
    manifest: str
    files: list[FileRecord]
    elapsed_s: float

    @property
    def downloaded(self) -> list[FileRecord]:
        return [f for f in self.files if f.status == "downloaded"]

    @property
    def skipped(self) -> list[FileRecord]:
        return [f for f in self.files if f.status == "skipped"]

    def summary(self) -> str:
        size = sum(f.size_bytes for f in self.files) / 2**20
        retried = sum(max(0, f.attempts - 1) for f in self.files)
        return (f"{len(self.files)} file(s) in {self.out_dir}: {len(self.downloaded)} downloaded, "
                f"{len(self.skipped)} already present and verified, {retried} retry(ies), {size:.1f} MiB, "
                f"{self.elapsed_s:.1f} s; manifest {self.manifest}")


def _remove_stale_temps(out_dir: Path, names: list[str]) -> None:
    """Delete temporaries a killed run left beside our files (`.{name}.*.part`, `.{name}.*.unzip`)."""
    for name in names:
        for stale in out_dir.glob(f".{glob.escape(name)}.*"):
            if stale.name.endswith(".part") and stale.is_file():
                stale.unlink(missing_ok=True)
            elif stale.name.endswith(".unzip") and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def _fetch(client: _LazyClient, cfg: DownloadConfig, item: PlannedRequest, target: Path) -> list[str]:
    """One attempt: retrieve into a temporary beside `target`, unzip/merge if needed, verify, rename."""
    cds = client.get()
    with atomic_path(target) as tmp:
        cds.retrieve(cfg.dataset, item.request, str(tmp))
        members = merge_zip_to_netcdf(tmp, temp_prefix=f".{target.name}.") if is_zip(tmp) else []
        verify_file(tmp, item.request, label=item.file_name)
    return members


def _fetch_with_retries(client: _LazyClient, cfg: DownloadConfig, item: PlannedRequest, target: Path,
                        sleep: Callable[[float], None]) -> tuple[int, list[str]]:
    """Fetch `item` with up to cfg.retries retries; returns (attempts, zip members)."""
    last: BaseException | None = None
    for attempt in range(1, cfg.retries + 2):
        if attempt > 1:
            delay = backoff_delay(cfg, attempt - 1)
            LOG.warning("%s: attempt %d failed (%s); retrying in %.3g s", item.file_name, attempt - 1,
                        _short(last), delay)
            sleep(delay)
        try:
            return attempt, _fetch(client, cfg, item, target)
        except Exception as exc:
            _raise_if_refused(exc, item)
            if not _transient(exc):
                raise
            last = exc
    raise RetriesExhausted(
        f"{item.file_name}: {cfg.retries + 1} attempt(s) failed; the last error was: {_short(last)}. "
        "Nothing was left under the final name; rerun later to try again."
    ) from last


def _short(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _manifest_entries(out_dir: Path) -> dict[str, dict[str, Any]]:
    path = out_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        return {e["file"]: e for e in data.get("files", []) if isinstance(e, dict) and "file" in e}
    except (FileNotFoundError, ValueError, AttributeError, TypeError):
        return {}


def _write_manifest(out_dir: Path, cfg: DownloadConfig, entries: dict[str, dict[str, Any]]) -> Path:
    path = out_dir / MANIFEST_NAME
    write_json_atomic(path, {
        "dataset": cfg.dataset,
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": [entries[k] for k in sorted(entries)],
    })
    return path


def _ensure(client: _LazyClient, cfg: DownloadConfig, item: PlannedRequest, target: Path,
            sleep: Callable[[float], None]) -> FileRecord:
    """Skip `target` if it exists and verifies, else fetch it (with retries)."""
    status, attempts, members = "skipped", 0, []
    try:
        if not target.exists():
            raise VerificationError(f"{item.file_name}: not downloaded yet")
        verify_file(target, item.request)
    except VerificationError as exc:
        if target.exists():
            LOG.warning("%s exists but fails verification (%s); downloading it again", item.file_name, exc)
        status = "downloaded"
        attempts, members = _fetch_with_retries(client, cfg, item, target, sleep)
    return FileRecord(item.file_name, str(target), status, sha256_file(target), target.stat().st_size,
                      item.request, attempts, members)


def _manifest_entry(rec: FileRecord, cfg: DownloadConfig, previous: dict[str, Any]) -> dict[str, Any]:
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if rec.status == "skipped" and previous.get("sha256") == rec.sha256:
        when = previous.get("downloaded_at", when)
    entry = {"file": rec.name, "sha256": rec.sha256, "size_bytes": rec.size_bytes, "dataset": cfg.dataset,
             "request": rec.request, "downloaded_at": when}
    if rec.members:
        entry["zip_members"] = rec.members
    return entry


def download_era5(cfg: DownloadConfig, out_dir: str | os.PathLike, *, client_factory: ClientFactory | None = None,
                  progress: bool = True, sleep: Callable[[float], None] = time.sleep) -> DownloadReport:
    """Download every request of `cfg` into `out_dir` (skipping files that exist and verify).

    `client_factory(url=, key=, verify=, quiet=, progress=, timeout=, retry_max=, sleep_max=)` builds the
    client (default `cdsapi.Client`); it is called once, at the first file that must be fetched.
    Raises CredentialsError, RequestRefused or RetriesExhausted; files finished before stay valid.
    """
    start = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_requests(cfg)
    _remove_stale_temps(out, [item.file_name for item in plan] + [MANIFEST_NAME])
    client = _LazyClient(cfg, client_factory, progress)
    entries = _manifest_entries(out)
    records: list[FileRecord] = []
    with tqdm(total=len(plan), desc="ERA5 requests", unit="file", disable=not progress) as bar:
        for item in plan:
            bar.set_postfix_str(item.file_name)
            rec = _ensure(client, cfg, item, out / item.file_name, sleep)
            records.append(rec)
            entries[rec.name] = _manifest_entry(rec, cfg, entries.get(rec.name, {}))
            _write_manifest(out, cfg, entries)  # after every file: a crash later loses nothing
            bar.update(1)
    manifest = _write_manifest(out, cfg, entries)
    return DownloadReport(str(out), str(manifest), records, time.monotonic() - start)


# ---- command line -------------------------------------------------------------------------------
class Per(str, Enum):
    year = "year"
    month = "month"


def download_cli(
    out: Annotated[Path, typer.Option("--out", help="Folder for the netCDF files and download_manifest.json.",
                                      file_okay=False)],
    years: Annotated[str, typer.Option(help="Years, e.g. '1986-2017' or '1990,1991'.")] = "1980-2018",
    months: Annotated[str, typer.Option(help="Months, e.g. '1,2,12'.")] = "1,2,12",
    days: Annotated[str, typer.Option(help="Days of the month (invalid dates are ignored).")] = "1-31",
    hours: Annotated[str, typer.Option(help="UTC hours, e.g. '0-23' or '0,6,12,18'.")] = "0-23",
    per: Annotated[Per, typer.Option(help="One request (and one file) per year or per month.")] = Per.year,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a request after transient failures.")] = 5,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Download ERA5 winter data for the Memphis region from the Copernicus Climate Data Store."""
    try:
        cfg = DownloadConfig(
            years=parse_int_list(years, name="years"), months=parse_int_list(months, name="months"),
            days=parse_int_list(days, name="days"), hours=parse_int_list(hours, name="hours"),
            per=per.value, retries=retries,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        report = download_era5(cfg, out, progress=progress)
    except CDSDownloadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(report.summary())
