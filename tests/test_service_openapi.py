"""The OpenAPI document tells the truth (issue 15 item 8): error statuses with the error schema, the real
content types, the settings' limits; and a bounded, seeded schemathesis run (`-c all`, its coverage
phase: deterministic, about 850 cases) against a real uvicorn process on 127.0.0.1 finds no failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from service.settings import Settings
from tests.test_service_process import server  # noqa: F401  (the module-scoped uvicorn fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_the_document_lists_every_error_status_content_type_and_limit():
    from service.app import create_app

    spec = create_app(Settings(max_context=300, max_targets=40, max_samples=5)).openapi()
    paths, comps = spec["paths"], spec["components"]["schemas"]
    err = {"$ref": "#/components/schemas/Error"}
    for route in ("/v1/extrapolate", "/v1/log-likelihood"):
        responses = paths[route]["post"]["responses"]
        for status in ("400", "401", "404", "406", "413", "415", "422", "503", "504"):
            assert responses[status]["content"]["application/json"]["schema"] == err, (route, status)
    assert "application/x-netcdf" in paths["/v1/extrapolate"]["post"]["responses"]["200"]["content"]
    assert paths["/v1/models/{version}"]["get"]["responses"]["404"]["content"]["application/json"]["schema"] == err
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [CONTENT_TYPE_LATEST]  # not JSON
    assert "HTTPValidationError" not in comps
    ex = comps["ExtrapolateRequest"]["properties"]
    assert ex["context"]["properties"]["latitude"]["maxItems"] == 300
    assert ex["context"]["properties"]["values"]["required"] == ["sp", "t2m", "u10", "v10"]
    assert ex["context"]["properties"]["values"]["properties"]["t2m"]["items"]["minimum"] > 150
    assert ex["targets"]["oneOf"][1]["properties"]["longitude"]["maxItems"] == 40
    assert ex["num_samples"]["maximum"] == 5 and ex["model"]["anyOf"][0]["minLength"] == 1
    # what the admission and the request limit answer is documented too
    post = paths["/v1/extrapolate"]["post"]["responses"]
    assert "too_costly" in post["422"]["description"] and set(post["503"]["headers"]) == {"Retry-After",
                                                                                          "X-Retry-Ticket"}
    assert "503" in paths["/metrics"]["get"]["responses"] and "503" in paths["/v1/admin/reload"]["post"]["responses"]


def test_schemathesis_finds_no_contract_failure(server, tmp_path):  # noqa: F811
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
           "run", f"{server}/openapi.json", "-c", "all", "--phases", "examples,coverage", "-n", "10",
           "--seed", "1", "--generation-deterministic", "--max-time", "120", "--no-color"]
    out = subprocess.run(cmd, cwd=tmp_path,  # its cache stays out of the checkout
                          capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "Tested: 8" in out.stdout
