"""The served models: GET /v1/models, GET /v1/models/{version}, POST /v1/admin/reload."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import Response

from service.deps import PROTECTED, EngineDep, json_response, require_ready
from service.engine import LoadError
from service.errors import ApiError

router = APIRouter(dependencies=PROTECTED)
log = logging.getLogger("flownp.service")


@router.get("/v1/models", tags=["models"])
async def models(engine: EngineDep) -> Response:
    require_ready(engine)
    served = engine.served
    return json_response({"default": served.default, "models": [m.info for m in served.models.values()]})


@router.post("/v1/admin/reload", tags=["admin"])
async def reload(engine: EngineDep) -> Response:
    """Re-read the configured checkpoint/registry (after a retraining job promoted a version)."""
    try:
        out = await asyncio.to_thread(engine.reload)
    except LoadError as exc:
        serving = (f"still serving {engine.default}" if engine.ready else
                   "nothing is served (the configured model failed to load)")
        log.error("reload (POST /v1/admin/reload) failed, %s: %s", serving, exc)
        raise ApiError(409, "reload_failed", f"the new models could not be loaded; {serving}: {exc}") from None
    return json_response(out)


@router.get("/v1/models/{version}", tags=["models"])
async def model(version: str, engine: EngineDep) -> Response:
    require_ready(engine)
    return json_response(engine.get(version).info)
