"""The engine: the configured models (registry through `flownp.registry.Registry`, a checkpoint, else the
embedded default; each loaded by `flownp.checkpoint.load_verified` and built by `flownp.inference`), and
model work (`flownp.inference.extrapolate` / `log_likelihood`) run off the event loop with limits.

Concurrency: a thread pool of `workers` threads (torch releases the GIL inside its kernels, and uses its
own intra-op threads within each job) behind an admission counter: at most workers + max_queue jobs are
admitted, and at most max_queued_cost of work (service.admission: a free worker always takes a request,
retry tickets keep a refused client's place for a few seconds); one request costs at most
max_request_cost (422 too_costly). Each job has a deadline (queue wait included) and can be cancelled
(a `Job`: the model is wrapped so that every context encoding and velocity evaluation checks it, in every
block of an LFM and map of a distilled sampler too), so a late job, or the job of a client that
disconnected, stops within one solver step; the caller gets 504 (499 when it went). Every model kind is
served: a global FlowNP (sampler "ode"), an LFM ("lfm"), a distilled sampler ("distilled" and its
teacher's), each request running the model's default sampler or the one it names (service.sampling).
Results are reproducible: the request's seed drives a torch.Generator for the noise and
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
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Awaitable, Callable, Mapping

import numpy as np
import torch

from flownp.checkpoint import LoadError, load_verified
from flownp.core.solvers import SolverConfig
from flownp.inference import (LoadedModel, Task, build_model, default_model, extrapolate, log_likelihood,
                              resolve_estimator as _resolve_estimator)
from flownp.inference import task as make_task
from ingest.space import DomainError
from service.admission import Admission, Overloaded
from service.errors import ApiError, clip
from service.metrics import Metrics
from service.settings import Settings

__all__ = ["Cancelled", "DeadlineExceeded", "Engine", "Job", "LoadError", "LoadedModel", "Served", "Task", "check_context_size",
           "load_models", "open_registry", "registry_state", "resolve_estimator", "run_extrapolate",
           "run_log_likelihood", "watch_registry"]

log = logging.getLogger("flownp.service")


class DeadlineExceeded(Exception):
    """A job ran past its deadline (the caller gets 504)."""


class Cancelled(Exception):
    """A job was cancelled: its client disconnected, or its caller stopped waiting (`Job.cancel`)."""


# ---- models ---------------------------------------------------------------------------------------
def domain_error(exc: DomainError) -> ApiError:
    """A ModelSpace / inference domain error as the API's 422 with the same code."""
    return ApiError(422, exc.code, exc.message)


def check_context_size(lm: LoadedModel, n_ctx: int, settings: Settings) -> None:
    """422 too_few when the context is smaller than this model's minimum (`LoadedModel.min_context`,
    raised to the setting FLOWNP_MIN_CONTEXT)."""
    try:
        lm.check_context_size(n_ctx, settings.min_context)
    except DomainError as exc:
        raise domain_error(exc) from None


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
    if not reg.exists():
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
            ck, digest = load_verified(reg.model_path(v, verify=False), reg.model_sha256(v),
                                       f"registry version {v}")
            out[v] = build_model(v, ck, digest, "registry", {"current": v == current, "metrics": man.get("metrics"),
                                                         "created": man.get("created"),
                                                         "samplers": man.get("samplers")})
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
        ck, digest = load_verified(path, sha, f"checkpoint {version}")
        out[version] = build_model(version, ck, digest, "checkpoint", {})
    if not out:
        lm = default_model()
        out[lm.version] = lm
    return out, marker


# ---- the work (flownp.inference, with the job checked at every velocity evaluation) ----------------
class Job:
    """One job's deadline and cancellation, as the `check` flownp.inference calls at every velocity
    evaluation (so a job stops within one solver step): DeadlineExceeded past `deadline`
    (time.monotonic seconds), Cancelled once `cancel()` was called (from any thread)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __call__(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded


def resolve_estimator(lm: LoadedModel, estimator: str, n_tgt: int, settings: Settings) -> str:
    """'auto' | 'exact' | 'hutchinson' -> what flownp.core.likelihood will use; exact-full is size-capped
    (422 too_many beyond FLOWNP_MAX_EXACT_FULL_TARGETS)."""
    try:
        return _resolve_estimator(lm.independent, estimator, n_tgt, settings.max_exact_full_targets)
    except DomainError as exc:
        raise domain_error(exc) from None


def run_extrapolate(lm: LoadedModel, task: Task, *, num_samples: int, solver: SolverConfig, seed: int,
                    with_ll: bool, ll_solver: SolverConfig, estimator: str, n_probes: int,
                    check: Callable[[], None], sampler: str | None = None) -> dict[str, Any]:
    """`flownp.inference.extrapolate` with `sampler` (None: the model's default), stopped by `check` (a
    `Job`). Runs in a worker thread."""
    return extrapolate(lm, task, num_samples=num_samples, solver=solver, seed=seed, with_ll=with_ll,
                       ll_solver=ll_solver, estimator=estimator, n_probes=n_probes, check=check, sampler=sampler)


def run_log_likelihood(lm: LoadedModel, task: Task, *, solver: SolverConfig, estimator: str, n_probes: int,
                       seed: int, check: Callable[[], None]) -> dict[str, Any]:
    """`flownp.inference.log_likelihood`, stopped by `check` (a `Job`). Runs in a worker thread."""
    return log_likelihood(lm, task, solver=solver, estimator=estimator, n_probes=n_probes, seed=seed, check=check)


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
            shown = version if version is None else clip(version)
            raise ApiError(404, "model_not_found", f"unknown model version {shown!r}; GET /v1/models lists "
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
        # jobs and cost in flight, and the retry tickets of refused requests (service.admission)
        self.admission = Admission(settings.workers, settings.max_queue, settings.max_queued_cost,
                                   settings.retry_after_s + settings.ticket_grace_s)
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

    def not_ready(self) -> ApiError:
        """The 503 of a request that came before the models are served: load_failed (for good, until a
        reload succeeds) or not_ready (still loading)."""
        if self.load_error is not None and not self.ready:
            return ApiError(503, "load_failed", f"the configured model failed to load: {self.load_error}; fix the "
                            "configuration, then POST /v1/admin/reload or restart", headers={"Retry-After": "30"})
        return ApiError(503, "not_ready", "the model is loading or warming up; retry shortly",
                        headers={"Retry-After": "5"})

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
        vals = lm.space.to_era5(np.zeros((64, 4)))
        task = make_task(lm.space, r.circle_lat[:64], r.circle_lon[:64], vals, r.circle_lat[-16:], r.circle_lon[-16:])
        run_extrapolate(lm, task, num_samples=2, solver=SolverConfig("euler", 2), seed=0, with_ll=True,
                        ll_solver=SolverConfig("midpoint", 1), estimator="hutchinson", n_probes=1,
                        check=Job(time.monotonic() + 600))

    def get(self, version: str | None) -> LoadedModel:
        return self.served.get(version)

    # running
    def admit(self, ticket: str | None, cost: int = 0) -> None:
        """Admission (event-loop thread only, service.admission): 422 too_costly past max_request_cost; 503
        overloaded with Retry-After and, while places are left, `X-Retry-Ticket` (its old ticket, keeping
        its place, or a new one); sending that header back on the retry claims the place."""
        s = self.settings
        if cost > s.max_request_cost:
            self.metrics.rejected.labels("too_costly").inc()
            raise ApiError(422, "too_costly", f"this request would cost about {cost:,} units of work (targets x "
                           f"samples x solver evaluations, more with log_likelihood); at most {s.max_request_cost:,}"
                           ": ask for fewer targets, samples or steps, or leave log_likelihood out of include")
        try:
            self.admission.admit(ticket, cost)
        except Overloaded as exc:
            self.metrics.rejected.labels("overloaded").inc()
            headers = {"Retry-After": str(s.retry_after_s)}
            if exc.ticket is None:
                why = "and no place left in line; retry after Retry-After seconds"
            else:
                headers["X-Retry-Ticket"] = exc.ticket
                why = "; retry after Retry-After seconds with the X-Retry-Ticket header to keep your place"
            raise ApiError(503, "overloaded", f"all {s.workers} worker(s) busy and the queue ({s.max_queue} "
                           f"request(s), {s.max_queued_cost:,} units of work) full{why}", headers=headers) from None
        finally:
            self.metrics.tickets.set(self.admission.tickets)

    async def submit(self, op: str, fn: Callable[[Job], Any], timeout_s: float | None, ticket: str | None = None,
                     cost: int = 0, gone: Callable[[], Awaitable[Any]] | None = None) -> tuple[Any, dict[str, float]]:
        """Run fn(job) in a worker (`job` is the check to pass to flownp.inference). Returns (result,
        timing {queue_s, engine_s}). 503 when full (see `admit`) or not ready, 504 past the deadline, 499 when
        `gone()` (an awaitable that finishes when the client disconnects) finishes first; either way the job
        is cancelled and its worker stops at its next check."""
        if not self.ready:
            raise self.not_ready()
        s = self.settings
        self.admit(ticket, cost)
        timeout = min(timeout_s or s.request_timeout_s, s.request_timeout_s)
        job = Job(time.monotonic() + timeout)
        t_submit = time.perf_counter()

        def call() -> tuple[Any, dict[str, float]]:
            t0 = time.perf_counter()
            job()  # cancelled or late while queued: do not start
            r = fn(job)
            t1 = time.perf_counter()
            self.metrics.engine_seconds.labels(op).observe(t1 - t0)
            return r, {"queue_s": t0 - t_submit, "engine_s": t1 - t0}

        loop = asyncio.get_running_loop()
        self.metrics.engine_jobs.inc()
        self.metrics.engine_cost.inc(cost)
        fut = loop.run_in_executor(self._pool, call)

        def done(f: "asyncio.Future[Any]") -> None:
            self.admission.release(cost)
            self.metrics.engine_jobs.dec()
            self.metrics.engine_cost.dec(cost)
            if not f.cancelled():
                f.exception()  # retrieved: a job that fails after its caller stopped waiting is not "never retrieved"

        fut.add_done_callback(done)
        watch = asyncio.ensure_future(gone()) if gone is not None else None
        try:
            finished, _ = await asyncio.wait([fut] + ([watch] if watch else []), timeout=timeout + 0.5,
                                             return_when=asyncio.FIRST_COMPLETED)
            if fut in finished:
                return fut.result()
            job.cancel()
            if watch is not None and watch in finished:
                self.metrics.rejected.labels("client_disconnected").inc()
                log.info("%s: the client disconnected; its job was cancelled", op)
                raise ApiError(499, "client_disconnected", "the client closed the connection")
            raise DeadlineExceeded
        except DeadlineExceeded:
            job.cancel()
            self.metrics.rejected.labels("deadline").inc()
            raise ApiError(504, "deadline_exceeded", f"the request took longer than its deadline of {timeout:g} s; "
                           "ask for fewer points, samples or steps, or a longer timeout_s") from None
        except BaseException:  # the request task itself was cancelled (server shutdown): stop the work too
            job.cancel()
            raise
        finally:
            if watch is not None:
                watch.cancel()
                if watch.done() and not watch.cancelled():
                    watch.exception()  # a watch that failed (the connection broke) counts as gone; retrieved

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
