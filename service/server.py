"""The HTTP server's side of the limits: uvicorn options from the settings (`uvicorn_options`), and an h11
protocol with read deadlines (`ReadTimeoutH11`), which uvicorn lacks: a connection whose request headers
are not complete `header_timeout_s` after the connection opened (or after the previous response), or
whose body has not all arrived `body_timeout_s` after its headers, is closed. Slow or half-open clients
then hold a connection for a bounded time. `RequestLimit` bounds the requests in flight at once
(`limit_concurrency`) and answers the JSON 503 `overloaded` beyond it, except on the probes (`/livez`,
`/readyz`): uvicorn's own `limit_concurrency` counts idle connections too and would answer the liveness probe
503, so a client holding that many sockets could get a pod restarted."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings


class ReadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request's headers, then its body."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    _read_timer: asyncio.TimerHandle | None = None
    _phase: str | None = None  # "headers", "body" or None (request read, or connection closed)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def _watch(self) -> None:
        """(Re)arm the deadline when the request being read moves from headers to body to done."""
        state = self.conn.their_state
        self._arm("headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

    def _arm(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # a deadline runs from the phase's start: a trickle of bytes does not extend it
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self._phase = phase
        if phase is not None:
            timeout = self.header_timeout_s if phase == "headers" else self.body_timeout_s
            self._read_timer = self.loop.call_later(timeout, self._expired)

    def _expired(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()


PROBES = frozenset({"/livez", "/readyz"})
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class RequestLimit:
    """ASGI middleware: at most `limit` HTTP requests in flight (None: unbounded); one more gets 503
    `overloaded` (JSON error schema, Retry-After: 1) without reaching the app. The probes are never refused."""

    def __init__(self, app: ASGIApp, limit: int | None) -> None:
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.limit is None or scope.get("path") in PROBES:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            body = json.dumps({"error": {"code": "overloaded", "message": f"more than {self.limit} requests "
                                         "at once; retry shortly"}}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run`/`uvicorn.Config` that enforce the settings' connection deadlines
    (the request limit is the app's `RequestLimit`, which spares the probes)."""
    protocol = type("ReadTimeoutH11", (ReadTimeoutH11,), {"header_timeout_s": settings.header_timeout_s,
                                                           "body_timeout_s": settings.body_timeout_s})
    return {"http": protocol, "timeout_keep_alive": settings.keep_alive_s}
