"""Service hardening (issue 15, items 3, 4, 6): bounded errors built off the event loop, auth that fails
closed, the smaller input defects (D9-D13), and the HTTP server's read deadlines and connection limit."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from service.errors import MAX_DETAILS
from service.settings import KeyFileError, Settings
from tests.test_service_bad_inputs import assert_clean_error, post
from tests.test_service_common import example, running, small_ll_request, small_request


@pytest.fixture(scope="module")
def client():
    with running() as c:
        yield c


def nulls_body(n: int) -> str:
    """The review's amplification body (D2): the example with n nulls before context.latitude's values."""
    raw = json.dumps(example("extrapolate"))
    return raw.replace('"latitude": [', '"latitude": [' + "null," * n, 1)


# ---- D2 / D10: bounded errors, built off the event loop ---------------------------------------------
def test_a_4mb_array_of_nulls_gets_a_small_error(client):
    body = nulls_body(835_000)
    assert len(body) > 4_000_000
    r = post(client, "/v1/extrapolate", body, {})
    assert_clean_error(r, 422, "too_many")
    assert len(r.content) < 64 * 1024 and "context.latitude" in r.json()["error"]["message"]


def test_arrays_longer_than_any_valid_request_are_refused_before_validation(client):
    big = [0.5] * 5000
    for path, body in [("quantiles", small_request(quantiles=big)), ("include", small_request(include=["mean"] * 5000)),
                       ("targets.latitude", small_request(targets={"latitude": big, "longitude": big}))]:
        r = post(client, "/v1/extrapolate", body, {})
        assert_clean_error(r, 422, "too_many")
        assert r.json()["error"]["message"].startswith(path), r.text
    keys = json.dumps(example("extrapolate"))[:-1] + "," + ",".join(f'"k{i}":0' for i in range(50_000)) + "}"
    r = post(client, "/v1/extrapolate", keys, {})
    assert_clean_error(r, 422, "too_many")
    assert len(r.content) < 1000


def test_error_details_are_capped_with_a_count(client):
    body = small_request()
    body["context"]["latitude"] = ["x"] * len(body["context"]["latitude"])
    body["context"]["longitude"] = ["y"] * len(body["context"]["longitude"])
    r = post(client, "/v1/extrapolate", body, {})
    assert_clean_error(r, 422, "invalid_type")
    err = r.json()["error"]
    assert len(err["details"]) == MAX_DETAILS and err["count"] == 2 * len(body["context"]["latitude"])


def test_echoed_client_input_is_clipped(client):
    long = "v" * 1_000_000
    r = post(client, "/v1/extrapolate", small_request(model=long), {})
    assert_clean_error(r, 422)
    assert len(r.content) < 2000
    body = small_request()
    body["context"]["values"][long] = body["context"]["values"].pop("t2m")
    r = post(client, "/v1/extrapolate", body, {})
    assert_clean_error(r, 422, "unknown_variable")
    assert len(r.content) < 2000
    r = client.get("/v1/models/" + "m" * 20_000)
    assert_clean_error(r, 404, "model_not_found")
    assert len(r.content) < 2000


def test_parsing_and_validation_run_off_the_event_loop(monkeypatch):
    import service.http as http

    seen: list[bool] = []
    real = http.check_sizes

    def spy(data: dict[str, Any], settings: Settings) -> None:
        try:
            asyncio.get_running_loop()
            seen.append(True)
        except RuntimeError:
            seen.append(False)
        real(data, settings)

    monkeypatch.setattr(http, "check_sizes", spy)
    with running() as c:
        assert c.post("/v1/extrapolate", json=small_request()).status_code == 200
        assert c.post("/v1/log-likelihood", json={"context": 1}).status_code == 422
    assert seen == [False, False]  # no running event loop in the validating thread


# ---- D4: auth fails closed --------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # another\n"])
def test_a_key_file_without_keys_refuses_to_start(tmp_path, text):
    f = tmp_path / "keys"
    f.write_text(text)
    with pytest.raises(KeyFileError, match="holds no key"):
        Settings(api_keys_file=f).key_hashes()
    from service.app import create_app

    with pytest.raises(KeyFileError):
        create_app(Settings(api_keys_file=f))


@pytest.mark.parametrize("line", ["sha256:zz", "sha256:" + "a" * 63, "sha256:" + "a" * 65, "sha256:" + "g" * 64,
                                  "sha256:"])
def test_malformed_sha256_lines_are_refused(tmp_path, line):
    f = tmp_path / "keys"
    f.write_text(f"good-key\n{line}\n")
    with pytest.raises(KeyFileError, match="line 2"):
        Settings(api_keys_file=f).key_hashes()


def test_valid_key_files_and_empty_keys(tmp_path):
    f = tmp_path / "keys"
    digest = hashlib.sha256(b"k").hexdigest()
    f.write_text(f"# keys\nsha256:{digest.upper()}\nplain\n")
    assert Settings(api_keys_file=f).key_hashes() == [bytes.fromhex(digest), hashlib.sha256(b"plain").digest()]
    with pytest.raises(KeyFileError, match="cannot be read"):
        Settings(api_keys_file=tmp_path / "missing").key_hashes()
    with pytest.raises(KeyFileError, match="empty key"):
        Settings(api_keys=[""]).key_hashes()


def test_flownp_serve_exits_with_one_line_on_an_empty_key_file(tmp_path, monkeypatch):
    import uvicorn

    from service import cli

    f = tmp_path / "keys"
    f.write_text("# nothing yet\n")
    monkeypatch.setenv("FLOWNP_API_KEYS_FILE", str(f))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("uvicorn started with auth off"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--port", "1"])
    assert "holds no key" in str(e.value.code)


def test_auth_off_is_logged_as_a_warning(caplog):
    from service.app import create_app

    with caplog.at_level(logging.WARNING, logger="flownp.service"):
        create_app(Settings())
    assert any(r.levelno == logging.WARNING and "authentication is OFF" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flownp.service"):
        create_app(Settings(api_keys=["k"]))
    assert not any("authentication is OFF" in r.getMessage() for r in caplog.records)


# ---- D9-D12: clear errors, no redirects, content negotiation, model names, content coding ---------
@pytest.mark.parametrize("targets,code,loc", [
    ({"latitude": [], "longitude": []}, "too_few", "targets.latitude"),
    ({"latitude": ["35"], "longitude": [-91.0]}, "invalid_type", "targets.latitude.0"),
    ({"latitude": [35.0], "longitude": [-91.0], "values": {}}, "unknown_field", "targets.values"),
    ({"latitude": [35.0]}, "missing_field", "targets.longitude"),
    ("grid", "invalid_choice", "targets"),
])
def test_errors_inside_targets_say_what_is_wrong(client, targets, code, loc):
    r = post(client, "/v1/extrapolate", small_request(targets=targets), {})
    assert_clean_error(r, 422, code)
    assert r.json()["error"]["details"][0]["loc"] == loc, r.text


def test_trailing_slashes_are_not_redirected(client):
    r = client.get("/v1/models/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert_clean_error(r, 404, "not_found")
    assert "location" not in r.headers
    r = client.post("/v1/extrapolate/", json=small_request(), follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


def test_accept_parsing_edge_cases():
    from service.errors import ApiError
    from service.http import choose_format

    assert choose_format(None, "*/*;q=abc") == "json"
    assert choose_format(None, "application/x-netcdf;q=abc, application/json;q=0.5") == "netcdf"
    assert choose_format(None, "application/x-netcdf;q=0, */*") == "json"
    for accept in ("application/x-netcdf-foo", "application/x-netcdf;q=0", "text/netcdf"):
        with pytest.raises(ApiError) as e:
            choose_format(None, accept)
        assert e.value.status == 406, accept
    with pytest.raises(ApiError):
        choose_format(None, "application/x-netcdf", offered=("json",))


def test_log_likelihood_honours_accept(client):
    body = small_ll_request()
    for accept in ("application/x-netcdf", "text/html"):
        assert_clean_error(post(client, "/v1/log-likelihood", body, {"accept": accept}), 406, "not_acceptable")
    assert post(client, "/v1/log-likelihood", body, {"accept": "application/json"}).status_code == 200


def test_an_empty_model_name_is_refused(client):
    r = post(client, "/v1/extrapolate", small_request(model=""), {})
    assert_clean_error(r, 422, "invalid_value")
    assert r.json()["error"]["details"][0]["loc"] == "model"
    assert post(client, "/v1/extrapolate", small_request(model=None), {}).status_code == 200


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_compressed_bodies_get_a_clear_415(client, coding):
    import gzip

    r = client.post("/v1/extrapolate", content=gzip.compress(json.dumps(small_request()).encode()),
                    headers={"content-type": "application/json", "content-encoding": coding})
    assert_clean_error(r, 415, "unsupported_media_type")
    assert "Content-Encoding" in r.json()["error"]["message"]


def test_duplicated_target_points_are_refused(client):
    body = small_ll_request()
    t = body["targets"]
    t["latitude"][1], t["longitude"][1] = t["latitude"][0], t["longitude"][0] + 1e-9  # same to 6 decimals
    r = post(client, "/v1/log-likelihood", body, {})
    assert_clean_error(r, 422, "duplicated_point")
    assert "points 0 and 1" in r.json()["error"]["message"]
    body = small_request()
    body["targets"]["latitude"][2], body["targets"]["longitude"][2] = (body["targets"]["latitude"][0],
                                                                       body["targets"]["longitude"][0])
    assert_clean_error(post(client, "/v1/extrapolate", body, {}), 422, "duplicated_point")


# ---- D13: read deadlines and a connection limit in the HTTP server -------------------------------
def test_server_options_come_from_the_settings():
    from service.server import ReadTimeoutH11, uvicorn_options

    opts = uvicorn_options(Settings(header_timeout_s=2.5, body_timeout_s=7.0, limit_concurrency=9, keep_alive_s=3))
    assert issubclass(opts["http"], ReadTimeoutH11)
    assert (opts["http"].header_timeout_s, opts["http"].body_timeout_s) == (2.5, 7.0)
    assert opts["timeout_keep_alive"] == 3
    assert "limit_concurrency" not in opts  # uvicorn's would count idle sockets and refuse the probes


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A tiny ASGI app that reads the whole body and answers its length."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        size += len(msg.get("body", b""))
        more = msg.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(size).encode()})


@pytest.fixture()
def guarded_server() -> Iterator[int]:
    """uvicorn on 127.0.0.1 in a thread, with flownp-serve's options for short deadlines and 3 connections."""
    import uvicorn

    from service.server import uvicorn_options
    from tests.test_service_process import free_port

    port = free_port()
    opts = uvicorn_options(Settings(header_timeout_s=0.5, body_timeout_s=0.5))
    server = uvicorn.Server(uvicorn.Config(_echo_app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", **opts))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    yield port
    server.should_exit = True
    th.join(10)


def _closed_by_server(s: socket.socket, wait_s: float = 15.0) -> bool:
    """True when the server closes the connection (reads EOF) within wait_s (a bound, not a measurement)."""
    s.settimeout(wait_s)
    try:
        while s.recv(4096):
            pass
        return True
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_half_sent_headers_and_slow_bodies_are_cut_off(guarded_server):
    port = guarded_server
    with socket.create_connection(("127.0.0.1", port)) as idle, \
            socket.create_connection(("127.0.0.1", port)) as half, \
            socket.create_connection(("127.0.0.1", port)) as slow:
        half.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
        slow.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        for s in (idle, half, slow):
            assert _closed_by_server(s)
    # a complete request on a fresh connection is still served
    with socket.create_connection(("127.0.0.1", port)) as ok:
        ok.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        ok.settimeout(15)
        data = b""
        while chunk := ok.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"\r\n\r\n1\r\n2\r\n" in data


def test_requests_beyond_the_limit_get_503_but_the_probes_never_do():
    """RequestLimit: with `limit` requests in flight one more gets the JSON 503 overloaded; /livez and
    /readyz still answer (a client holding many requests cannot get the pod restarted); when the held
    requests end, requests pass again. Idle or half-sent connections are not requests (the read deadlines
    above bound them)."""
    import httpx

    from service.server import RequestLimit

    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        if scope["path"] == "/hold":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario():
        app = RequestLimit(slow_app, limit=2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            held = [asyncio.create_task(c.get("/hold")) for _ in range(2)]
            while app.active < 2:
                await asyncio.sleep(0.01)
            over = await c.get("/v1/models")
            probes = [await c.get(p) for p in ("/livez", "/readyz")]
            release.set()
            done = await asyncio.gather(*held)
            after = await c.get("/v1/models")
        return over, probes, done, after

    over, probes, done, after = asyncio.run(scenario())
    assert over.status_code == 503 and over.json()["error"]["code"] == "overloaded"
    assert over.headers["retry-after"] == "1"
    assert [p.status_code for p in probes] == [200, 200]
    assert [d.status_code for d in done] == [200, 200] and after.status_code == 200
