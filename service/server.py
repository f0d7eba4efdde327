"""The HTTP server's side of the limits: uvicorn options from the settings (`uvicorn_options`), and an h11
protocol with read deadlines (`ReadTimeoutH11`), which uvicorn lacks: a connection whose request headers
are not complete `header_timeout_s` after the connection opened (or after the previous response), or
whose body has not all arrived `body_timeout_s` after its headers, is closed. Slow or half-open clients
then hold a connection for a bounded time, and `limit_concurrency` bounds how many they can hold."""

from __future__ import annotations

import asyncio
from typing import Any

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


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run`/`uvicorn.Config` that enforce the settings' connection limits."""
    protocol = type("ReadTimeoutH11", (ReadTimeoutH11,), {"header_timeout_s": settings.header_timeout_s,
                                                           "body_timeout_s": settings.body_timeout_s})
    return {"http": protocol, "limit_concurrency": settings.limit_concurrency,
            "timeout_keep_alive": settings.keep_alive_s}
