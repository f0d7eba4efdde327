"""Inference: a loaded model with its ModelSpace, and sampling / log-likelihoods in ERA5 units, labelled.

The one library both front ends call: `flownp.api` (xarray, notebooks) and `service` (HTTP). It imports
the core (`flownp.core`), checkpoints (`flownp.checkpoint`) and the model space (`ingest.space`), and
nothing of the jobs or the web layer.

- `build_model(version, ck, digest, ...)` / `default_model()`: a `LoadedModel` from a verified checkpoint
  (`flownp.checkpoint.load_verified`: one read, sha256, weights_only=True).
- `Task`: one request's normalised inputs, built from degrees and ERA5 values by `task(...)`.
- `extrapolate` / `log_likelihood`: the work. Log-likelihoods come back over ERA5 units (`LL_UNITS`,
  docs/protocol.md §6) and over normalised values, with their estimator and solver. A `check` callable,
  when given, is called at every context encoding and velocity evaluation, in every block of an LFM, map of
  a distilled sampler and solve of its teacher (the service raises from it past a deadline or on a cancel).
- Samplers (`flownp.samplers`): `extrapolate(..., sampler=None)` runs the model's default sampler (its
  manifest's `samplers.default`, else its kind's own), or the one named ("ode", "lfm", "distilled") when
  the model offers it; the result says which ran and whether its scores are the samples' exact density.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch

from flownp import default_model as _default
from flownp import samplers as _samplers
from flownp.checkpoint import lineage_n_ctx_min, load_verified, model_from_checkpoint
from flownp.core.likelihood import log_likelihood as _log_likelihood
from flownp.core.likelihood import resolve_estimator as resolve_core_estimator
from flownp.core.likelihood import is_one_flow as _is_one_flow
from flownp.core.likelihood import sample_log_likelihood as _sample_log_likelihood
from flownp.core.likelihood import samples_log_likelihood as _samples_log_likelihood
from flownp.core.model import count_parameters
from flownp.core.sampling import CheckedFlow
from flownp.core.sampling import draw_noise as _draw_noise
from flownp.core.sampling import sample as _sample
from flownp.core.sampling import task_transform as _task_transform
from flownp.core.solvers import FIXED, SolverConfig
from ingest.normalize import Normalizer
from ingest.region import Region
from ingest.space import UNITS, DomainError, ModelSpace
from ingest.variables import BY_NAME, NAMES

__all__ = ["LL_KIND", "LL_UNITS", "LoadedModel", "Task", "build_model", "default_checkpoint", "default_model",
           "extrapolate", "log_likelihood", "parse_solver", "resolve_estimator"]

LL_KIND = "joint over the targets given the context"
LL_UNITS = UNITS["era5"]


def parse_solver(spec: str) -> SolverConfig:
    """'euler:16', 'midpoint:100', 'rk4:32' or 'dopri5' / 'dopri5:1e-5' (rtol = atol)."""
    method, _, arg = spec.partition(":")
    if method in ("euler", "midpoint", "rk4"):
        return SolverConfig(method, int(arg or 16))
    tol = float(arg) if arg else 1e-5
    return SolverConfig(method, rtol=tol, atol=tol)


@dataclass
class LoadedModel:
    """A model ready to serve: the network, its ModelSpace, and what its checkpoint says of it."""

    version: str
    model: Any
    space: ModelSpace
    info: dict[str, Any]
    trained_min_context: int | None = None  # the smallest n_ctx over its training lineage, if recorded
    log_jac: float = field(init=False)  # log |d normalised / d ERA5 units| per point

    def __post_init__(self) -> None:
        self.log_jac = self.space.log_jacobian("era5")

    @property
    def normalizer(self) -> Normalizer:
        return self.space.normalizer

    @property
    def region(self) -> Region:
        return self.space.region

    @property
    def independent(self) -> bool:
        return getattr(self.model.config, "targets", "joint") == "independent"

    @property
    def samplers(self) -> dict[str, Any]:
        """The `samplers` entry of its manifest: offered, default, how the default was chosen, measured."""
        return self.info["samplers"]

    def plan(self, sampler: str | None = None) -> "_samplers.Plan":
        """What sampler `sampler` (None: the model's default) runs on this model; SamplerError (a
        DomainError, code sampler_not_offered) when the model does not offer it."""
        return _samplers.plan(self.model, sampler, self.samplers["default"])

    def solver(self, kind: str, fallback: SolverConfig, max_steps: int = 10_000) -> SolverConfig:
        """The model's measured default solver for `kind` ('sample' | 'log_likelihood'): the one its manifest
        records (`flownp.default_model.choose_solvers`: the cheapest within the stated error of dopri5), else
        `fallback` (the caller's global default), which also replaces a record that is not fixed-step or
        exceeds `max_steps`."""
        spec = (self.info.get("solvers") or {}).get(kind)
        if not spec:
            return fallback
        try:
            chosen = parse_solver(spec)
        except ValueError:
            return fallback
        # only a fixed-step record is a default (its cost is known before the solve); else the fallback
        return chosen if chosen.method in FIXED and chosen.steps <= max_steps else fallback

    def min_context(self, floor: Any = 1) -> int:
        """Fewest context points a request may send: `floor` (a number, or settings with a `min_context`),
        raised to the smallest context the model was trained on in any stage
        (`flownp.checkpoint.lineage_n_ctx_min`): below it the model extrapolates outside its training
        distribution."""
        return max(int(getattr(floor, "min_context", floor)), self.trained_min_context or 0)

    def check_context_size(self, n_ctx: int, floor: Any = 1) -> None:
        """DomainError (too_few) when the context is smaller than `min_context(floor)`."""
        need = self.min_context(floor)
        if n_ctx < need:
            raise DomainError("too_few", f"context has {n_ctx} point(s); model {self.version} needs at least "
                              f"{need} (the fewest it was trained on)")


def build_model(version: str, ck: dict[str, Any], digest: str | None, source: str,
                extra: dict[str, Any] | None = None) -> LoadedModel:
    """A LoadedModel (frozen weights, eval mode) from a checkpoint dict and what is known of it. A recorded
    sampler comparison (`samplers`: {"default", "measured"}) comes from `extra` (a manifest's), else from the
    checkpoint."""
    extra = dict(extra or {})
    recorded_samplers = extra.pop("samplers", None) or ck.get("samplers")
    model = model_from_checkpoint(ck)
    for p in model.parameters():
        p.requires_grad_(False)
    space = ModelSpace.from_dict(ck)
    region, normalizer = space.region, space.normalizer
    cfg = ck["model_config"]
    independent = cfg.get("targets") == "independent"
    trained_min = lineage_n_ctx_min(ck)  # a fine-tune's base may have been trained on smaller contexts
    info = {
        "version": version, "source": source, "sha256": digest, "kind": ck.get("kind"), "step": ck.get("step"),
        "synthetic": bool(extra.pop("synthetic", False)), "model_config": cfg,
        "gav": ck.get("gav_config") is not None,
        "n_parameters": int(count_parameters(model)),
        "model_kind": _samplers.kind(model), "exact_density": _samplers.scoring(model)["exact_density"],
        "samplers": _samplers.manifest(model, recorded_samplers),
        "log_likelihood": {"auto": "exact-blocks" if independent else "hutchinson",
                           "exact": "exact-blocks" if independent else "exact-full (small target sets)",
                           "units": LL_UNITS},
        "variables": {n: {"units": BY_NAME[n].era5_units, "long_name": BY_NAME[n].long_name} for n in NAMES},
        "normalizer": normalizer.to_dict(),
        "region": {"name": region.name, "centre_latitude": region.centre_lat, "centre_longitude": region.centre_lon,
                   "radius_degrees": region.radius_degrees,
                   "circle_points": region.n_points, "bounds": region.bounds},
        "trained_min_context": trained_min,
        "store_manifest_sha256": ck.get("store_manifest_sha256"), "versions": ck.get("versions"), **extra,
    }
    return LoadedModel(version, model, space, info, trained_min)


def default_checkpoint() -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(checkpoint, sha256, manifest) of the embedded default model, verified against its manifest."""
    ckpt, _ = _default.default_paths()
    man = _default.read_manifest()
    ck, digest = load_verified(ckpt, man["sha256"], "embedded default model")
    return ck, digest, man


def default_model() -> LoadedModel:
    """The embedded default model (trained on SYNTHETIC weather, not ERA5; its real-map figures in the
    manifest's `real_map`), verified."""
    ck, digest, man = default_checkpoint()
    extra = {k: man.get(k) for k in ("description", "recipe", "trained_on", "real_map", "solvers", "samplers")}
    return build_model(man["version"], ck, digest, "embedded", {**extra, "synthetic": True})


# ---- the work ------------------------------------------------------------------------------------
@dataclass
class Task:
    """One request's model inputs: context (1, n_ctx, 2|4) and targets (1, n_tgt, 2), normalised."""

    xc: torch.Tensor
    yc: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor | None = None


def task(space: ModelSpace, ctx_lat: Sequence[float], ctx_lon: Sequence[float], ctx_era5: np.ndarray,
         tgt_lat: Sequence[float], tgt_lon: Sequence[float], tgt_era5: np.ndarray | None = None) -> Task:
    """A Task from degrees and (n, 4) values in ERA5 units (no checks here: `ModelSpace.check_*`)."""
    t = lambda a: torch.from_numpy(a)[None]  # noqa: E731
    return Task(t(space.xy(ctx_lat, ctx_lon)), t(space.to_normalised(ctx_era5)), t(space.xy(tgt_lat, tgt_lon)),
                None if tgt_era5 is None else t(space.to_normalised(tgt_era5)))


def resolve_estimator(independent: bool, estimator: str, n_tgt: int, max_exact_full: int | None = None) -> str:
    """'auto' | 'exact' | 'hutchinson' -> what flownp.core.likelihood will use (its `resolve_estimator`),
    refusing an exact-full trace over more than `max_exact_full` targets (DomainError too_many)."""
    resolved = resolve_core_estimator(independent, estimator)
    if resolved == "exact-full" and estimator in ("auto", "exact") and max_exact_full is not None \
            and n_tgt > max_exact_full:
        raise DomainError("too_many", f"the exact trace of this joint-target model costs one backward pass "
                          f"per target value; at most {max_exact_full} targets (got {n_tgt}); "
                          "use estimator 'hutchinson' or 'auto'")
    return resolved


class _Watched(CheckedFlow):
    """The model as flownp.core.sampling / flownp.core.likelihood see it, calling `check()` at every
    velocity evaluation (so a job can be stopped within one solver step), and reaching a GAV model's base
    and an LFM's or distilled model's own solves with the same check."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._flow, name)
        if name == "base" and hasattr(attr, "velocity"):  # a GAV model's likelihood calls its base directly
            return _Watched(attr, self._check)
        if name in ("flow_samples", "flow_log_likelihood"):  # an LFM's blocks, a distilled model's maps/teacher
            return partial(attr, check=self._check)
        return attr


def _watched(model: Any, check: Callable[[], None] | None) -> Any:
    return model if check is None else _Watched(model, check)


def one_solve(plan: "_samplers.Plan", solver: SolverConfig, ll_solver: SolverConfig) -> bool:
    """Whether a request's samples and their log-likelihoods come from one solve (forwards from the noise,
    `flownp.core.likelihood.sample_log_likelihood`): the same fixed-step solver for both, and one flow that
    both draws and scores (not an LFM, a distilled sampler or a GAV model)."""
    return (solver == ll_solver and solver.method in FIXED and not solver.adjoint and plan.runner is plan.scorer
            and plan.uses_solver and _is_one_flow(plan.runner))


def extrapolate(lm: LoadedModel, task: Task, *, num_samples: int, solver: SolverConfig, seed: int,
                with_ll: bool, ll_solver: SolverConfig, estimator: str, n_probes: int = 1,
                check: Callable[[], None] | None = None, sampler: str | None = None) -> dict[str, Any]:
    """Samples (S, n_tgt, 4) in ERA5 units drawn by `sampler` (None: the model's default; `solver` per flow,
    unused by distilled maps) and, if asked, each sample's joint log-likelihood [nats, over ERA5 units:
    `units`] with its estimator (also over normalised values) and whether it is the samples' exact density.
    `sampler` in the result: `flownp.samplers.Plan.describe`, with the evaluations made."""
    plan = lm.plan(sampler)
    gen = torch.Generator().manual_seed(seed)
    # a model's per-task transform (its GP base) is fitted once and serves the samples and their scores
    tr = _task_transform(plan.runner, task.xc, task.yc, task.xt)
    runner = _watched(plan.runner, check)
    ll = None
    scored_in_solve = with_ll and one_solve(plan, solver, ll_solver)
    if scored_in_solve:  # the samples and their scores from the same solve
        smp, ll = _sample_log_likelihood(runner, task.xc, task.yc, task.xt,
                                         _draw_noise(plan.runner, task.xt, num_samples, gen), solver=solver,
                                         estimator=estimator, n_probes=n_probes, seed=seed, transform=tr)
        smp, nfe = smp[0], ll.nfe
    else:
        res = _sample(runner, task.xc, task.yc, task.xt, n_samples=num_samples, solver=solver, generator=gen,
                      transform=tr)
        smp, nfe = res.samples[0], res.nfe  # (S, n, 4) normalised
    out: dict[str, Any] = {"samples": lm.space.to_era5(smp.numpy()), "nfe": nfe,
                           "sampler": {**plan.describe(solver), "nfe": nfe}}
    if with_ll:
        s, n = num_samples, task.xt.shape[1]
        if ll is None:
            ll = _samples_log_likelihood(_watched(plan.scorer, check), task.xc, task.yc, task.xt, smp[None],
                                         solver=ll_solver, estimator=estimator, n_probes=n_probes, seed=seed,
                                         transform=tr)
        joint_n = ll.joint.numpy().astype(np.float64)
        out["ll"] = {"joint": lm.space.log_density(joint_n, n, "era5"), "joint_normalised": joint_n,
                     "units": LL_UNITS, "kind": LL_KIND,
                     "spread": None if ll.spread is None else ll.spread.numpy().astype(np.float64),
                     "estimator": ll.estimator, "n_probes": ll.n_probes, "nfe": ll.nfe, "solver": ll.solver,
                     "exact_density": plan.exact_density, "scored_by": plan.scored_by, "density": ll.density,
                     "in_sampling_solve": scored_in_solve}
    return out


def log_likelihood(lm: LoadedModel, task: Task, *, solver: SolverConfig, estimator: str, n_probes: int = 1,
                   seed: int = 0, check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Joint log p(yt | xt, context) [nats] over ERA5 units (`units`) and over normalised values; a
    distilled model is scored by its teacher (`scored_by`, `exact_density` False: it has no density)."""
    assert task.yt is not None, "a log-likelihood task needs target values"
    m = _watched(lm.model, check)
    ll = _log_likelihood(m, task.xc, task.yc, task.xt, task.yt, solver=solver, estimator=estimator,
                         n_probes=n_probes, seed=seed)
    n = task.xt.shape[1]
    joint_n = float(ll.joint[0])
    return {"joint": float(lm.space.log_density(joint_n, n, "era5")), "joint_normalised": joint_n,
            "units": LL_UNITS, "kind": LL_KIND,
            "spread": None if ll.spread is None else float(ll.spread[0]), "estimator": ll.estimator,
            "n_probes": ll.n_probes, "nfe": ll.nfe, "n_targets": n, "solver": ll.solver, "density": ll.density,
            **_samplers.scoring(lm.model)}
