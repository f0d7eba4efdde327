"""Probes and metrics: /livez, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import PROTECTED, EngineDep, MetricsDep, error_response, json_response
from service.errors import ApiError

router = APIRouter(tags=["ops"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(engine: EngineDep) -> Response:
    if engine.ready:
        served = engine.served  # one snapshot: models and default always from the same load
        return json_response({"status": "ready", "models": sorted(served.models), "default": served.default})
    if engine.load_error:
        return error_response(ApiError(503, "load_failed", "the configured model failed to load; see the server log",
                                       headers={"Retry-After": "30"}))
    return error_response(ApiError(503, "not_ready", "loading and warming up the model", headers={"Retry-After": "5"}))


@router.get("/metrics", dependencies=PROTECTED)
async def prometheus(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
