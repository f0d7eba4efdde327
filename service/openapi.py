"""The OpenAPI document, made to tell the truth: every status a route can answer with the error schema
(`{"error": {"code", "message", "details"?, "count"?}}`), the real content types (netCDF, Prometheus
text), and the request limits of the running settings (points, samples, steps, probes, quantiles) as JSON
Schema. What JSON Schema cannot say (equal list lengths, the model's disc, its trained minimum context,
distinct targets) is in the descriptions; such bodies get 422."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST

from flownp.samplers import SAMPLERS
from service.http import NETCDF
from service.schemas import ExtrapolateRequest, LogLikelihoodRequest
from service.settings import Settings

ERROR = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["code", "message"], "additionalProperties": False,
        "properties": {
            "code": {"type": "string", "description": "Stable machine-readable code, e.g. too_many."},
            "message": {"type": "string", "description": "What to fix."},
            "details": {"type": "array", "maxItems": 20, "items": {
                "type": "object", "required": ["loc", "code", "message"], "additionalProperties": False,
                "properties": {"loc": {"type": "string"}, "code": {"type": "string"},
                               "message": {"type": "string"}}}},
            "count": {"type": "integer", "minimum": 1, "description": "Problems found (details lists the first 20)."},
        }}},
}

_WHY = {
    400: "The body is not valid JSON.", 401: "An API key is needed (auth on) or the one sent is not valid.",
    404: "No such model version.", 406: "The Accept header names no type this route answers.",
    409: "The new models could not be loaded; the old ones are still served.",
    413: "The body exceeds the size limit.", 415: "Not application/json, or a Content-Encoding other than identity.",
    422: "Invalid request: a field (its type, range, length), or a rule across fields (equal list lengths, points "
         "inside the model's disc, at least the model's trained minimum context, distinct target points), "
         "sampler_not_offered (a sampler the model does not offer: GET /v1/models, samplers.offered), "
         "not_applicable (solver or steps named for distilled maps), or too_costly: its estimated work (targets x "
         "samples x solver evaluations, service.admission) exceeds "
         "the per-request limit.",
    500: "An internal error (logged; no details are given).",
    503: "Not ready (loading, or load_failed) or overloaded (the queue, or more requests in flight than the "
         "server's limit); retry after Retry-After seconds, sending back X-Retry-Ticket when given. A client "
         "that disconnects is logged as 499, which is never delivered.",
    504: "The request's deadline passed.",
}
RETRY_HEADERS = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 0}},
    "X-Retry-Ticket": {"description": "Send it back as X-Retry-Ticket on the retry to keep your place "
                       "(overloaded answers of the inference routes).", "schema": {"type": "string"}},
}
_POST = (400, 401, 404, 406, 413, 415, 422, 500, 503, 504)
STATUSES = {  # (path, method) -> error statuses it can answer
    ("/v1/extrapolate", "post"): _POST,
    ("/v1/log-likelihood", "post"): _POST,
    ("/v1/models", "get"): (401, 500, 503),
    ("/v1/models/{version}", "get"): (401, 404, 500, 503),
    ("/v1/admin/reload", "post"): (401, 409, 500, 503),
    ("/livez", "get"): (500,),
    ("/readyz", "get"): (500, 503),
    ("/metrics", "get"): (401, 500, 503),
}
_JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_NAME = {"type": "string", "enum": list(SAMPLERS)}
_SCORED_BY = {"type": "string", "description": "Who computed the log-likelihood: 'model', or 'teacher (lfm)' / "
              "'teacher (flownp)' for a distilled model (its maps define no density)."}
_NULL_INT = {"type": ["integer", "null"]}
# the parts of the answers that say which sampler ran and what the log-likelihoods are (the rest: see the
# route descriptions and README; further fields are allowed)
ANSWER_SCHEMAS: dict[str, Any] = {
    "SamplerUsed": {
        "type": "object", "required": ["name", "solver", "steps", "blocks", "maps", "exact_density", "scored_by",
                                       "seed", "nfe"],
        "description": "The sampler that ran (the request's `sampler`, else the model's default).",
        "properties": {
            "name": _NAME,
            "solver": {"type": ["string", "null"], "description": "Per flow (per block for lfm); null for distilled."},
            "steps": _NULL_INT, "blocks": {**_NULL_INT, "description": "Flows in sequence (lfm: N; ode: 1)."},
            "maps": {**_NULL_INT, "description": "distilled: its one-step maps (N' evaluations)."},
            "exact_density": {"type": "boolean", "description": "Whether this sampler's distribution has the exact "
                              "density its log-likelihoods report (false for distilled: they are its teacher's)."},
            "scored_by": _SCORED_BY, "seed": {"type": "integer"},
            "nfe": {"type": "integer", "description": "Network evaluations of the draw (all samples together)."}}},
    "SampleLogLikelihood": {
        "type": "object", "required": ["values", "units", "estimator", "solver", "steps", "nfe", "exact_density",
                                       "scored_by"],
        "properties": {"values": {"type": "array", "items": {"type": "number"}}, "units": {"type": "string"},
                       "estimator": {"type": "string"}, "solver": {"type": "string"}, "steps": {"type": "integer"},
                       "blocks": {"type": "integer"}, "nfe": {"type": "integer"},
                       "exact_density": {"type": "boolean", "description": "false: the samples came from distilled "
                                         "maps and these are the teacher's log-likelihoods of them."},
                       "in_sampling_solve": {"type": "boolean", "description": "true: scored in the solve that drew "
                                             "the samples (the same solver and steps for both), forwards from "
                                             "their noise; false: a separate backward solve from each sample."},
                       "scored_by": _SCORED_BY}},
    "Extrapolation": {
        "type": "object", "required": ["model", "context", "sampler", "latitude", "longitude", "sample", "units",
                                       "timing"],
        "properties": {"sampler": {"$ref": "#/components/schemas/SamplerUsed"},
                       "log_likelihood": {"$ref": "#/components/schemas/SampleLogLikelihood"}}},
    "Score": {
        "type": "object", "required": ["joint", "per_point", "units", "estimator", "solver", "steps", "nfe",
                                       "exact_density", "scored_by"],
        "properties": {"joint": {"type": "number"}, "per_point": {"type": "number"}, "units": {"type": "string"},
                       "estimator": {"type": "string"}, "solver": {"type": "string"}, "steps": {"type": "integer"},
                       "blocks": {"type": "integer"}, "nfe": {"type": "integer"},
                       "exact_density": {"type": "boolean", "description": "Whether this is the model's own exact "
                                         "density (false for a distilled model: its teacher scores)."},
                       "scored_by": _SCORED_BY}},
    "ModelSamplers": {
        "type": "object", "required": ["offered", "default", "chosen_by", "measured", "details"],
        "properties": {"offered": {"type": "array", "items": _NAME, "minItems": 1}, "default": _NAME,
                       "chosen_by": {"type": "string", "description": "'recorded comparison' (measured) or "
                                     "'model kind' (the kind's natural sampler)."},
                       "measured": {"type": ["object", "null"]}, "details": {"type": "object"}}},
    "ModelInfo": {
        "type": "object", "required": ["version", "model_kind", "exact_density", "samplers"],
        "properties": {"version": {"type": "string"},
                       "model_kind": {"type": "string", "enum": ["flownp", "lfm", "distilled"]},
                       "exact_density": {"type": "boolean"},
                       "samplers": {"$ref": "#/components/schemas/ModelSamplers"}}},
    "Models": {
        "type": "object", "required": ["default", "models"],
        "properties": {"default": {"type": ["string", "null"]},
                       "models": {"type": "array", "items": {"$ref": "#/components/schemas/ModelInfo"}}}},
}


def _answer(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


OK_CONTENT = {
    ("/v1/extrapolate", "post"): {**_answer("Extrapolation"),
                                  NETCDF: {"schema": {"type": "string", "format": "binary"}}},
    ("/v1/log-likelihood", "post"): _answer("Score"),
    ("/v1/models", "get"): _answer("Models"),
    ("/v1/models/{version}", "get"): _answer("ModelInfo"),
    ("/v1/admin/reload", "post"): _JSON_OBJECT,
    ("/readyz", "get"): {"application/json": {"schema": {
        "type": "object", "required": ["status", "models", "default"],
        "properties": {"status": {"const": "ready"}, "models": {"type": "array", "items": {"type": "string"}},
                       "default": {"type": ["string", "null"]}}}}},
    ("/metrics", "get"): {CONTENT_TYPE_LATEST: {"schema": {"type": "string",
                                                           "description": "Prometheus text exposition format."}}},
}


def _points(schema: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    """A copy of a Points/Observations schema whose arrays hold lo..hi entries."""
    out = copy.deepcopy(schema)
    props = out["properties"]
    arrays = [props["latitude"], props["longitude"]] + list(props.get("values", {}).get("properties", {}).values())
    for a in arrays:
        a["minItems"], a["maxItems"] = lo, hi
    return out


def _limits(comps: dict[str, Any], s: Settings) -> None:
    """The settings' limits in the request schemas (in place)."""
    obs, pts = comps["Observations"], comps["Points"]
    ex, ll, opts = comps["ExtrapolateRequest"]["properties"], comps["LogLikelihoodRequest"]["properties"], \
        comps["LikelihoodOptions"]["properties"]
    ex["context"] = ll["context"] = {**_points(obs, s.min_context, s.max_context),
                                     "description": "Context observations (a model may need more than "
                                                    "minItems: GET /v1/models gives its min_context)."}
    ex["targets"]["oneOf"] = [{"type": "string", "const": "circle"}, _points(pts, 1, s.max_targets)]
    ll["targets"] = _points(obs, 1, s.max_targets)
    ex["num_samples"]["maximum"] = s.max_samples
    for p in (ex["steps"], opts["steps"], ll["steps"]):
        p["maximum"] = s.max_steps
    for p in (opts["n_probes"], ll["n_probes"]):
        p["maximum"] = s.max_probes
    ex["quantiles"].update(maxItems=s.max_quantiles, items={"type": "number", "exclusiveMinimum": 0,
                                                             "exclusiveMaximum": 1})
    time = {"anyOf": [{"type": "string", "description": "ISO 8601, e.g. 2017-01-15T12:00:00Z"}, {"type": "null"}],
            "default": None, "description": "Valid time (echoed back; the model is stationary)."}
    obs["properties"]["time"] = time
    for c in (ex["context"], ll["context"], ll["targets"]):
        c["properties"]["time"] = time


def _responses(schema: dict[str, Any]) -> None:
    """Every operation's real statuses and content types (in place)."""
    for (path, method), statuses in STATUSES.items():
        op = schema["paths"][path][method]
        responses = op.setdefault("responses", {})
        responses.pop("422", None)  # FastAPI's HTTPValidationError: our 422 is the error schema
        if (path, method) in OK_CONTENT:
            responses.setdefault("200", {"description": "OK"})["content"] = OK_CONTENT[path, method]
        for status in statuses:
            responses[str(status)] = {"description": _WHY[status],
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            if status == 503:
                responses["503"]["headers"] = RETRY_HEADERS
    comps = schema["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    comps["Error"] = ERROR
    comps.update(copy.deepcopy(ANSWER_SCHEMAS))


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The document for `app` (its routes, the request models and the limits of `settings`)."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for m in (ExtrapolateRequest, LogLikelihoodRequest):
        js = m.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(js.pop("$defs", {}))
        comps[m.__name__] = js
    _limits(comps, settings)
    _responses(schema)
    return schema
