"""The FastAPI app: `create_app(settings)`; run with `flownp-serve` (uvicorn) or
`uvicorn service.app:create_app --factory`.

Routes: POST /v1/extrapolate, POST /v1/log-likelihood, GET /v1/models[/{version}], POST /v1/admin/reload,
/livez, /readyz, /metrics. Models load in the lifespan handler (in a thread: /livez answers at once, /readyz
says 503 until they are loaded and warmed up, and stays 503 when they fail to load, e.g. a FLOWNP_REGISTRY
that does not exist or is not a registry); with FLOWNP_REGISTRY_POLL_S set (0: off, else >= 1 s) a
background task there also watches the registry and reloads when its CURRENT changes
(service.engine.watch_registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from flownp.core.solvers import SolverConfig
from service import __version__, convert
from service.engine import (Engine, LoadError, Task, check_context_size, resolve_estimator, run_extrapolate,
                            run_log_likelihood, watch_registry)
from service.errors import ApiError
from service.http import NETCDF, ApiKeys, Observe, choose_format, read_json, validate
from service.metrics import Metrics
from service.responses import LL_KIND, LL_UNITS, extrapolation_body, extrapolation_netcdf
from service.schemas import ExtrapolateRequest, LogLikelihoodRequest, Points
from service.settings import Settings

log = logging.getLogger("flownp.service")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type="application/json")


def _error(exc: ApiError) -> Response:
    return _json(exc.body(), exc.status, exc.headers)


def _body_doc(model: type) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app (own engine, metrics and settings); nothing is loaded until its lifespan starts."""
    settings = settings or Settings()
    metrics = Metrics()
    keys = ApiKeys(settings.key_hashes())
    engine = Engine(settings, metrics)

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

    app = FastAPI(title="FlowNP weather extrapolation", version=__version__, lifespan=lifespan,
                  description="Sampled weather fields with log-likelihoods from a Flow Matching Neural Process. "
                              "Values in ERA5 units (Pa, K, m s-1), coordinates in degrees.")
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.add_middleware(Observe, metrics=metrics)

    # ---- errors --------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        msg = {404: "no such route; see /docs", 405: "method not allowed on this route"}
        return _error(ApiError(exc.status_code, codes.get(exc.status_code, "http_error"),
                               msg.get(exc.status_code, str(exc.detail)[:200]), headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _request_error(_: Request, exc: RequestValidationError) -> Response:
        return _error(ApiError(422, "invalid_value", "invalid path or query parameter"))

    def auth(request: Request) -> None:
        keys.check(request)

    protected = [Depends(auth)]

    # ---- probes and metrics --------------------------------------------------------------
    @app.get("/livez", tags=["ops"])
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        if engine.ready:
            served = engine.served  # one snapshot: models and default always from the same load
            return _json({"status": "ready", "models": sorted(served.models), "default": served.default})
        if engine.load_error:
            return _error(ApiError(503, "load_failed", "the configured model failed to load; see the server log",
                                   headers={"Retry-After": "30"}))
        return _error(ApiError(503, "not_ready", "loading and warming up the model", headers={"Retry-After": "5"}))

    @app.get("/metrics", tags=["ops"], dependencies=protected)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- models --------------------------------------------------------------------------
    def _ready() -> None:
        if not engine.ready:
            raise ApiError(503, "not_ready", "the model is loading or warming up; retry shortly",
                           headers={"Retry-After": "5"})

    @app.get("/v1/models", tags=["models"], dependencies=protected)
    async def models() -> Response:
        _ready()
        served = engine.served
        return _json({"default": served.default, "models": [m.info for m in served.models.values()]})

    @app.post("/v1/admin/reload", tags=["admin"], dependencies=protected)
    async def reload() -> Response:
        """Re-read the configured checkpoint/registry (after a retraining job promoted a version)."""
        try:
            out = await asyncio.to_thread(engine.reload)
        except LoadError as exc:
            raise ApiError(409, "reload_failed", f"the new models could not be loaded; still serving "
                           f"{engine.default}: {exc}") from None
        return _json(out)

    @app.get("/v1/models/{version}", tags=["models"], dependencies=protected)
    async def model(version: str) -> Response:
        _ready()
        return _json(engine.get(version).info)

    # ---- extrapolation -------------------------------------------------------------------
    @app.post("/v1/extrapolate", tags=["inference"], dependencies=protected,
              openapi_extra=_body_doc(ExtrapolateRequest),
              responses={200: {"description": "Samples, summaries and log-likelihoods (JSON or CF netCDF).",
                               "content": {"application/json": {}, NETCDF: {}}}})
    async def extrapolate(request: Request) -> Response:
        """Sample the four variables at the targets given the context; per-sample joint log-likelihoods."""
        t0 = time.perf_counter()
        req = validate(ExtrapolateRequest, await read_json(request, settings.max_body_bytes), settings)
        fmt = choose_format(req.format, request.headers.get("accept", ""))
        _ready()
        lm = engine.get(req.model)  # one read of the served snapshot; the request keeps this model
        ctx = req.context
        check_context_size(lm, ctx.n, settings)
        convert.check_points(lm.region, ctx.latitude, ctx.longitude, "context")
        if isinstance(req.targets, Points):
            convert.check_points(lm.region, req.targets.latitude, req.targets.longitude, "targets")
            tlat, tlon = req.targets.latitude, req.targets.longitude
        else:
            la, lo = convert.circle_targets(lm.region, ctx.latitude, ctx.longitude)
            tlat, tlon = la.tolist(), lo.tolist()
            if not tlat:
                raise ApiError(422, "too_few", "the context covers the whole circle: no target is left")
            if len(tlat) > settings.max_targets:
                raise ApiError(422, "too_many", f"'circle' gives {len(tlat)} targets; at most "
                               f"{settings.max_targets} allowed: send more context or a list of targets")
        with_ll = "log_likelihood" in req.include
        opts = req.log_likelihood
        estimator = resolve_estimator(lm, opts.estimator, len(tlat), settings) if with_ll else "none"
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        task = Task(torch.from_numpy(convert.xy(lm.region, ctx.latitude, ctx.longitude))[None],
                    torch.from_numpy(convert.era5_to_normalised(ctx.array(), lm.normalizer))[None],
                    torch.from_numpy(convert.xy(lm.region, tlat, tlon))[None])
        solver, ll_solver = SolverConfig(req.solver, req.steps), SolverConfig(opts.solver, opts.steps)
        out, timing = await engine.submit("extrapolate", lambda deadline: run_extrapolate(
            lm, task, num_samples=req.num_samples, solver=solver, seed=seed, with_ll=with_ll, ll_solver=ll_solver,
            estimator=estimator, n_probes=opts.n_probes, deadline=deadline), req.timeout_s,
            request.headers.get("x-retry-ticket"))
        metrics.nfe.labels(lm.version, "sample").inc(out["nfe"])
        if "ll" in out:
            metrics.nfe.labels(lm.version, "log_likelihood").inc(out["ll"]["nfe"])
        metrics.points.labels(lm.version, "extrapolate").inc(len(tlat) * req.num_samples)
        metrics.samples.labels(lm.version).inc(req.num_samples)
        meta = {
            "model": {"version": lm.version, "synthetic": lm.info["synthetic"]},
            "context": {"n": ctx.n, "time": ctx.time.isoformat() if ctx.time else None},
            "sampler": {"solver": req.solver, "steps": req.steps, "seed": seed, "nfe": out["nfe"]},
            "log_likelihood": {"solver": opts.solver, "steps": opts.steps},
            "timing": {"queue_ms": 1e3 * timing["queue_s"], "engine_ms": 1e3 * timing["engine_s"],
                       "server_ms": 1e3 * (time.perf_counter() - t0)},
        }
        q = req.quantiles if "quantiles" in req.include else []

        def render() -> Response:
            body = extrapolation_body(meta, tlat, tlon, out, req.include, q)
            if fmt == "netcdf":
                return Response(extrapolation_netcdf(body, out["samples"]), media_type=NETCDF,
                                headers={"Content-Disposition": 'attachment; filename="extrapolation.nc"'})
            return _json(body)

        return await asyncio.to_thread(render) if task.xt.shape[1] * req.num_samples > 2000 else render()

    @app.post("/v1/log-likelihood", tags=["inference"], dependencies=protected,
              openapi_extra=_body_doc(LogLikelihoodRequest))
    async def log_likelihood(request: Request) -> Response:
        """Joint and per-point log p(target values | context), nats, with its estimator and solver."""
        t0 = time.perf_counter()
        req = validate(LogLikelihoodRequest, await read_json(request, settings.max_body_bytes), settings)
        _ready()
        lm = engine.get(req.model)
        check_context_size(lm, req.context.n, settings)
        convert.check_points(lm.region, req.context.latitude, req.context.longitude, "context")
        convert.check_points(lm.region, req.targets.latitude, req.targets.longitude, "targets")
        estimator = resolve_estimator(lm, req.estimator, req.targets.n, settings)
        r = lm.region
        task = Task(torch.from_numpy(convert.xy(r, req.context.latitude, req.context.longitude))[None],
                    torch.from_numpy(convert.era5_to_normalised(req.context.array(), lm.normalizer))[None],
                    torch.from_numpy(convert.xy(r, req.targets.latitude, req.targets.longitude))[None],
                    torch.from_numpy(convert.era5_to_normalised(req.targets.array(), lm.normalizer))[None])
        solver = SolverConfig(req.solver, req.steps)
        res, timing = await engine.submit("log_likelihood", lambda deadline: run_log_likelihood(
            lm, task, solver=solver, estimator=estimator, n_probes=req.n_probes, seed=req.seed,
            deadline=deadline), req.timeout_s, request.headers.get("x-retry-ticket"))
        metrics.nfe.labels(lm.version, "log_likelihood").inc(res["nfe"])
        metrics.points.labels(lm.version, "log_likelihood").inc(res["n_targets"])
        n = res["n_targets"]
        return _json({
            "model": {"version": lm.version, "synthetic": lm.info["synthetic"]},
            "context": {"n": req.context.n, "time": req.context.time.isoformat() if req.context.time else None},
            "n_targets": n, "kind": LL_KIND, "units": LL_UNITS,
            "joint": res["joint"], "per_point": res["joint"] / n,
            "joint_normalised": res["joint_normalised"], "per_point_normalised": res["joint_normalised"] / n,
            "estimator": res["estimator"], "n_probes": res["n_probes"], "spread": res["spread"],
            "probe_seed": req.seed if res["estimator"].startswith("hutchinson") else None,
            "solver": req.solver, "steps": req.steps, "nfe": res["nfe"],
            "timing": {"queue_ms": 1e3 * timing["queue_s"], "engine_ms": 1e3 * timing["engine_s"],
                       "server_ms": 1e3 * (time.perf_counter() - t0)},
        })

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in (ExtrapolateRequest, LogLikelihoodRequest):
                js = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[m.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app

