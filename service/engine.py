"""The engine: verified model loading, and model work run off the event loop with limits.

Concurrency: a thread pool of `workers` threads (torch releases the GIL inside its kernels, and uses its
own intra-op threads within each job) behind an admission counter: at most workers + max_queue jobs are
admitted, the rest get 503 with Retry-After. Each job has a deadline (queue wait included): the model is
wrapped so that every velocity evaluation checks it, so a late job stops within one solver step and the
caller gets 504. Results are reproducible: the request's seed drives a torch.Generator for the noise and
the Hutchinson probes.

Why a pool and not a batching queue (bench/load_service.py, 2 shared CPU cores, 1000 context / 245 targets,
8 samples, 16 steps): one request is already a batch of 8 target sets whose GEMMs keep both cores busy, so
throughput is flat in concurrency (1.73 / 1.71 / 1.67 req/s at 1 / 4 / 16 with workers=1 on a quiet
machine, docs/results.md section 2c): merging requests would add queueing delay for no gain on CPU. The
web layer costs ~1.6% (served / engine latency 1.016). A batching queue becomes worth it on a GPU, where
one request leaves it idle. Keep workers x torch threads <= cores: oversubscribed OpenMP threads slowed
single tests here by up to 50x (4 s -> 219 s) while two trainings shared the 2 cores.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch

from flownp.checkpoint import load_checkpoint, model_from_checkpoint
from flownp.jobs.finetune import lineage_n_ctx_min
from flownp.core.likelihood import log_likelihood
from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig
from ingest.normalize import Normalizer
from ingest.region import Region
from ingest.variables import BY_NAME, NAMES
from service import convert, default_model
from service.errors import ApiError
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("flownp.service")


class LoadError(RuntimeError):
    """A configured model could not be loaded (missing file, sha256 mismatch, foreign file)."""


class DeadlineExceeded(Exception):
    pass


# ---- models ---------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A served model: the network, the normaliser and region it was trained with, and its manifest."""

    version: str
    model: Any
    normalizer: Normalizer
    region: Region
    info: dict[str, Any]
    trained_min_context: int | None = None  # the smallest n_ctx over its training lineage, if the checkpoint says
    log_jac: float = field(init=False)

    def __post_init__(self) -> None:
        self.log_jac = convert.log_jacobian(self.normalizer)

    @property
    def independent(self) -> bool:
        return getattr(self.model.config, "targets", "joint") == "independent"

    def min_context(self, settings: Settings) -> int:
        """Fewest context points a request may send: the setting, raised to the smallest context the
        model was trained on in any stage (pretraining, fine-tuning; `flownp.jobs.finetune.lineage_n_ctx_min`):
        below it the model extrapolates outside its training distribution."""
        return max(settings.min_context, self.trained_min_context or 0)


def check_context_size(lm: LoadedModel, n_ctx: int, settings: Settings) -> None:
    """422 too_few when the context is smaller than this model's minimum (`LoadedModel.min_context`)."""
    need = lm.min_context(settings)
    if n_ctx < need:
        raise ApiError(422, "too_few", f"context has {n_ctx} point(s); model {lm.version} needs at least {need} "
                       "(the fewest it was trained on)")


def _verified_checkpoint(path: Path, sha256: str, what: str) -> tuple[dict[str, Any], str]:
    """Read the file once, check its sha256, then torch.load (weights_only=True) those same bytes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoadError(f"{what}: cannot read the checkpoint ({exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.strip().lower():
        raise LoadError(f"{what}: sha256 mismatch (file {digest[:12]}..., manifest {sha256[:12]}...)")
    try:
        return load_checkpoint(io.BytesIO(data)), digest
    except Exception as exc:  # foreign or corrupt file
        raise LoadError(f"{what}: not a loadable checkpoint ({type(exc).__name__})") from None


def default_checkpoint() -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(checkpoint, sha256, manifest) of the embedded default model, verified against its manifest
    (the service's fallback, and flownp.api.Extrapolator.from_default)."""
    ckpt, _ = default_model.default_paths()
    man = default_model.read_manifest()
    ck, digest = _verified_checkpoint(ckpt, man["sha256"], "embedded default model")
    return ck, digest, man


def _build(version: str, ck: dict[str, Any], digest: str, source: str, extra: dict[str, Any]) -> LoadedModel:
    model = model_from_checkpoint(ck)
    for p in model.parameters():
        p.requires_grad_(False)
    region = Region.from_dict(ck["region"])
    normalizer = Normalizer.from_dict(ck["normalizer"])
    cfg = ck["model_config"]
    independent = cfg.get("targets") == "independent"
    trained_min = lineage_n_ctx_min(ck)  # a fine-tune's base may have been trained on smaller contexts
    info = {
        "version": version, "source": source, "sha256": digest, "kind": ck.get("kind"), "step": ck.get("step"),
        "synthetic": bool(extra.pop("synthetic", False)), "model_config": cfg,
        "gav": ck.get("gav_config") is not None,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "log_likelihood": {"auto": "exact-blocks" if independent else "hutchinson",
                           "exact": "exact-blocks" if independent else "exact-full (small target sets)"},
        "variables": {n: {"units": BY_NAME[n].era5_units, "long_name": BY_NAME[n].long_name} for n in NAMES},
        "normalizer": normalizer.to_dict(),
        "region": {"name": region.name, "centre_latitude": region.centre_lat, "centre_longitude": region.centre_lon,
                   "radius_degrees": region.radius_degrees,
                   "circle_points": region.n_points, "bounds": region.bounds},
        "trained_min_context": trained_min,
        "store_manifest_sha256": ck.get("store_manifest_sha256"), "versions": ck.get("versions"), **extra,
    }
    return LoadedModel(version, model, normalizer, region, info, trained_min)


# what a new, empty volume may hold before the first `flownp retrain` writes to it
_EMPTY_VOLUME_ENTRIES = {"lost+found"}


def open_registry(settings: Settings) -> Any:
    """The configured registry (flownp.registry.Registry), or LoadError when FLOWNP_REGISTRY does not name
    one: a path that does not exist, is not a directory, or is a directory holding other things but neither
    `versions/` nor `CURRENT` (a mistyped path must not be served as "nothing promoted yet"). An existing
    directory that is empty (hidden files such as the registry's `.lock`, and `lost+found`, aside) is a new
    registry with nothing promoted yet. Messages name no machine paths (they reach API responses)."""
    from flownp.registry import Registry

    root = Path(settings.registry)  # type: ignore[arg-type]
    if not root.exists():
        raise LoadError("registry (FLOWNP_REGISTRY): the path does not exist; create the registry directory "
                        "(an empty one is a registry with nothing promoted yet) or fix the setting")
    if not root.is_dir():
        raise LoadError("registry (FLOWNP_REGISTRY): the path is not a directory")
    reg = Registry(root)
    if not (reg.versions_dir.is_dir() or (root / "CURRENT").is_file()):
        try:
            other = sorted(p.name for p in root.iterdir()
                           if not p.name.startswith(".") and p.name not in _EMPTY_VOLUME_ENTRIES)
        except OSError as exc:
            raise LoadError(f"registry (FLOWNP_REGISTRY): cannot list the directory ({exc.strerror})") from None
        if other:
            raise LoadError(f"registry (FLOWNP_REGISTRY): not a model registry (no versions/ or CURRENT, but "
                            f"{len(other)} other entr{'y' if len(other) == 1 else 'ies'}, e.g. {other[0]!r})")
    return reg


def registry_state(settings: Settings, reg: Any = None) -> tuple[str | None, list[str], tuple[Any, ...]]:
    """(current version, versions, marker) of the configured registry (LoadError when there is none, see
    `open_registry`). The marker is what a registry watch compares: CURRENT, plus the version list when
    every version is served. `reg`: the registry already opened (`open_registry`)."""
    reg = reg if reg is not None else open_registry(settings)
    current = reg.current()
    versions = reg.versions()
    return current, versions, ((current, tuple(versions)) if settings.registry_all else (current,))


def load_models(settings: Settings) -> dict[str, LoadedModel]:
    """The configured models (registry and/or checkpoint), else the embedded default. Only configured
    paths are read; every file's sha256 is checked against its manifest before torch.load."""
    return _load_models(settings)[0]


def _load_models(settings: Settings) -> tuple[dict[str, LoadedModel], tuple[Any, ...] | None]:
    """load_models, and the registry marker (registry_state) the models were read under (None: no registry).
    An existing registry with nothing promoted yet is not an error: the checkpoint, else the embedded
    default, is served until a version is promoted (then a reload, by hand or by the registry watch, picks
    it up). A registry path that is missing or is not a registry is a LoadError (`open_registry`)."""
    out: dict[str, LoadedModel] = {}
    marker = None
    if settings.registry is not None:
        reg = open_registry(settings)
        current, versions, marker = registry_state(settings, reg)
        names = versions if settings.registry_all else [v for v in [current] if v is not None]
        if not names:
            log.warning("registry: no promoted version yet; serving the %s until one is promoted",
                        "configured checkpoint" if settings.checkpoint is not None else "embedded default model")
        for v in names:
            man = reg.manifest(v)
            ck, digest = _verified_checkpoint(reg.versions_dir / v / "model.pt", man["files"]["model.pt"],
                                              f"registry version {v}")
            out[v] = _build(v, ck, digest, "registry", {"current": v == current, "metrics": man.get("metrics"),
                                                         "created": man.get("created")})
    if settings.checkpoint is not None:
        path = settings.checkpoint
        sha = settings.checkpoint_sha256
        side = path.with_name(path.name + ".sha256")
        if sha is None and side.exists():
            sha = side.read_text().split()[0] if side.read_text().split() else None
        if not sha:
            raise LoadError("checkpoint: no recorded sha256; set FLOWNP_CHECKPOINT_SHA256 or write "
                            "<checkpoint>.sha256 (sha256sum output)")
        version = settings.checkpoint_version or path.stem
        ck, digest = _verified_checkpoint(path, sha, f"checkpoint {version}")
        out[version] = _build(version, ck, digest, "checkpoint", {})
    if not out:
        ck, digest, man = default_checkpoint()
        extra = {k: man.get(k) for k in ("description", "recipe", "trained_on")}
        out[man["version"]] = _build(man["version"], ck, digest, "embedded", {**extra, "synthetic": True})
    return out, marker


# ---- deadline-aware model view ----------------------------------------------------------------------
class _Watched:
    """The model as flownp.core.sampling / flownp.core.likelihood see it, checking the deadline at every velocity
    evaluation (so a late job stops within one solver step)."""

    def __init__(self, model: Any, deadline: float) -> None:
        self._m, self._deadline = model, deadline

    def _check(self) -> None:
        if time.monotonic() > self._deadline:
            raise DeadlineExceeded

    @property
    def config(self) -> Any:
        return self._m.config

    def encode_context(self, *a: Any, **kw: Any) -> Any:
        self._check()
        return self._m.encode_context(*a, **kw)

    def velocity(self, *a: Any, **kw: Any) -> Any:
        self._check()
        return self._m.velocity(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._m, name)
        if name == "base" and hasattr(attr, "velocity"):  # a GAV model's likelihood calls its base directly
            return _Watched(attr, self._deadline)
        return attr


# ---- the work ------------------------------------------------------------------------------------
@dataclass
class Task:
    """One request's model inputs: context (1, n_ctx, 2|4) and targets (1, n_tgt, 2), normalised."""

    xc: torch.Tensor
    yc: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor | None = None


def resolve_estimator(lm: LoadedModel, estimator: str, n_tgt: int, settings: Settings) -> str:
    """'auto' | 'exact' | 'hutchinson' -> what flownp.core.likelihood will use; exact-full is size-capped."""
    if estimator == "hutchinson" or (estimator == "auto" and not lm.independent):
        return "hutchinson"
    if lm.independent:
        return "exact-blocks"
    if n_tgt > settings.max_exact_full_targets:
        raise ApiError(422, "too_many", f"the exact trace of this joint-target model costs one backward pass "
                       f"per target value; at most {settings.max_exact_full_targets} targets (got {n_tgt}); "
                       "use estimator 'hutchinson' or 'auto'")
    return "exact-full"


def run_extrapolate(lm: LoadedModel, task: Task, *, num_samples: int, solver: SolverConfig, seed: int,
                    with_ll: bool, ll_solver: SolverConfig, estimator: str, n_probes: int,
                    deadline: float) -> dict[str, Any]:
    """Samples (S, n_tgt, 4) in ERA5 units and, if asked, each sample's joint log-likelihood [nats, ERA5
    units] with its estimator. Runs in a worker thread."""
    m = _Watched(lm.model, deadline)
    gen = torch.Generator().manual_seed(seed)
    res = sample(m, task.xc, task.yc, task.xt, n_samples=num_samples, solver=solver, generator=gen)
    smp = res.samples[0]  # (S, n, 4) normalised
    out: dict[str, Any] = {"samples": convert.normalised_to_era5(smp.numpy(), lm.normalizer), "nfe": res.nfe}
    if with_ll:
        s, n = num_samples, task.xt.shape[1]
        ll = log_likelihood(m, task.xc.expand(s, -1, -1), task.yc.expand(s, -1, -1), task.xt.expand(s, -1, -1),
                            smp, solver=ll_solver, estimator=estimator, n_probes=n_probes, seed=seed)
        out["ll"] = {"joint": (ll.joint.numpy().astype(np.float64) + n * lm.log_jac),
                     "joint_normalised": ll.joint.numpy().astype(np.float64),
                     "spread": None if ll.spread is None else ll.spread.numpy().astype(np.float64),
                     "estimator": ll.estimator, "n_probes": ll.n_probes, "nfe": ll.nfe}
    return out


def run_log_likelihood(lm: LoadedModel, task: Task, *, solver: SolverConfig, estimator: str, n_probes: int,
                       seed: int, deadline: float) -> dict[str, Any]:
    """Joint log p(yt | xt, context) [nats] in ERA5 units and normalised units. Runs in a worker thread."""
    m = _Watched(lm.model, deadline)
    ll = log_likelihood(m, task.xc, task.yc, task.xt, task.yt, solver=solver, estimator=estimator,
                        n_probes=n_probes, seed=seed)
    n = task.xt.shape[1]
    return {"joint": float(ll.joint[0]) + n * lm.log_jac, "joint_normalised": float(ll.joint[0]),
            "spread": None if ll.spread is None else float(ll.spread[0]), "estimator": ll.estimator,
            "n_probes": ll.n_probes, "nfe": ll.nfe, "n_targets": n}


# ---- the engine ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """What the engine serves, replaced as one object (never mutated): a request reads `engine.served`
    once and uses that snapshot, so it can never pair new models with an old default."""

    models: Mapping[str, LoadedModel]
    default: str | None
    registry_marker: tuple[Any, ...] | None = None  # registry_state()'s marker when these were loaded

    def get(self, version: str | None) -> LoadedModel:
        v = version or self.default
        if v not in self.models:
            raise ApiError(404, "model_not_found", f"unknown model version {version!r}; GET /v1/models lists "
                           f"the loaded ones: {sorted(self.models)}")
        return self.models[v]


_NOTHING = Served(MappingProxyType({}), None, ("<not loaded>",))


class Engine:
    """Loaded models plus the worker pool. `load()` (blocking) loads and warms up; `submit()` runs a job."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.served: Served = _NOTHING
        self.ready = False
        self.load_error: str | None = None
        self._jobs = 0
        # retry tickets of refused requests, oldest first (ticket -> expiry): a freed slot goes to the oldest
        # ticket holder, not to whichever request arrives first, so retried clients are served in order
        self._tickets: OrderedDict[str, float] = OrderedDict()
        self._reload_lock = threading.Lock()  # one (re)load at a time: the admin route and the registry watch
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="flownp-engine")

    @property
    def models(self) -> Mapping[str, LoadedModel]:
        return self.served.models

    @property
    def default(self) -> str | None:
        return self.served.default

    # loading
    def _load_all(self) -> Served:
        """Load (and warm up) the configured models without touching the ones being served."""
        models, marker = _load_models(self.settings)
        default = self.settings.default_version or next(
            (v for v, m in models.items() if m.info.get("current")), next(iter(models)))
        if default not in models:
            raise LoadError(f"default version {default!r} is not among the loaded models {sorted(models)}")
        for v, m in models.items():
            m.info["default"] = v == default
        if self.settings.warmup:
            for lm in models.values():
                self.warm_up(lm)
        return Served(MappingProxyType(dict(models)), default, marker)

    def load(self) -> None:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        try:
            with self._reload_lock:
                self.served = self._load_all()
            self.ready = True
            log.info("models ready: %s (default %s)", sorted(self.served.models), self.served.default)
        except Exception as exc:
            self.load_error = str(exc) if isinstance(exc, LoadError) else f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.load_error)

    def reload(self) -> dict[str, Any]:
        """Re-read the configured sources (e.g. a registry after a promotion) and swap the served models in
        one assignment; requests already running keep the models they started with. On any failure the
        served models stay as they were and the error is raised (LoadError)."""
        with self._reload_lock:
            before = self.served.default
            try:
                served = self._load_all()
            except Exception as exc:
                if isinstance(exc, LoadError):
                    raise
                raise LoadError(f"{type(exc).__name__}: {exc}") from None
            self.served = served
            self.ready, self.load_error = True, None
        log.info("models reloaded: %s (default %s, was %s)", sorted(served.models), served.default, before)
        return {"default": served.default, "previous_default": before, "models": sorted(served.models)}

    def registry_changed(self) -> bool:
        """Whether the registry's CURRENT (or, serving every version, its version list) differs from what
        the served models were loaded under. Blocking (reads the registry); errors propagate."""
        if self.settings.registry is None:
            return False
        return registry_state(self.settings)[2] != self.served.registry_marker

    def warm_up(self, lm: LoadedModel) -> None:
        """One small job through the same code path (first calls allocate and pick kernels)."""
        r = lm.region
        vals = convert.normalised_to_era5(np.zeros((64, 4)), lm.normalizer)
        task = Task(torch.from_numpy(convert.xy(r, r.circle_lat[:64], r.circle_lon[:64]))[None],
                    torch.from_numpy(convert.era5_to_normalised(vals, lm.normalizer))[None],
                    torch.from_numpy(convert.xy(r, r.circle_lat[-16:], r.circle_lon[-16:]))[None])
        run_extrapolate(lm, task, num_samples=2, solver=SolverConfig("euler", 2), seed=0, with_ll=True,
                        ll_solver=SolverConfig("midpoint", 1), estimator="hutchinson", n_probes=1,
                        deadline=time.monotonic() + 600)

    def get(self, version: str | None) -> LoadedModel:
        return self.served.get(version)

    # running
    TICKET_TTL_S = 15.0  # a refused client that does not come back within this loses its place

    def admit(self, ticket: str | None) -> None:
        """Admission (event-loop thread only): at most workers + max_queue jobs, and the capacity that frees
        up goes to holders of retry tickets in the order the tickets were issued. A refused request gets
        503 with Retry-After and `X-Retry-Ticket` (its old ticket, keeping its place, or a new one); sending
        that header back on the retry claims the place."""
        s, now = self.settings, time.monotonic()
        for t, expiry in list(self._tickets.items()):
            if expiry < now:
                del self._tickets[t]
        ahead = list(self._tickets).index(ticket) if ticket in self._tickets else len(self._tickets)
        if self._jobs + ahead < s.workers + s.max_queue:
            self._tickets.pop(ticket, None)
            return
        if ticket not in self._tickets:
            ticket = uuid.uuid4().hex
        self._tickets[ticket] = now + self.TICKET_TTL_S
        self.metrics.rejected.labels("overloaded").inc()
        raise ApiError(503, "overloaded", f"all {s.workers} worker(s) busy and {s.max_queue} request(s) "
                       "queued; retry after Retry-After seconds with the X-Retry-Ticket header to keep your place",
                       headers={"Retry-After": "1", "X-Retry-Ticket": ticket})

    async def submit(self, op: str, fn: Callable[[float], Any], timeout_s: float | None,
                     ticket: str | None = None) -> tuple[Any, dict[str, float]]:
        """Run fn(deadline) in a worker. Returns (result, timing {queue_s, engine_s}). 503 when full (see
        `admit`) or not ready, 504 past the deadline."""
        if not self.ready:
            raise ApiError(503, "not_ready", "the model is loading or warming up; retry shortly",
                           headers={"Retry-After": "5"})
        s = self.settings
        self.admit(ticket)
        timeout = min(timeout_s or s.request_timeout_s, s.request_timeout_s)
        deadline = time.monotonic() + timeout
        t_submit = time.perf_counter()

        def call() -> tuple[Any, dict[str, float]]:
            t0 = time.perf_counter()
            if time.monotonic() > deadline:
                raise DeadlineExceeded
            r = fn(deadline)
            t1 = time.perf_counter()
            self.metrics.engine_seconds.labels(op).observe(t1 - t0)
            return r, {"queue_s": t0 - t_submit, "engine_s": t1 - t0}

        loop = asyncio.get_running_loop()
        self._jobs += 1
        self.metrics.engine_jobs.inc()
        fut = loop.run_in_executor(self._pool, call)

        def done(_: Any) -> None:
            self._jobs -= 1
            self.metrics.engine_jobs.dec()

        fut.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout + 0.5)
        except (DeadlineExceeded, asyncio.TimeoutError):
            self.metrics.rejected.labels("deadline").inc()
            raise ApiError(504, "deadline_exceeded", f"the request took longer than its deadline of {timeout:g} s; "
                           "ask for fewer points, samples or steps, or a longer timeout_s") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def watch_registry(engine: Engine, interval_s: float, after: "asyncio.Future[Any] | None" = None) -> None:
    """The registry watch (FLOWNP_REGISTRY_POLL_S): every `interval_s` seconds read the registry's CURRENT and,
    when it differs from what is served, reload through `Engine.reload` (the path of POST /v1/admin/reload).
    A failed registry read or reload keeps the served models, is logged (as what failed), and is retried
    with backoff (doubling, at most max(interval, 10 min)). Starts after `after` (the first load). Runs
    until cancelled (CancelledError, a BaseException, passes through the handlers below)."""
    if after is not None:
        await asyncio.wait([after])
    failures = 0

    def why(exc: Exception) -> str:
        return str(exc) if isinstance(exc, LoadError) else f"{type(exc).__name__}: {exc}"

    while True:
        await asyncio.sleep(min(interval_s * 2 ** min(failures, 16), max(interval_s, 600.0)))
        try:
            changed = await asyncio.to_thread(engine.registry_changed)
        except Exception as exc:  # the registry could not be read (unmounted, dangling CURRENT, I/O error)
            failures += 1
            log.error("registry watch: registry read failed (%d in a row), still serving %s: %s", failures,
                      engine.served.default, why(exc))
            continue
        if not changed:
            failures = 0
            continue
        try:
            out = await asyncio.to_thread(engine.reload)
        except Exception as exc:  # keep serving what we have
            failures += 1
            log.error("registry watch: reload failed (%d in a row), still serving %s: %s", failures,
                      engine.served.default, why(exc))
            continue
        failures = 0
        log.info("registry watch: the registry changed; serving %s (was %s)", out["default"],
                 out["previous_default"])
