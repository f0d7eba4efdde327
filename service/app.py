"""The FastAPI app: `create_app(settings)`; run with `flownp-serve` (uvicorn) or
`uvicorn service.app:create_app --factory`.

Routes (one router per resource, service/routes/): POST /v1/extrapolate, POST /v1/log-likelihood
(`inference`), GET /v1/models[/{version}], POST /v1/admin/reload (`models`), /livez, /readyz, /metrics
(`ops`); their dependencies are in service/deps.py. Models load in the lifespan handler (in a thread:
/livez answers at once, /readyz says 503 until they are loaded and warmed up, and stays 503 when they fail
to load, e.g. a FLOWNP_REGISTRY that does not exist or is not a registry); with FLOWNP_REGISTRY_POLL_S set
(0: off, else >= 1 s) a background task there also watches the registry and reloads when its CURRENT
changes (service.engine.watch_registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ingest.space import DomainError
from service import __version__
from service.deps import error_response
from service.engine import Engine, watch_registry
from service.errors import ApiError, from_domain
from service.http import ApiKeys, Observe
from service.metrics import Metrics
from service.server import RequestLimit
from service.openapi import build_openapi
from service.routes import ROUTERS
from service.settings import Settings

log = logging.getLogger("flownp.service")


def _lifespan(engine: Engine, settings: Settings) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(asyncio.to_thread(engine.load))
        app.state.loader = loader
        watcher = None
        if settings.registry is not None and settings.registry_poll_s > 0:
            watcher = asyncio.create_task(watch_registry(engine, settings.registry_poll_s, after=loader))
        app.state.watcher = watcher
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            engine.shutdown()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _: ClientDisconnect) -> Response:
        """A client that went away before its body was read: 499 (nginx's "client closed request"), no
        traceback; the answer is not delivered."""
        log.info("%s %s: the client disconnected before the request was read", request.method, request.url.path)
        return error_response(ApiError(499, "client_disconnected", "the client closed the connection"))

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> Response:
        return error_response(from_domain(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        msg = {404: "no such route; see /docs", 405: "method not allowed on this route"}
        return error_response(ApiError(exc.status_code, codes.get(exc.status_code, "http_error"),
                                       msg.get(exc.status_code, str(exc.detail)[:200]),
                                       headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _request_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(ApiError(422, "invalid_value", "invalid path or query parameter"))


def _openapi(app: FastAPI, settings: Settings) -> Any:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings)
        return app.openapi_schema

    return openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app (own engine, metrics and settings); nothing is loaded until its lifespan starts."""
    settings = settings or Settings()
    metrics = Metrics()
    engine = Engine(settings, metrics)
    app = FastAPI(title="FlowNP weather extrapolation", version=__version__, lifespan=_lifespan(engine, settings),
                  redirect_slashes=False,  # a redirect would build Location from the client's Host header
                  description="Sampled weather fields with log-likelihoods from a Flow Matching Neural Process. "
                              "Values in ERA5 units (Pa, K, m s-1), coordinates in degrees.")
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.state.keys = ApiKeys(settings.key_hashes())  # KeyFileError: refuse to start (fails closed)
    if not app.state.keys.enabled:
        log.warning("authentication is OFF: no FLOWNP_API_KEYS or FLOWNP_API_KEYS_FILE is set, so every route "
                    "(admin reload included) is open")
    app.add_middleware(Observe, metrics=metrics)
    app.add_middleware(RequestLimit, limit=settings.limit_concurrency)  # outermost: refuses before any work
    _add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = _openapi(app, settings)  # type: ignore[method-assign]
    return app
