"""Request schemas (pydantic v2): strict types, unknown fields rejected, NaN/Infinity rejected.

Values arrive in ERA5 physical units (sp [Pa], t2m [K], u10/v10 [m s-1]) and coordinates in degrees
(latitude north, longitude east in -180..180). Limits (points, samples, steps) come from the Settings
passed as validation context: `Model.model_validate(data, context={"settings": settings})`.
Region checks need the served model's region and happen through its ModelSpace (ingest.space).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from ingest.space import CIRCLE_MATCH_DECIMALS, DomainError, check_physical
from ingest.variables import BY_NAME, NAMES, resolve_alias
from service.errors import ApiError, clip, loc_str
from service.settings import Settings

Solver = Literal["euler", "midpoint", "rk4"]
Sampler = Literal["ode", "lfm", "distilled"]  # flownp.samplers.SAMPLERS
Estimator = Literal["auto", "exact", "hutchinson"]
Part = Literal["samples", "mean", "std", "quantiles", "log_likelihood"]
ALL_PARTS: tuple[str, ...] = ("samples", "mean", "std", "quantiles", "log_likelihood")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def _settings(info: ValidationInfo) -> Settings:
    ctx = info.context or {}
    return ctx.get("settings") or Settings()


def _err(code: str, msg: str, **kw: Any) -> PydanticCustomError:
    """A validation error whose type is our stable code; the message is formatted here (echoed strings
    clipped)."""
    kw = {k: clip(v) if isinstance(v, str) else v for k, v in kw.items()}
    return PydanticCustomError(code, msg.format(**kw).replace("{", "(").replace("}", ")"))


# JSON Schema for the docs only: the server checks these through the model's region (ingest.space), which
# answers with more precise codes (out_of_region, swapped_coordinates, longitude_0_360) than a range would
_LAT_ITEMS = {"items": {"type": "number", "minimum": -90, "maximum": 90}}
_LON_ITEMS = {"items": {"type": "number", "minimum": -180, "maximum": 180}}


class Points(Strict):
    """Locations: equal-length lists of latitude [degrees north] and longitude [degrees east]."""

    latitude: list[float] = Field(min_length=1, description="Degrees north.", json_schema_extra=_LAT_ITEMS)
    longitude: list[float] = Field(min_length=1, description="Degrees east, -180..180.",
                                   json_schema_extra=_LON_ITEMS)

    @model_validator(mode="after")
    def _lengths(self) -> "Points":
        if len(self.latitude) != len(self.longitude):
            raise _err("length_mismatch", "latitude has {a} values but longitude has {b}",
                       a=len(self.latitude), b=len(self.longitude))
        return self

    @property
    def n(self) -> int:
        return len(self.latitude)

    def check_distinct(self, where: str) -> None:
        """`duplicated_point` when two points coincide (to CIRCLE_MATCH_DECIMALS decimals, as the circle is
        matched): a joint answer over one location given twice is not defined."""
        seen: dict[tuple[float, float], int] = {}
        d = CIRCLE_MATCH_DECIMALS
        for i, key in enumerate(zip(np.round(self.latitude, d).tolist(), np.round(self.longitude, d).tolist())):
            j = seen.setdefault(key, i)
            if j != i:
                raise _err("duplicated_point", "{where}: points {j} and {i} are the same location ({lat:g}, "
                           "{lon:g}); give each target once", where=where, i=i, j=j, lat=key[0], lon=key[1])


class Observations(Points):
    """Points with values of all four variables (ERA5 short names or CDS long names), ERA5 units."""

    values: dict[str, list[float]] = Field(
        description="Per variable, one value per point: sp [Pa], t2m [K], u10 [m s-1], v10 [m s-1] (CDS long "
                    "names, e.g. 2m_temperature, are accepted in place of the short ones).",
        json_schema_extra=lambda schema: schema.update(_values_schema()))
    time: dt.datetime | None = Field(None, description="Valid time (echoed back; the model is stationary).")

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        if isinstance(v, str):  # strict mode takes no strings for datetimes: parse ISO 8601 here
            try:
                return dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                raise _err("invalid_value", "time must be ISO 8601, e.g. 2017-01-15T12:00:00Z") from None
        return v

    @field_validator("values")
    @classmethod
    def _variables(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for key, col in v.items():
            name = resolve_alias(key)
            if name is None:
                raise _err("unknown_variable", "unknown variable {key!r}; use {names}", key=key,
                           names=", ".join(NAMES))
            if name in out:
                raise _err("duplicated_variable", "variable {name} is given twice (as {key!r} too)",
                           name=name, key=key)
            out[name] = col
        missing = [n for n in NAMES if n not in out]
        if missing:
            raise _err("missing_variable", "values lack {missing}: all of sp [Pa], t2m [K], u10, v10 [m s-1] "
                       "are needed", missing=", ".join(missing))
        for name in NAMES:  # physical ranges: the one rule (ingest.space.check_physical)
            try:
                check_physical(name, out[name])
            except DomainError as exc:
                raise _err(exc.code, "{m}", m=exc.message) from None
        return out

    @model_validator(mode="after")
    def _value_lengths(self) -> "Observations":
        for name, col in self.values.items():
            if len(col) != self.n:
                raise _err("length_mismatch", "values.{name} has {a} values for {b} points", name=name,
                           a=len(col), b=self.n)
        return self

    def array(self) -> np.ndarray:
        """(n, 4) float64 in ERA5 units, model order (sp, t2m, u10, v10)."""
        return np.stack([np.asarray(self.values[n], dtype=np.float64) for n in NAMES], axis=-1)


def _values_schema() -> dict[str, Any]:
    """`values` in JSON Schema: the four variables, each within its physical range (ingest.space)."""
    props = {}
    for name in NAMES:
        v = BY_NAME[name]
        lo, hi = (float(x) for x in v.model_to_era5(np.array(v.plausible, dtype=np.float64)))
        props[name] = {"type": "array", "items": {"type": "number", "minimum": lo, "maximum": hi},
                       "description": f"{v.long_name} [{v.era5_units}]"}
    return {"properties": props, "required": list(NAMES), "additionalProperties": False}


_SOLVER_DOC = ("Fixed-step ODE solver. Neither solver nor steps given: the model's measured default "
               "(GET /v1/models/{{version}}: `solvers`, the cheapest within stated tolerances of dopri5, "
               "docs/results.md §5.2), else {what}; one of them given: the other from {what}.")


class LikelihoodOptions(Strict):
    """How a log-likelihood is integrated: reverse ODE from data (t=1) to noise (t=0)."""

    solver: Solver | None = Field(None, description=_SOLVER_DOC.format(what="midpoint, 2 steps"))
    steps: int | None = Field(None, ge=1, description="Solver steps (see solver).")
    estimator: Estimator = Field("auto", description="auto: exact trace where cheap (independent-target "
                                 "models), else Hutchinson; exact: always exact (small target sets); "
                                 "hutchinson: n_probes Rademacher probes.")
    n_probes: int = Field(1, ge=1)


def _check_common(settings: Settings, n_ctx: int, n_tgt: int | None, steps: list[tuple[str, int | None]],
                  n_probes: int) -> None:
    if n_ctx < settings.min_context:
        raise _err("too_few", "context has {n} point(s); at least {m} needed", n=n_ctx, m=settings.min_context)
    if n_ctx > settings.max_context:
        raise _err("too_many", "context has {n} points; at most {m} allowed", n=n_ctx, m=settings.max_context)
    if n_tgt is not None and n_tgt > settings.max_targets:
        raise _err("too_many", "{n} target points; at most {m} allowed", n=n_tgt, m=settings.max_targets)
    for what, s in steps:
        if s is not None and s > settings.max_steps:
            raise _err("too_many", "{what} = {s}; at most {m} allowed", what=what, s=s, m=settings.max_steps)
    if n_probes > settings.max_probes:
        raise _err("too_many", "n_probes = {n}; at most {m} allowed", n=n_probes, m=settings.max_probes)


ModelName = Annotated[str | None, Field(min_length=1, max_length=128, description=(
    "Model version (GET /v1/models); absent or null: the default one."))]


def _targets_kind(v: Any) -> str:
    return "circle" if isinstance(v, str) else "points"


# a string is the keyword, an object is Points: errors inside an object are reported as such (not as
# "should be 'circle'")
Targets = Annotated[Union[Annotated[Literal["circle"], Tag("circle")], Annotated[Points, Tag("points")]],
                    Discriminator(_targets_kind)]


class ExtrapolateRequest(Strict):
    """Sample the four variables at target points given context observations."""

    model: ModelName = None
    context: Observations
    targets: Targets = Field(
        "circle", description="Points, or 'circle': every point of the region's circle not in the context.")
    num_samples: int = Field(8, ge=1)
    sampler: Sampler | None = Field(None, description=(
        "ode: the global flow's ODE (solver, steps); lfm: a Local Flow Matching model's blocks in sequence "
        "(solver and steps per block); distilled: a distilled model's one-step maps (no solver or steps: "
        "naming them is a 422; no density: its log-likelihoods are its teacher's, exact_density false). A "
        "model offers what it is (GET /v1/models: `samplers.offered`; a distilled model also offers its "
        "teacher's); another is a 422 sampler_not_offered. Absent or null: the model's `samplers.default`."))
    solver: Solver | None = Field(None, description=_SOLVER_DOC.format(what="euler, 8 steps") +
                                  " An LFM runs it in each block.")
    steps: int | None = Field(None, ge=1, description="Solver steps (see solver).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Noise seed; none: drawn and echoed back.")
    quantiles: list[float] = Field(default_factory=lambda: [0.05, 0.5, 0.95])
    include: list[Part] = Field(default_factory=lambda: list(ALL_PARTS), description=(
        "Parts of the answer. Default: all of them, except log_likelihood when targets is 'circle' (scoring "
        "every sample over the whole circle costs several times the sampling; ask for it by listing it)."))
    log_likelihood: LikelihoodOptions = Field(default_factory=LikelihoodOptions)
    format: Literal["json", "netcdf"] | None = Field(None, description="Else chosen by the Accept header.")
    timeout_s: float | None = Field(None, gt=0, description="Deadline for this request (capped by the server).")

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, q: list[float], info: ValidationInfo) -> list[float]:
        if any(not 0.0 < x < 1.0 for x in q):
            raise _err("out_of_range", "quantiles must lie strictly between 0 and 1")
        if len(q) > _settings(info).max_quantiles:
            raise _err("too_many", "at most {m} quantiles", m=_settings(info).max_quantiles)
        return q

    @model_validator(mode="after")
    def _limits(self, info: ValidationInfo) -> "ExtrapolateRequest":
        s = _settings(info)
        if "include" not in self.model_fields_set and isinstance(self.targets, str):
            self.include = [p for p in ALL_PARTS if p != "log_likelihood"]  # the cheap default for 'circle'
        if self.num_samples > s.max_samples:
            raise _err("too_many", "num_samples = {n}; at most {m} allowed", n=self.num_samples, m=s.max_samples)
        n_tgt = None if isinstance(self.targets, str) else self.targets.n
        if not isinstance(self.targets, str):
            self.targets.check_distinct("targets")
        _check_common(s, self.context.n, n_tgt, [("steps", self.steps),
                                                 ("log_likelihood.steps", self.log_likelihood.steps)],
                      self.log_likelihood.n_probes)
        return self


class LogLikelihoodRequest(Strict):
    """log p(observed values at the target points | context), jointly over the targets."""

    model: ModelName = None
    context: Observations
    targets: Observations
    solver: Solver | None = Field(None, description=_SOLVER_DOC.format(what="midpoint, 8 steps"))
    steps: int | None = Field(None, ge=1, description="Solver steps (see solver).")
    estimator: Estimator = "auto"
    n_probes: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of the Hutchinson probes.")
    timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _limits(self, info: ValidationInfo) -> "LogLikelihoodRequest":
        self.targets.check_distinct("targets")
        _check_common(_settings(info), self.context.n, self.targets.n, [("steps", self.steps)], self.n_probes)
        return self


MAX_KEYS = 32  # keys in any one object of a request (the largest, ExtrapolateRequest, has 15 fields)
_SCHEMA_DEPTH = 5  # the deepest level pydantic reads: body.context.values.t2m[i]


def check_sizes(data: dict[str, Any], settings: Settings) -> None:
    """Refuse, before any model is built, a body whose arrays or objects are longer than any valid request
    has (`too_many`, 422): pydantic would otherwise report every element of an 835k-element array.

    Context arrays are bounded by max_context, target arrays by max_targets, any other array by the larger
    of the two and any object by MAX_KEYS; nothing deeper than the schema reads is visited."""
    def limit_for(loc: tuple[Any, ...]) -> tuple[int, str]:
        if loc[:1] == ("context",) and len(loc) >= 2:
            return settings.max_context, "context points"
        if loc[:1] == ("targets",) and len(loc) >= 2:
            return settings.max_targets, "target points"
        return max(settings.max_context, settings.max_targets), "values"

    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        node, loc = stack.pop()
        if isinstance(node, dict):
            if len(node) > MAX_KEYS:
                raise ApiError(422, "too_many", f"{loc_str(loc)} has {len(node)} keys; at most {MAX_KEYS} allowed")
            children = [(v, loc + (k,)) for k, v in node.items()]
        elif isinstance(node, list):
            n, what = limit_for(loc)
            if len(node) > n:
                raise ApiError(422, "too_many", f"{loc_str(loc)} has {len(node)} entries; at most {n} {what} "
                               "allowed")
            children = [(v, loc + (i,)) for i, v in enumerate(node)]
        else:
            continue
        if len(loc) < _SCHEMA_DEPTH:
            stack.extend(c for c in reversed(children) if isinstance(c[0], (dict, list)))  # in body order
