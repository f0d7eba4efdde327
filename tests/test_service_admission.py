"""Admission and cancellation (issue 15 items 1, 2, 5): a burst never locks out an idle engine, ticket
holders keep their order, tickets lapse soon after Retry-After, limits by cost, cheap defaults, and jobs
stopped at their deadline or when the client disconnects; disconnects and late failures logged truthfully."""

from __future__ import annotations

import gc
import json
import socket
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import pytest

from service.admission import Admission, Overloaded, request_cost
from service.settings import Settings
from tests.test_service_common import running, small_request, wait_for, wait_ready

QUIET = {"warmup": False}


# ---- the admission rules (a fake clock) ---------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def refused(adm: Admission, ticket: str | None = None, cost: int = 1) -> str | None:
    with pytest.raises(Overloaded) as e:
        adm.admit(ticket, cost)
    return e.value.ticket


def test_a_burst_gives_at_most_max_queue_tickets_and_an_idle_engine_takes_anyone():
    adm = Admission(workers=1, max_queue=2, max_queued_cost=10**9, ticket_ttl_s=3.0, clock=Clock())
    for _ in range(3):
        adm.admit(None, 1)  # one running, two queued
    tickets = [refused(adm) for _ in range(20)]
    assert len({t for t in tickets if t}) == 2 and tickets[2:] == [None] * 18  # no more tickets than places
    for _ in range(3):
        adm.release(1)
    adm.admit(None, 1)  # idle engine: admitted although both tickets are still outstanding
    assert adm.tickets == 2
    adm.admit(tickets[0], 1)
    adm.admit(tickets[1], 1)  # the ticket holders still find their places
    assert adm.tickets == 0 and adm.jobs == 3


def test_ticket_holders_keep_their_order_and_newcomers_wait_behind_them():
    adm = Admission(workers=1, max_queue=2, max_queued_cost=10**9, ticket_ttl_s=3.0, clock=Clock())
    for _ in range(3):
        adm.admit(None, 1)
    ta, tb = refused(adm), refused(adm)
    adm.release(1)  # one place frees up: it is ta's
    assert refused(adm) is None  # a newcomer waits (both places are held), and gets no ticket: the line is full
    assert refused(adm, tb) == tb  # the younger ticket waits and keeps its place
    adm.admit(ta, 1)
    tc = refused(adm)  # a place in line is free again: the newcomer gets a ticket, behind tb
    assert tc not in (None, tb)
    adm.release(1)
    assert refused(adm, tc) == tc
    adm.admit(tb, 1)


def test_tickets_lapse_soon_after_retry_after_and_a_refused_holder_keeps_its_place():
    clock = Clock()
    adm = Admission(workers=1, max_queue=1, max_queued_cost=10**9, ticket_ttl_s=3.0, clock=clock)
    adm.admit(None, 1)
    adm.admit(None, 1)
    t = refused(adm)
    clock.t = 2.5
    assert refused(adm, t) == t  # came back in time, still busy: the place is renewed
    clock.t = 5.0
    adm.release(1)
    assert refused(adm) is None  # the renewed ticket still holds the one place
    clock.t = 5.6  # its holder did not come back within Retry-After + grace: the place is free again
    adm.admit(None, 1)
    assert adm.tickets == 0


def test_admission_by_cost_but_a_free_worker_takes_any_admissible_request():
    adm = Admission(workers=1, max_queue=8, max_queued_cost=100, ticket_ttl_s=3.0, clock=Clock())
    adm.admit(None, 90)  # a free worker takes it
    adm.admit(None, 10)  # queued: 100 <= 100
    t = refused(adm, cost=50)  # the count allows it, the cost does not
    adm.release(90)
    adm.admit(t, 50)
    assert adm.cost == 60 and adm.jobs == 2


def test_request_cost_grows_with_targets_samples_steps_and_the_likelihood():
    base = dict(n_ctx=50, n_tgt=100, num_samples=8, solver="euler", steps=8)
    c0 = request_cost(**base)
    assert request_cost(**{**base, "n_tgt": 200}) > 1.9 * c0
    assert request_cost(**{**base, "num_samples": 16}) > 1.9 * c0
    assert request_cost(**{**base, "solver": "rk4"}) > 3.9 * c0
    ll = request_cost(**base, ll_solver="midpoint", ll_steps=2, estimator="hutchinson", n_probes=1)
    assert ll > 2 * c0 and request_cost(**base, ll_solver="midpoint", ll_steps=2, estimator="hutchinson",
                                        n_probes=8) > 2 * ll
    assert request_cost(**base, gp_base=True) > c0


# ---- through the API ------------------------------------------------------------------------------------
@contextmanager
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[str]]]:
    """run_extrapolate waits for the gate (then runs for real); yields (gate, the names of what stopped
    each fake job)."""
    import service.routes.inference as routes

    gate, stops = threading.Event(), []
    real = routes.run_extrapolate

    def slow(*a: Any, **kw: Any) -> Any:
        check = kw.get("check") or (lambda: None)
        try:
            while not gate.wait(0.01):
                check()
        except BaseException as exc:
            stops.append(type(exc).__name__)
            raise
        return real(*a, **kw)

    monkeypatch.setattr(routes, "run_extrapolate", slow)
    try:
        yield gate, stops
    finally:
        gate.set()


def metric(c: Any, name: str) -> float:
    """A metric's value from /metrics (0 when absent)."""
    for line in c.get("/metrics").text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_after_a_burst_an_idle_engine_serves_plain_requests_and_the_python_client(monkeypatch):
    from service.client import Client

    with running(Settings(workers=1, max_queue=2, **QUIET)) as c, gated(monkeypatch) as (gate, _):
        threads = [threading.Thread(target=c.post, args=("/v1/extrapolate",), kwargs={"json": small_request()})
                   for _ in range(3)]
        for t in threads:
            t.start()
        assert wait_for(lambda: metric(c, "flownp_engine_jobs") == 3)
        burst = [c.post("/v1/extrapolate", json=small_request()) for _ in range(10)]
        assert [r.status_code for r in burst] == [503] * 10
        assert sum("x-retry-ticket" in r.headers for r in burst) == 2  # at most max_queue places kept
        gate.set()
        for t in threads:
            t.join(60)
        assert wait_for(lambda: metric(c, "flownp_engine_jobs") == 0)
        # the engine is idle and the two tickets are still outstanding: a plain request is served ...
        assert c.post("/v1/extrapolate", json=small_request()).status_code == 200
        # ... and so is the project's client (which would retry a 503 with its ticket)
        with Client("http://testserver", transport=c._transport, retries=0) as cl:
            assert cl.extrapolate_json(small_request())["sample"] == [0, 1]


def test_a_request_over_the_cost_limit_is_refused_with_its_cost():
    with running(Settings(max_request_cost=1000, **QUIET)) as c:
        r = c.post("/v1/extrapolate", json=small_request())
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_costly"
        assert "at most 1,000" in r.json()["error"]["message"]
        r = c.post("/v1/extrapolate", json=small_request(n_tgt=1, num_samples=1, steps=1, include=["mean"]))
        assert r.status_code == 200  # a cheap one still passes
        assert metric(c, 'flownp_rejected_total{reason="too_costly"}') == 1


def test_circle_targets_leave_out_the_log_likelihood_unless_asked():
    from service.schemas import ExtrapolateRequest

    body = small_request()
    circle = ExtrapolateRequest.model_validate({**body, "targets": "circle"})
    assert "log_likelihood" not in circle.include and "samples" in circle.include
    asked = ExtrapolateRequest.model_validate({**body, "targets": "circle", "include": ["log_likelihood"]})
    assert asked.include == ["log_likelihood"]
    assert "log_likelihood" in ExtrapolateRequest.model_validate(body).include  # explicit targets: unchanged


def test_the_deadline_stops_the_worker(monkeypatch):
    """504 at the deadline, and the worker's job stops at its next check (DeadlineExceeded)."""
    with running(Settings(request_timeout_s=0.3, **QUIET)) as c, gated(monkeypatch) as (_, stops):
        r = c.post("/v1/extrapolate", json=small_request())
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert wait_for(lambda: metric(c, "flownp_engine_jobs") == 0)
        assert stops == ["DeadlineExceeded"]


def test_a_job_that_fails_after_its_504_leaves_no_unretrieved_future(monkeypatch, caplog):
    """A job that only fails after its caller got 504 (a long step between checks): its exception is
    retrieved, so asyncio logs no "Future exception was never retrieved" (D6)."""
    import service.routes.inference as routes
    from service.engine import DeadlineExceeded

    answered = threading.Event()

    def late(*a: Any, **kw: Any) -> Any:
        answered.wait(30)
        raise DeadlineExceeded

    monkeypatch.setattr(routes, "run_extrapolate", late)
    with running(Settings(request_timeout_s=0.2, **QUIET)) as c:
        r = c.post("/v1/extrapolate", json=small_request())
        answered.set()
        assert r.status_code == 504
        assert wait_for(lambda: metric(c, "flownp_engine_jobs") == 0)
        c.get("/livez")
        gc.collect()
    gc.collect()
    assert "never retrieved" not in caplog.text


# ---- a real server (uvicorn in a thread): disconnects ---------------------------------------------------
@contextmanager
def serving(settings: Settings) -> Iterator[tuple[str, int]]:
    """uvicorn on 127.0.0.1 in a thread with a fresh app; yields (url, port) once /readyz is 200."""
    import uvicorn

    from service.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert wait_for(lambda: server.started), "uvicorn did not start"
            wait_ready(c)
        yield url, port
    finally:
        server.should_exit = True
        thread.join(30)


def raw_post(port: int, body: bytes, declared: int | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/extrapolate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % (declared or len(body)) + body)
    return s


def test_a_client_that_disconnects_mid_body_is_a_499_without_a_traceback(caplog):
    with serving(Settings(**QUIET)) as (url, port), httpx.Client(base_url=url) as c:
        raw_post(port, b"{", declared=1000).close()
        assert wait_for(lambda: metric(c, 'flownp_requests_total{method="POST",route="/v1/extrapolate",'
                                          'status="499"}') == 1)
        assert 'status="500"' not in c.get("/metrics").text
    assert "unhandled error" not in caplog.text and "Traceback" not in caplog.text


def test_the_job_of_a_client_that_disconnects_is_cancelled(monkeypatch):
    with serving(Settings(**QUIET)) as (url, port), httpx.Client(base_url=url) as c, \
            gated(monkeypatch) as (gate, stops):
        s = raw_post(port, json.dumps(small_request()).encode())
        assert wait_for(lambda: metric(c, "flownp_engine_jobs") == 1)
        s.close()
        assert wait_for(lambda: metric(c, "flownp_engine_jobs") == 0, timeout=30), "the job went on"
        assert stops == ["Cancelled"] and not gate.is_set()
        assert metric(c, 'flownp_rejected_total{reason="client_disconnected"}') == 1
        assert metric(c, 'flownp_requests_total{method="POST",route="/v1/extrapolate",status="499"}') == 1
