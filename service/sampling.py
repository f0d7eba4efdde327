"""What one request runs: its sampler (flownp.samplers), its solvers and its cost, decided the same way for
the HTTP routes and for in-process callers (bench/sampling_latency.py).

Solvers named nowhere in a request are the model's measured defaults (`LoadedModel.solver`, the manifest's
`solvers`), else the global ones below; an LFM runs the sampling solver in each of its blocks. A distilled
sampler's maps take no solver: naming `solver` or `steps` with it is a 422 (`not_applicable`), as is a
sampler the model does not offer (`sampler_not_offered`, naming the ones it does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flownp.core.solvers import SolverConfig
from flownp.inference import LoadedModel, one_solve
from flownp.samplers import Plan, SamplerError, scoring
from service.admission import request_cost
from service.errors import ApiError

__all__ = ["SAMPLE_LL_SOLVER", "SAMPLE_SOLVER", "SCORE_SOLVER", "Sampling", "sampling_for", "score_cost",
           "solver_for"]

# global solver defaults, for a model that records none (docs/results.md §5.2); per block for an LFM
SAMPLE_SOLVER = SolverConfig("euler", 8)
SAMPLE_LL_SOLVER = SolverConfig("midpoint", 2)
SCORE_SOLVER = SolverConfig("midpoint", 8)


def solver_for(lm: LoadedModel, kind: str, method: str | None, steps: int | None,
               fallback: SolverConfig, max_steps: int) -> SolverConfig:
    """The solver a request runs: neither method nor steps given -> the model's measured default for `kind`
    ('sample' | 'log_likelihood', `LoadedModel.solver`), else `fallback`; one given -> the other from
    `fallback`."""
    if method is None and steps is None:
        return lm.solver(kind, fallback, max_steps)
    return SolverConfig(method or fallback.method, steps or fallback.steps)


@dataclass(frozen=True)
class Sampling:
    """One /v1/extrapolate's sampler plan and solvers (`solver` is unused by distilled maps)."""

    plan: Plan
    solver: SolverConfig
    ll_solver: SolverConfig

    def cost(self, *, n_ctx: int, n_tgt: int, num_samples: int, with_ll: bool, estimator: str, n_probes: int,
             gp_base: bool) -> int:
        """service.admission.request_cost of this plan: the sampler's evaluations (blocks x steps, or maps) and
        the likelihood through the scorer's flows; where one solve draws and scores (`one_solve`), the
        likelihood's evaluations alone."""
        p = self.plan
        one = with_ll and one_solve(p, self.solver, self.ll_solver)
        return request_cost(n_ctx=n_ctx, n_tgt=n_tgt, num_samples=num_samples, solver=self.solver.method,
                            steps=0 if one else self.solver.steps, ll_solver=self.ll_solver.method if with_ll else None,
                            ll_steps=self.ll_solver.steps, estimator=estimator, n_probes=n_probes, gp_base=gp_base,
                            blocks=p.blocks, maps=p.maps, ll_blocks=p.ll_blocks)

    def describe(self) -> dict[str, Any]:
        """The request's `sampler` block before it runs (name, solver, steps, blocks, maps, density)."""
        return self.plan.describe(self.solver)


def plan_for(lm: LoadedModel, sampler: str | None) -> Plan:
    """`LoadedModel.plan`, a sampler the model does not offer as 422 sampler_not_offered."""
    try:
        return lm.plan(sampler)
    except SamplerError as exc:
        raise ApiError(422, exc.code, f"model {lm.version}: {exc.message}") from None


def sampling_for(lm: LoadedModel, sampler: str | None, method: str | None, steps: int | None,
                 ll_method: str | None, ll_steps: int | None, max_steps: int) -> Sampling:
    """The plan of sampler `sampler` (None: the model's default) with its solvers; 422 when the model does
    not offer it, or when a solver or steps are named for distilled maps."""
    plan = plan_for(lm, sampler)
    if not plan.uses_solver and (method is not None or steps is not None):
        raise ApiError(422, "not_applicable", f"sampler 'distilled' of model {lm.version} runs {plan.maps} "
                       "one-step map(s) and takes no solver or steps; leave them out, or ask for one of its "
                       f"other samplers: {[s for s in lm.samplers['offered'] if s != 'distilled']}")
    solver = solver_for(lm, "sample", method, steps, SAMPLE_SOLVER, max_steps)
    ll_solver = solver_for(lm, "log_likelihood", ll_method, ll_steps, SAMPLE_LL_SOLVER, max_steps)
    return Sampling(plan, solver, ll_solver)


def score_cost(lm: LoadedModel, solver: SolverConfig, *, n_ctx: int, n_tgt: int, estimator: str,
               n_probes: int) -> int:
    """The cost of a /v1/log-likelihood: one scored set through the scorer's flows (a distilled model's
    teacher's blocks)."""
    return request_cost(n_ctx=n_ctx, n_tgt=n_tgt, num_samples=1, solver=solver.method, steps=0,
                        ll_solver=solver.method, ll_steps=solver.steps, estimator=estimator, n_probes=n_probes,
                        gp_base=bool(getattr(lm.model, "has_task_transform", False)),
                        ll_blocks=scoring(lm.model)["blocks"])
