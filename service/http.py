"""HTTP plumbing: body reading (size, content type, strict JSON), validation into our errors, format
negotiation, API-key auth, and an ASGI middleware for metrics and last-resort 500s."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, from_validation
from service.metrics import Metrics
from service.schemas import check_sizes
from service.settings import Settings

log = logging.getLogger("flownp.service")
M = TypeVar("M", bound=BaseModel)
NETCDF = "application/x-netcdf"


def _no_constant(token: str) -> Any:
    raise ApiError(422, "non_finite", f"{token} is not allowed: every number must be finite")


def _finite(token: str) -> float:
    x = float(token)
    if x in (float("inf"), float("-inf")):
        raise ApiError(422, "non_finite", f"{token[:20]} overflows to infinity: every number must be finite")
    return x


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ApiError(422, "duplicate_key", f"key {k[:40]!r} appears twice in one JSON object")
        out[k] = v
    return out


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body: 415 unless application/json without a content coding, 413 past max_bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", f"send the request as application/json (got "
                       f"{ctype[:60] or 'no content type'!r})")
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {coding[:40]!r} is not accepted: send "
                       "the JSON body uncompressed", headers={"Accept-Encoding": "identity"})
    too_big = ApiError(413, "body_too_large", f"the request body exceeds {max_bytes} bytes; send fewer points")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object: 400 if not JSON, 422 for NaN/Infinity, duplicated keys or a non-object."""
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):  # our hooks raise ApiError, which passes through
        raise ApiError(400, "invalid_json", "the body is not valid JSON (UTF-8)") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_type", "the body must be a JSON object")
    return data


def validate(model: type[M], data: dict[str, Any], settings: Settings) -> M:
    """`model` from parsed JSON: sizes checked first (check_sizes), then pydantic; ApiError 422."""
    check_sizes(data, settings)
    try:
        return model.model_validate(data, context={"settings": settings})
    except ValidationError as exc:
        raise from_validation(exc) from None


async def read_request(model: type[M], request: Request, settings: Settings) -> M:
    """Read the body on the event loop, then parse and validate it in a worker thread, so that a large
    or hostile body never holds up other requests (/livez among them)."""
    raw = await read_body(request, settings.max_body_bytes)
    return await asyncio.to_thread(lambda: validate(model, parse_json(raw), settings))


FORMATS = {"json": "application/json", "netcdf": NETCDF}


def _media_format(media: str, offered: tuple[str, ...]) -> str | None:
    """The offered format a media range names (exact types; */* and application/* name the first
    offered; any +json type names json), else None."""
    if media in ("*/*", "application/*"):
        return offered[0]
    for fmt in offered:
        if media == FORMATS[fmt] or (fmt == "json" and media.endswith("+json")):
            return fmt
    return None


def choose_format(asked: str | None, accept: str, offered: tuple[str, ...] = ("json", "netcdf")) -> str:
    """One of `offered`: the body's `format`, else the Accept header's preferred offered type (by q, the
    first listed on ties; a malformed q counts as 1, q=0 refuses); 406 when it names none."""
    if asked:
        return asked
    if not accept.strip():
        return offered[0]
    best: tuple[float, str | None] = (0.0, None)
    for part in accept.lower().split(","):
        media, *params = [x.strip() for x in part.split(";")]
        q = 1.0
        for prm in params:
            if prm.startswith("q="):
                try:
                    q = min(max(float(prm[2:]), 0.0), 1.0)
                except ValueError:
                    q = 1.0
                if q != q:  # nan
                    q = 1.0
        fmt = _media_format(media, offered)
        if fmt and q > best[0]:
            best = (q, fmt)
    if best[1] is None:
        raise ApiError(406, "not_acceptable", f"this route answers {' or '.join(FORMATS[f] for f in offered)}")
    return best[1]


class ApiKeys:
    """Hashed API-key check: sha256 of the presented key against stored sha256 digests with
    hmac.compare_digest (constant time, every stored key compared). Empty: auth off."""

    def __init__(self, digests: list[bytes]) -> None:
        self._digests = digests

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, request: Request) -> None:
        if not self._digests:
            return
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key is None and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        if not key:
            raise ApiError(401, "unauthorized", "this server needs an API key: send 'Authorization: Bearer "
                           "KEY' or 'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(digest, d)
        if not ok:
            raise ApiError(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})


class Observe:
    """ASGI middleware: request counts and latency by route template, in-flight gauge, and a JSON 500
    (no trace, no path) for anything unhandled."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500, "started": False}

        async def send_wrapped(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"], status["started"] = msg["status"], True
            await send(msg)

        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapped)
        except Exception:
            log.exception("unhandled error")
            status["code"] = 500
            if not status["started"]:
                body = json.dumps({"error": {"code": "internal_error",
                                             "message": "the server failed on this request; it has been logged"}}).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)
