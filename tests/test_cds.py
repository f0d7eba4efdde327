"""ERA5 download (ingest.cds) through the real cdsapi client against the fake CDS in tests/fake_cds.py.

The client is never mocked: every test runs cdsapi -> ecmwf.datastores -> multiurl -> HTTP on 127.0.0.1.
CDSAPI_URL/CDSAPI_KEY/CDSAPI_RC are set per test, so the real ~/.cdsapirc is never read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from ingest.cds import (
    CredentialsError,
    DownloadConfig,
    RequestRefused,
    RetriesExhausted,
    backoff_delay,
    build_request,
    download_cli,
    download_era5,
    file_name,
    parse_int_list,
    plan_requests,
    requested_times,
    verify_file,
    VerificationError,
)
from ingest.io import sha256_file
from ingest.layout import canonicalize
from ingest.region import MEMPHIS
from ingest.variables import CDS_NAMES, NAMES
from tests.fake_cds import FakeCDS

DATASET = "reanalysis-era5-single-levels"


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def cds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running fake CDS; the environment points cdsapi at it (and at no ~/.cdsapirc)."""
    with FakeCDS() as fake:
        monkeypatch.setenv("CDSAPI_URL", fake.url)
        monkeypatch.setenv("CDSAPI_KEY", fake.key)
        monkeypatch.setenv("CDSAPI_RC", str(tmp_path / "no-such-cdsapirc"))
        yield fake


def small_cfg(**overrides) -> DownloadConfig:
    """Two small requests (1990 and 1991, January 1-2, 00 and 12 UTC), tiny backoff, no client retries."""
    kw = dict(years=(1990, 1991), months=(1,), days=(1, 2), hours=(0, 12), retries=3,
              backoff_base_s=0.001, backoff_max_s=0.01, client_retry_max=1, client_sleep_max_s=0.01,
              client_timeout_s=10, quiet=True)
    kw.update(overrides)
    return DownloadConfig(**kw)


def leftovers(out: Path) -> list[str]:
    """Temporary files or folders (hidden names, .part, .unzip) left in `out`."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix in (".part", ".unzip"))


def times_of(path: Path) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(canonicalize(path)["time"].values)


# ---- requests -----------------------------------------------------------------------------------
def test_build_request_matches_the_current_api_form() -> None:
    cfg = DownloadConfig()
    req = build_request(cfg, 1990)
    assert req == {
        "product_type": ["reanalysis"],
        "variable": list(CDS_NAMES),
        "year": ["1990"],
        "month": ["01", "02", "12"],
        "day": [f"{d:02d}" for d in range(1, 32)],
        "time": [f"{h:02d}:00" for h in range(24)],
        "data_format": "netcdf",
        "download_format": "unarchived",
        "area": [40, -96, 30, -86],
    }
    assert len(req["variable"]) == 4 and req["time"][:2] == ["00:00", "01:00"]
    assert req["area"] == MEMPHIS.cds_area
    json.dumps(req)  # the client posts it as JSON
    assert build_request(cfg, 1990, 2)["month"] == ["02"]
    assert file_name(cfg, 1990) == "era5_memphis_1990.nc"
    assert file_name(cfg, 1990, 2) == "era5_memphis_1990-02.nc"


def test_plan_per_year_and_per_month() -> None:
    plan = plan_requests(DownloadConfig())
    assert len(plan) == 39 and plan[0].file_name == "era5_memphis_1980.nc"
    assert plan[-1].file_name == "era5_memphis_2018.nc"
    monthly = plan_requests(DownloadConfig(years=(1990,), per="month"))
    assert [p.file_name for p in monthly] == [f"era5_memphis_1990-{m:02d}.nc" for m in (1, 2, 12)]
    assert [p.request["month"] for p in monthly] == [["01"], ["02"], ["12"]]


def test_config_round_trip_and_validation() -> None:
    cfg = DownloadConfig(years=(1990, 1991), per="month", retries=2)
    assert DownloadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert DownloadConfig.from_dict(DownloadConfig().to_dict()) == DownloadConfig()
    with pytest.raises(ValueError):
        DownloadConfig(months=(13,))
    with pytest.raises(ValueError):
        DownloadConfig(per="decade")
    with pytest.raises(ValueError):
        DownloadConfig.from_dict({"nonsense": 1})


def test_requested_times_follow_the_calendar() -> None:
    cfg = DownloadConfig(years=(1992,), months=(2,), days=(28, 29, 30, 31), hours=(0, 12))
    assert len(requested_times(build_request(cfg, 1992))) == 4  # leap year: Feb 28 and 29
    assert len(requested_times(build_request(cfg, 1991))) == 2  # Feb 28 only
    # a default year: Jan 31 + Feb 28 + Dec 31 days x 24 hours
    assert len(requested_times(build_request(DownloadConfig(), 1990))) == 90 * 24
    assert len(requested_times(build_request(DownloadConfig(), 1992))) == 91 * 24


def test_backoff_is_exponential_with_a_cap() -> None:
    cfg = DownloadConfig(backoff_base_s=2.0, backoff_max_s=10.0)
    assert [backoff_delay(cfg, k) for k in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_parse_int_list() -> None:
    assert parse_int_list("1986-1989") == (1986, 1987, 1988, 1989)
    assert parse_int_list("1991,1990, 1990") == (1990, 1991)
    assert parse_int_list("00:00,12:00,3-4") == (0, 3, 4, 12)
    with pytest.raises(ValueError):
        parse_int_list("nineteen")


# ---- downloads through the real client ----------------------------------------------------------
def test_download_two_requests_then_rerun_downloads_nothing(cds: FakeCDS, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "era5"
    cfg = small_cfg()
    report = download_era5(cfg, out, progress=False)

    assert [f.name for f in report.downloaded] == ["era5_memphis_1990.nc", "era5_memphis_1991.nc"]
    assert len(cds.submissions()) == 2
    for rec, year in zip(report.files, (1990, 1991)):
        path = out / rec.name
        ds = canonicalize(path)
        assert sorted(ds.data_vars) == sorted(NAMES)
        assert list(ds["time"].values) == list(pd.to_datetime(
            [f"{year}-01-01 00:00", f"{year}-01-01 12:00", f"{year}-01-02 00:00", f"{year}-01-02 12:00"]).values)
        assert ds.sizes == {"time": 4, "latitude": 41, "longitude": 41}
        np.testing.assert_allclose(ds["latitude"].values, MEMPHIS.lats)
        np.testing.assert_allclose(ds["longitude"].values, MEMPHIS.lons)
        assert 250 < float(ds["t2m"].mean()) < 310 and 90000 < float(ds["sp"].mean()) < 110000
        assert path.read_bytes() == cds.good_bytes_for(rec.request)  # byte for byte what the server made
        assert rec.sha256 == sha256_file(path) and rec.attempts == 1
    # the server received the protocol's request, authenticated
    posted = [r.body["inputs"] for r in cds.submissions()]
    assert posted == [build_request(cfg, 1990), build_request(cfg, 1991)]
    assert all(r.headers["private-token"] == cds.key for r in cds.submissions())

    manifest = json.loads((out / "download_manifest.json").read_text())
    assert [(e["file"], e["sha256"]) for e in manifest["files"]] == [(f.name, f.sha256) for f in report.files]
    assert manifest["files"][0]["request"] == build_request(cfg, 1990)
    assert leftovers(out) == []

    # rerun: everything verifies, nothing is requested -- not even credentials are needed
    n_http = len(cds.received)
    monkeypatch.delenv("CDSAPI_URL")
    monkeypatch.delenv("CDSAPI_KEY")
    again = download_era5(cfg, out, progress=False)
    assert [f.status for f in again.files] == ["skipped", "skipped"]
    assert len(cds.received) == n_http and len(cds.submissions()) == 2
    assert [f.sha256 for f in again.files] == [f.sha256 for f in report.files]
    manifest2 = json.loads((out / "download_manifest.json").read_text())
    assert [e["downloaded_at"] for e in manifest2["files"]] == [e["downloaded_at"] for e in manifest["files"]]


def test_mid_transfer_failure_is_resumed_by_the_client_with_a_range_request(cds: FakeCDS, tmp_path: Path) -> None:
    # > 1 MiB answer, cut after 90 %: multiurl writes 1 MiB chunks, so the resume starts at 1 MiB
    cfg = small_cfg(years=(1990,), days=(1, 2, 3), hours=tuple(range(24)), client_retry_max=3)
    cds.fail_transfers, cds.cut_fraction = 1, 0.9
    report = download_era5(cfg, tmp_path, progress=False)

    data = cds.good_bytes_for(report.files[0].request)
    assert len(data) > 1 << 20
    assert (tmp_path / "era5_memphis_1990.nc").read_bytes() == data
    assert report.files[0].sha256 == sha256_file(tmp_path / "era5_memphis_1990.nc")
    gets = cds.downloads()
    assert len(cds.submissions()) == 1 and len(gets) == 2
    assert gets[0].headers.get("range") is None and gets[1].headers.get("range") == f"bytes={1 << 20}-"
    assert leftovers(tmp_path) == []


def test_mid_transfer_failures_are_retried_with_new_submissions(cds: FakeCDS, tmp_path: Path) -> None:
    cds.fail_transfers = 2  # the client does not retry (client_retry_max=1): our backoff loop does
    report = download_era5(small_cfg(years=(1990,)), tmp_path, progress=False)
    rec = report.files[0]
    assert rec.attempts == 3 and len(cds.submissions()) == 3
    assert (tmp_path / rec.name).read_bytes() == cds.good_bytes_for(rec.request)
    assert leftovers(tmp_path) == []


def test_corrupt_file_served_once_is_detected_and_refetched(cds: FakeCDS, tmp_path: Path) -> None:
    cds.corrupt_files = 1  # truncated file whose advertised size matches: only verification sees it
    report = download_era5(small_cfg(), tmp_path, progress=False)
    first = report.files[0]
    assert first.attempts == 2 and report.files[1].attempts == 1
    assert len(cds.submissions()) == 3
    assert (tmp_path / first.name).read_bytes() == cds.good_bytes_for(first.request)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("client_retry_max", [1, 3])
def test_server_errors_on_submission_are_retried(cds: FakeCDS, tmp_path: Path, client_retry_max: int) -> None:
    cds.submit_errors = 2  # 500 twice: retried by the client (retry_max=3) or by our loop (retry_max=1)
    report = download_era5(small_cfg(years=(1990,), client_retry_max=client_retry_max), tmp_path, progress=False)
    assert len(cds.submissions()) == 3
    assert report.files[0].attempts == (3 if client_retry_max == 1 else 1)
    verify_file(tmp_path / report.files[0].name, report.files[0].request)


def test_failed_job_is_retried_and_polling_waits(cds: FakeCDS, tmp_path: Path) -> None:
    cds.fail_jobs, cds.running_polls = 1, 1  # one 'failed' job; each job reports 'running' once (1 s sleep)
    report = download_era5(small_cfg(years=(1990,)), tmp_path, progress=False)
    assert report.files[0].attempts == 2 and len(cds.submissions()) == 2
    statuses = [r for r in cds.received if r.path.endswith(tuple(cds.jobs)) and "log" in r.query]
    assert len(statuses) == 4  # running, failed, running, successful


def test_retries_exhausted_leaves_nothing(cds: FakeCDS, tmp_path: Path) -> None:
    cds.fail_transfers = 100
    with pytest.raises(RetriesExhausted, match="era5_memphis_1990.nc: 2 attempt"):
        download_era5(small_cfg(years=(1990,), retries=1), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_refused_request_is_not_retried_and_leaves_nothing(cds: FakeCDS, tmp_path: Path) -> None:
    cds.refuse = lambda request: True
    with pytest.raises(RequestRefused) as info:
        download_era5(small_cfg(), tmp_path / "out", progress=False)
    err = info.value
    assert err.status == 400
    assert "invalid request" in str(err) and cds.refuse_detail in str(err)
    assert "era5_memphis_1990.nc" in str(err)
    assert len(cds.submissions()) == 1  # not retried, and the run stops there
    assert list((tmp_path / "out").iterdir()) == []


def test_refused_second_request_keeps_the_first_file(cds: FakeCDS, tmp_path: Path) -> None:
    cds.refuse = lambda request: request["year"] == ["1991"]
    cds.refuse_status, cds.refuse_title = 403, "required licences not accepted"
    cds.refuse_detail = "please accept the licence to proceed"
    with pytest.raises(RequestRefused, match="licence") as info:
        download_era5(small_cfg(), tmp_path, progress=False)
    assert info.value.status == 403 and "accept it on the dataset's page" in str(info.value)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["download_manifest.json", "era5_memphis_1990.nc"]


def test_unknown_dataset_is_refused(cds: FakeCDS, tmp_path: Path) -> None:
    with pytest.raises(RequestRefused, match="HTTP 404") as info:
        download_era5(small_cfg(dataset="reanalysis-era5-nowhere"), tmp_path, progress=False)
    assert "dataset not found" in info.value.server_message
    assert list(tmp_path.iterdir()) == []


def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CDS credentials anywhere: an empty ~/.cdsapirc (returned) and no CDSAPI_URL / CDSAPI_KEY."""
    rc = tmp_path / "empty-cdsapirc"
    rc.write_text("")
    monkeypatch.setenv("CDSAPI_RC", str(rc))
    monkeypatch.delenv("CDSAPI_URL", raising=False)
    monkeypatch.delenv("CDSAPI_KEY", raising=False)
    return rc


def test_missing_credentials_give_an_actionable_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rc = no_credentials(monkeypatch, tmp_path)
    with pytest.raises(CredentialsError) as info:
        download_era5(small_cfg(), tmp_path / "out", progress=False)
    msg = str(info.value)
    for needle in ("~/.cdsapirc", "url: https://cds.climate.copernicus.eu/api", "key: <your-personal-access-token>",
                   "CDSAPI_URL", "CDSAPI_KEY", str(rc)):
        assert needle in msg
    assert not any(p.suffix in (".nc", ".part") for p in (tmp_path / "out").iterdir())


def test_rejected_key_gives_a_credentials_error(cds: FakeCDS, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDSAPI_KEY", "not-the-right-token")
    with pytest.raises(CredentialsError, match="rejected the API key") as info:
        download_era5(small_cfg(), tmp_path, progress=False)
    assert "not-the-right-token" not in str(info.value)
    assert cds.submissions() == []


def test_zip_answer_is_merged_into_one_netcdf(cds: FakeCDS, tmp_path: Path) -> None:
    cds.zip_results = True
    report = download_era5(small_cfg(years=(1990,)), tmp_path, progress=False)
    rec = report.files[0]
    assert len(rec.members) == 2
    assert (tmp_path / rec.name).read_bytes()[:4] != b"PK\x03\x04"
    assert sorted(canonicalize(tmp_path / rec.name).data_vars) == sorted(NAMES)
    assert len(times_of(tmp_path / rec.name)) == 4
    manifest = json.loads((tmp_path / "download_manifest.json").read_text())
    assert manifest["files"][0]["zip_members"] == rec.members
    assert leftovers(tmp_path) == []


def test_bad_existing_file_and_stale_temporaries_are_replaced(cds: FakeCDS, tmp_path: Path) -> None:
    (tmp_path / "era5_memphis_1990.nc").write_bytes(b"not a netCDF file")
    (tmp_path / ".era5_memphis_1990.nc.abc123.part").write_bytes(b"left by a killed run")
    with pytest.raises(VerificationError):
        verify_file(tmp_path / "era5_memphis_1990.nc", build_request(small_cfg(), 1990))
    report = download_era5(small_cfg(years=(1990,)), tmp_path, progress=False)
    assert report.files[0].status == "downloaded"
    verify_file(tmp_path / "era5_memphis_1990.nc", report.files[0].request)
    assert leftovers(tmp_path) == []


def test_verify_rejects_wrong_times(cds: FakeCDS, tmp_path: Path) -> None:
    cfg = small_cfg(years=(1990,))
    download_era5(cfg, tmp_path, progress=False)
    other = build_request(small_cfg(hours=(0, 6, 12)), 1990)
    with pytest.raises(VerificationError, match="missing 1990-01-01 06:00"):
        verify_file(tmp_path / "era5_memphis_1990.nc", other)


# ---- command line -------------------------------------------------------------------------------
def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("download")(download_cli)
    app.command("noop")(lambda: None)  # two commands: `download` is addressed by name as in ingest.cli
    return app


def test_cli_downloads_and_summarises(cds: FakeCDS, tmp_path: Path) -> None:
    args = ["download", "--out", str(tmp_path), "--years", "1990-1991", "--months", "1", "--days", "1,2",
            "--hours", "0,12", "--per", "year", "--retries", "1", "--no-progress"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    assert "2 downloaded" in result.output
    assert sorted(p.name for p in tmp_path.glob("*.nc")) == ["era5_memphis_1990.nc", "era5_memphis_1991.nc"]
    again = CliRunner().invoke(_cli(), args)
    assert again.exit_code == 0 and "2 already present" in again.output


def test_cli_refused_request_exits_non_zero_without_traceback(cds: FakeCDS, tmp_path: Path) -> None:
    cds.refuse = lambda request: True
    args = ["download", "--out", str(tmp_path), "--years", "1990", "--months", "1", "--days", "1",
            "--hours", "0", "--no-progress"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 1
    assert "refused" in result.output and cds.refuse_detail in result.output
    assert "Traceback" not in result.output


def test_cli_missing_credentials_exit_non_zero(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_credentials(monkeypatch, tmp_path)
    result = CliRunner().invoke(_cli(), ["download", "--out", str(tmp_path / "o"), "--years", "1990", "--no-progress"])
    assert result.exit_code == 1
    assert "~/.cdsapirc" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(_cli(), ["download", "--out", str(tmp_path / "o"), "--years", "soon"])
    assert bad.exit_code == 2 and "cannot read years" in bad.output
