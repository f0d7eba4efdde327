"""Dependencies of the routes (as FastAPI's full-stack template declares them): the app's engine, settings
and metrics (one set per `create_app`, kept on `app.state`), API-key auth, and readiness."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response

from service.engine import Engine
from service.errors import ApiError
from service.http import ApiKeys
from service.metrics import Metrics
from service.settings import Settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def auth(request: Request) -> None:
    """401/403 unless the request carries a configured API key (no keys configured: open)."""
    keys: ApiKeys = request.app.state.keys
    keys.check(request)


#: route dependencies of everything but the probes
PROTECTED = [Depends(auth)]


def require_ready(engine: Engine) -> None:
    """503 not_ready until the models are loaded and warmed up (load_failed when that failed)."""
    if not engine.ready:
        raise engine.not_ready()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type="application/json")


def error_response(exc: ApiError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers)
