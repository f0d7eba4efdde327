"""Admission by count and by cost, with retry tickets that keep a refused client's place, and what a job
costs (`request_cost`).

Rules (event-loop thread only; `Engine.admit` turns a refusal into 503 with Retry-After):
- a free worker always takes a request (nothing is refused while the engine has a free worker);
- otherwise a request waits in the queue if the count and the cost allow: jobs + tickets ahead of it
  < workers + max_queue, and the cost of the admitted jobs + of the tickets ahead + its own cost
  <= max_queued_cost;
- a refused request gets a retry ticket only while fewer than max_queue are outstanding (a ticket is a
  place in the queue, so there are never more tickets than places). A ticket reserves its place (and its
  cost) only while its holder can still be coming back: Retry-After + a short grace after the refusal,
  renewed when the holder is refused again. Ticket holders keep their order: a newcomer counts every
  ticket ahead of it, a holder only the older ones.
The ticket table holds at most max_queue entries, so one admission costs O(max_queue), not O(refusals).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

# velocity evaluations per solver step (flownp.core.solvers: fixed-step methods)
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}
#: one unit ~ one velocity evaluation at one target point of one sample next to a small context (about
#: 10 us on one core of the 2-core dev machine); the coefficients below come from timing the embedded
#: default model there (README, "Cost")
CONTEXT_SCALE = 128.0    # a target's evaluation grows as 1 + n_ctx / CONTEXT_SCALE (it attends to the context)
LL_BASE, LL_PER_PROBE = 4, 3  # one log-likelihood evaluation: the forward with its graph + one VJP per probe
GP_CUBIC = 8000.0        # GP base: the posterior and its symmetric whitening over the targets, n_tgt^3 / this
GP_SQUARE = 100.0        # GP base: (de)whitening per evaluation, n_tgt^2 / this
#: one context encoding (once per flow solved: the global ODE 1, an LFM's N blocks, a distilled sampler's N'
#: maps) costs this many target evaluations per context point (the default model, 1 thread: encoding 1000
#: points 0.033 s, one evaluation at 8 x 245 targets 0.106 s)
CONTEXT_ENCODE = 0.6


def probes_of(estimator: str, n_probes: int, n_tgt: int, y_dim: int = 4) -> int:
    """Vector-Jacobian products per log-likelihood evaluation of a divergence estimator
    (flownp.core.likelihood): Hutchinson n_probes, exact-blocks y_dim, exact-full one per target value."""
    return {"hutchinson": n_probes, "exact-blocks": y_dim, "exact-full": y_dim * n_tgt}.get(estimator, n_probes)


def sampling_evaluations(solver: str | None, steps: int, blocks: int = 1, maps: int | None = None) -> int:
    """Network evaluations of one draw (flownp.samplers.Plan): N' one-step maps (`maps`; no solver), else
    `blocks` flows in sequence (an LFM's N; 1 for the global ODE) x the solver's steps x its evaluations."""
    if maps is not None:
        return maps
    return NFE_PER_STEP[solver] * steps * blocks if solver is not None and steps else 0


def request_cost(*, n_ctx: int, n_tgt: int, num_samples: int, solver: str | None, steps: int,
                 ll_solver: str | None = None, ll_steps: int = 0, estimator: str = "none", n_probes: int = 1,
                 gp_base: bool = False, blocks: int = 1, maps: int | None = None, ll_blocks: int = 1) -> int:
    """Estimated work of one job in units (see above): targets x samples x the sampler's evaluations
    (`sampling_evaluations`: the global ODE's solver steps, an LFM's `blocks` x its per-block steps, or a
    distilled sampler's `maps`), times the context weight, plus the log-likelihood (its evaluations through
    `ll_blocks` flows, an LFM's or a distilled model's teacher's, x (LL_BASE + LL_PER_PROBE x probes)), one
    context encoding per flow solved (CONTEXT_ENCODE per context point) and the GP base's target-set terms.
    `ll_solver=None`: no log-likelihood. num_samples=1, steps=0 for /v1/log-likelihood (one scored set, no
    sampling)."""
    w = 1.0 + n_ctx / CONTEXT_SCALE
    nfe = sampling_evaluations(solver, steps, blocks, maps)
    nfe_ll = NFE_PER_STEP[ll_solver] * ll_steps * ll_blocks if ll_solver is not None else 0
    encodings = ((maps if maps is not None else blocks) if nfe else 0) + (ll_blocks if nfe_ll else 0)
    cost = n_tgt * num_samples * w * (nfe + nfe_ll * (LL_BASE + LL_PER_PROBE * probes_of(estimator, n_probes, n_tgt)))
    cost += encodings * CONTEXT_ENCODE * n_ctx * w
    if gp_base:
        cost += n_tgt ** 3 / GP_CUBIC + n_tgt ** 2 / GP_SQUARE * (nfe + LL_BASE * nfe_ll)
    return int(cost) + 1


class Overloaded(Exception):
    """A refusal: `ticket` is the holder's place to send back (None: the waiting line is full)."""

    def __init__(self, ticket: str | None) -> None:
        super().__init__("overloaded")
        self.ticket = ticket


@dataclass
class _Ticket:
    expiry: float  # time.monotonic() after which its holder is taken to have given up
    cost: int      # the cost its place reserves


class Admission:
    """Jobs and cost in flight, and the retry tickets (see the module docstring). Not thread-safe: used
    from the event loop only (admit before a job starts, release when it has finished)."""

    def __init__(self, workers: int, max_queue: int, max_queued_cost: int, ticket_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers, self.max_queue, self.max_queued_cost = workers, max_queue, max_queued_cost
        self.ticket_ttl_s, self._clock = ticket_ttl_s, clock
        self.jobs = 0
        self.cost = 0
        self._tickets: OrderedDict[str, _Ticket] = OrderedDict()  # oldest refusal first

    @property
    def tickets(self) -> int:
        """Outstanding tickets (after dropping lapsed ones)."""
        self._expire(self._clock())
        return len(self._tickets)

    def _expire(self, now: float) -> None:
        for t in [t for t, tk in self._tickets.items() if tk.expiry < now]:  # at most max_queue entries
            del self._tickets[t]

    def admit(self, ticket: str | None, cost: int) -> None:
        """Take the job (counted until `release`) or raise Overloaded with the holder's ticket."""
        now = self._clock()
        self._expire(now)
        ahead_n = ahead_cost = 0
        for t, tk in self._tickets.items():
            if t == ticket:
                break
            ahead_n += 1
            ahead_cost += tk.cost
        free_worker = self.jobs < self.workers
        fits = (self.jobs + ahead_n < self.workers + self.max_queue
                and self.cost + ahead_cost + cost <= self.max_queued_cost)
        if free_worker or fits:
            self._tickets.pop(ticket, None)  # type: ignore[arg-type]
            self.jobs += 1
            self.cost += cost
            return
        if ticket in self._tickets:
            self._tickets[ticket].expiry = now + self.ticket_ttl_s  # its holder is still there: keep the place
        elif len(self._tickets) < self.max_queue:
            ticket = uuid.uuid4().hex
            self._tickets[ticket] = _Ticket(now + self.ticket_ttl_s, cost)
        else:
            ticket = None
        raise Overloaded(ticket)

    def release(self, cost: int) -> None:
        """A job admitted with `cost` has finished (or failed, or was cancelled)."""
        self.jobs -= 1
        self.cost -= cost
