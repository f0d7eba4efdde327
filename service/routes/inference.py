"""Inference: POST /v1/extrapolate and POST /v1/log-likelihood. Requests are validated (service.schemas),
checked against the served model's ModelSpace (ingest.space: region, circle targets, conversion; its
DomainError answers 422 with its code), and run by the engine (flownp.inference under admission and a
deadline, admitted by cost: service.admission.request_cost; cancelled when the client disconnects).
A request's sampler, solvers and cost are decided by service.sampling (the model's default sampler unless
`sampler` names one it offers). Log-likelihoods come back over ERA5 units, labelled (`units`), with who
scored them and whether they are the samples' exact density (a distilled sampler has none)."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from flownp.inference import LL_KIND, LL_UNITS, task as make_task
from service.deps import PROTECTED, EngineDep, MetricsDep, SettingsDep, json_response, require_ready
from service.engine import check_context_size, resolve_estimator, run_extrapolate, run_log_likelihood
from service.errors import ApiError
from service.http import NETCDF, choose_format, read_request
from service.responses import extrapolation_body, extrapolation_netcdf
from service.sampling import SAMPLE_LL_SOLVER, SAMPLE_SOLVER, SCORE_SOLVER, sampling_for, score_cost, solver_for
from service.schemas import ExtrapolateRequest, LogLikelihoodRequest, Points

__all__ = ["SAMPLE_LL_SOLVER", "SAMPLE_SOLVER", "SCORE_SOLVER", "router", "solver_for"]

router = APIRouter(tags=["inference"], dependencies=PROTECTED)


def body_doc(model: type) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _gone(request: Request) -> None:
    """Finishes when the client has disconnected (the body is already read, so the next ASGI message is
    http.disconnect): lets the engine cancel the work of a client that went away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _timing(timing: dict[str, float], t0: float) -> dict[str, float]:
    return {"queue_ms": 1e3 * timing["queue_s"], "engine_ms": 1e3 * timing["engine_s"],
            "server_ms": 1e3 * (time.perf_counter() - t0)}


@router.post("/v1/extrapolate", openapi_extra=body_doc(ExtrapolateRequest),
             responses={200: {"description": "Samples, summaries and log-likelihoods (JSON or CF netCDF).",
                              "content": {"application/json": {}, NETCDF: {}}}})
async def extrapolate(request: Request, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep) -> Response:
    """Sample the four variables at the targets given the context; per-sample joint log-likelihoods."""
    t0 = time.perf_counter()
    req = await read_request(ExtrapolateRequest, request, settings)
    fmt = choose_format(req.format, request.headers.get("accept", ""))
    require_ready(engine)
    lm = engine.get(req.model)  # one read of the served snapshot; the request keeps this model
    space, ctx = lm.space, req.context
    check_context_size(lm, ctx.n, settings)
    space.check_points(ctx.latitude, ctx.longitude, "context")
    if isinstance(req.targets, Points):
        space.check_points(req.targets.latitude, req.targets.longitude, "targets")
        tlat, tlon = req.targets.latitude, req.targets.longitude
    else:
        la, lo = space.circle_targets(ctx.latitude, ctx.longitude)
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
    task = make_task(space, ctx.latitude, ctx.longitude, ctx.array(), tlat, tlon)
    plan = sampling_for(lm, req.sampler, req.solver, req.steps, opts.solver, opts.steps, settings.max_steps)
    solver, ll_solver = plan.solver, plan.ll_solver
    cost = plan.cost(n_ctx=ctx.n, n_tgt=len(tlat), num_samples=req.num_samples, with_ll=with_ll, estimator=estimator,
                     n_probes=opts.n_probes, gp_base=bool(getattr(lm.model, "has_task_transform", False)))
    out, timing = await engine.submit("extrapolate", lambda job: run_extrapolate(
        lm, task, num_samples=req.num_samples, solver=solver, seed=seed, with_ll=with_ll, ll_solver=ll_solver,
        estimator=estimator, n_probes=opts.n_probes, check=job, sampler=plan.plan.name), req.timeout_s,
        request.headers.get("x-retry-ticket"), cost, lambda: _gone(request))
    metrics.nfe.labels(lm.version, "sample").inc(out["nfe"])
    if "ll" in out:
        metrics.nfe.labels(lm.version, "log_likelihood").inc(out["ll"]["nfe"])
    metrics.points.labels(lm.version, "extrapolate").inc(len(tlat) * req.num_samples)
    metrics.samples.labels(lm.version).inc(req.num_samples)
    meta = {
        "model": {"version": lm.version, "synthetic": lm.info["synthetic"]},
        "context": {"n": ctx.n, "time": ctx.time.isoformat() if ctx.time else None},
        "sampler": {**out["sampler"], "seed": seed},
        "log_likelihood": {"solver": ll_solver.method, "steps": ll_solver.steps, "blocks": plan.plan.ll_blocks},
        "timing": _timing(timing, t0),
    }
    q = req.quantiles if "quantiles" in req.include else []

    def render() -> Response:
        body = extrapolation_body(meta, tlat, tlon, out, req.include, q)
        if fmt == "netcdf":
            return Response(extrapolation_netcdf(body, out["samples"]), media_type=NETCDF,
                            headers={"Content-Disposition": 'attachment; filename="extrapolation.nc"'})
        return json_response(body)

    return await asyncio.to_thread(render) if task.xt.shape[1] * req.num_samples > 2000 else render()


@router.post("/v1/log-likelihood", openapi_extra=body_doc(LogLikelihoodRequest))
async def log_likelihood(request: Request, engine: EngineDep, settings: SettingsDep,
                         metrics: MetricsDep) -> Response:
    """Joint and per-point log p(target values | context), nats, with its estimator and solver."""
    t0 = time.perf_counter()
    req = await read_request(LogLikelihoodRequest, request, settings)
    choose_format(None, request.headers.get("accept", ""), offered=("json",))
    require_ready(engine)
    lm = engine.get(req.model)
    space, ctx, tg = lm.space, req.context, req.targets
    check_context_size(lm, ctx.n, settings)
    space.check_points(ctx.latitude, ctx.longitude, "context")
    space.check_points(tg.latitude, tg.longitude, "targets")
    estimator = resolve_estimator(lm, req.estimator, tg.n, settings)
    task = make_task(space, ctx.latitude, ctx.longitude, ctx.array(), tg.latitude, tg.longitude, tg.array())
    solver = solver_for(lm, "log_likelihood", req.solver, req.steps, SCORE_SOLVER, settings.max_steps)
    cost = score_cost(lm, solver, n_ctx=ctx.n, n_tgt=tg.n, estimator=estimator, n_probes=req.n_probes)
    res, timing = await engine.submit("log_likelihood", lambda job: run_log_likelihood(
        lm, task, solver=solver, estimator=estimator, n_probes=req.n_probes, seed=req.seed, check=job),
        req.timeout_s, request.headers.get("x-retry-ticket"), cost, lambda: _gone(request))
    metrics.nfe.labels(lm.version, "log_likelihood").inc(res["nfe"])
    metrics.points.labels(lm.version, "log_likelihood").inc(res["n_targets"])
    n = res["n_targets"]
    return json_response({
        "model": {"version": lm.version, "synthetic": lm.info["synthetic"]},
        "context": {"n": ctx.n, "time": ctx.time.isoformat() if ctx.time else None},
        "n_targets": n, "kind": LL_KIND, "units": LL_UNITS,
        "joint": res["joint"], "per_point": res["joint"] / n,
        "joint_normalised": res["joint_normalised"], "per_point_normalised": res["joint_normalised"] / n,
        "estimator": res["estimator"], "n_probes": res["n_probes"], "spread": res["spread"],
        "probe_seed": req.seed if res["estimator"].startswith("hutchinson") else None,
        "solver": solver.method, "steps": solver.steps, "blocks": res["blocks"], "nfe": res["nfe"],
        "scored_by": res["scored_by"], "exact_density": res["exact_density"],
        "timing": _timing(timing, t0),
    })
