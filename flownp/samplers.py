"""The samplers a model offers, and the plan of one request's sampling and scoring.

A model offers what it is (`offered`):
- "ode": a global FlowNP (or a GAV model): one ODE from N(0, I) to the data, a fixed-step solver with
  `steps` steps (its evaluations: steps x the method's); scored by its own exact likelihood.
- "lfm": a Local Flow Matching model (flownp.core.lfm.LFM): N blocks in sequence, the solver per block
  (N x steps x the method's evaluations); scored by its exact likelihood through every block.
- "distilled": a DistilledSampler's N' one-step maps (N' evaluations, no solver). The maps define no
  density: its scores are its teacher's (`exact_density` False). A distilled model also offers its
  teacher's sampler ("ode" for a global teacher, "lfm"), drawn and scored by the teacher, exactly.

The default sampler is the one a recorded comparison chose (a manifest's `samplers.default`, e.g. from
bench/sampling_latency.py through `flownp.default_model.choose_sampler`), else the kind's natural one
(`natural`: the model's own). `plan(model, name, default)` says what runs: which module draws, which
scores, how many flows each integrates (the service's cost, service.admission.request_cost) and how the
scores relate to the samples. A sampler the model does not offer is a `SamplerError` (the service's 422
`sampler_not_offered`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flownp.core.lfm import LFM, DistilledSampler
from flownp.core.solvers import SolverConfig
from ingest.space import DomainError

__all__ = ["SAMPLERS", "Plan", "SamplerError", "kind", "manifest", "natural", "offered", "plan"]

SAMPLERS = ("ode", "lfm", "distilled")


class SamplerError(DomainError):
    """A sampler the model does not offer (code `sampler_not_offered`), naming the ones it does."""

    def __init__(self, message: str) -> None:
        super().__init__("sampler_not_offered", message)


def kind(model: Any) -> str:
    """'distilled', 'lfm' or 'flownp' (a global flow, GAV included)."""
    if isinstance(model, DistilledSampler):
        return "distilled"
    return "lfm" if isinstance(model, LFM) else "flownp"


def _own(model: Any) -> str:
    """The sampler a module runs by itself."""
    return {"distilled": "distilled", "lfm": "lfm", "flownp": "ode"}[kind(model)]


def natural(model: Any) -> str:
    """The kind's natural sampler: the model's own (a distilled model's is its maps)."""
    return _own(model)


def offered(model: Any) -> tuple[str, ...]:
    """The samplers `model` offers, its own first: ('ode',), ('lfm',), ('distilled', <the teacher's>)."""
    if isinstance(model, DistilledSampler):
        return ("distilled", _own(model.teacher))
    return (_own(model),)


def _blocks(model: Any) -> int:
    """Flows a module's ODE solve or exact likelihood integrates in sequence (an LFM's N, else 1)."""
    return model.lfm_config.n_blocks if isinstance(model, LFM) else 1


@dataclass(frozen=True)
class Plan:
    """What one request runs. `runner` draws, `scorer` scores (flownp.core.sampling / likelihood call their
    `flow_samples` / `flow_log_likelihood` when they have them). blocks: flows the solver integrates in
    sequence when drawing (0 for the maps); maps: N' one-step maps (None: a solver runs); ll_blocks: flows
    the likelihood integrates; exact_density: whether the scores are the exact density of the distribution
    the samples are drawn from; scored_by: 'model', or 'teacher (<kind>)'."""

    name: str
    runner: Any
    scorer: Any
    blocks: int
    maps: int | None
    ll_blocks: int
    exact_density: bool
    scored_by: str

    @property
    def uses_solver(self) -> bool:
        return self.maps is None

    def sample_nfe(self, solver: SolverConfig) -> int | None:
        """Network evaluations of one draw (all samples together): N' maps, else blocks x the solver's."""
        if self.maps is not None:
            return self.maps
        per = solver.nfe()
        return None if per is None else self.blocks * per

    def describe(self, solver: SolverConfig | None = None) -> dict[str, Any]:
        """The JSON the service and the Python API report: name, solver/steps per block (None for the
        maps), blocks, maps, and the scores' provenance."""
        s = solver if self.uses_solver else None
        return {"name": self.name, "solver": s.method if s else None, "steps": s.steps if s else None,
                "blocks": self.blocks if self.uses_solver else None, "maps": self.maps,
                "exact_density": self.exact_density, "scored_by": self.scored_by}


def _teacher_label(model: DistilledSampler) -> str:
    return f"teacher ({kind(model.teacher)})"


def plan(model: Any, name: str | None = None, default: str | None = None) -> Plan:
    """The plan of sampler `name` (None: `default`, else the natural one) on `model`; SamplerError when
    the model does not offer it."""
    name = name or default or natural(model)
    offers = offered(model)
    if name not in offers:
        known = "" if name in SAMPLERS else f" (samplers are {', '.join(SAMPLERS)})"
        raise SamplerError(f"this model ({kind(model)}) offers sampler(s) {', '.join(offers)}; "
                           f"not {name!r}{known}")
    if isinstance(model, DistilledSampler):
        teacher, label = model.teacher, _teacher_label(model)
        if name == "distilled":
            return Plan(name, model, model, 0, len(model.maps), _blocks(teacher), False, label)
        return Plan(name, teacher, teacher, _blocks(teacher), None, _blocks(teacher), True, label)
    return Plan(name, model, model, _blocks(model), None, _blocks(model), True, "model")


def scoring(model: Any) -> dict[str, Any]:
    """Who scores a /log-likelihood of `model` and whether that is the model's own exact density (a
    distilled model has none: its teacher scores)."""
    if isinstance(model, DistilledSampler):
        return {"scored_by": _teacher_label(model), "exact_density": False, "blocks": _blocks(model.teacher)}
    return {"scored_by": "model", "exact_density": True, "blocks": _blocks(model)}


def _details(model: Any, name: str) -> dict[str, Any]:
    p = plan(model, name)
    if p.maps is not None:
        return {"maps": p.maps, "evaluations": p.maps, "exact_density": False,
                "log_likelihood": f"the {p.scored_by}'s: the maps define no density"}
    per = "the solver's" if p.blocks == 1 else f"{p.blocks} blocks x the per-block solver's"
    return {"blocks": p.blocks, "evaluations": per, "exact_density": True,
            "run_by": "teacher" if p.runner is not model else "model"}


def manifest(model: Any, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """A model's `samplers` entry: what it offers (with each one's evaluations and density), its default
    (`recorded['default']` when it is offered, else the natural one) and the recorded measurement."""
    offers = offered(model)
    rec = recorded or {}
    want = rec.get("default")
    if want in offers:
        default, chosen_by = want, "recorded comparison"
    else:
        default = natural(model)
        chosen_by = "model kind" + (f" (the recorded default {want!r} is not offered)" if want else "")
    return {"offered": list(offers), "default": default, "chosen_by": chosen_by,
            "measured": rec.get("measured"), "details": {n: _details(model, n) for n in offers}}
