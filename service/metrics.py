"""Prometheus metrics, one registry per app (so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flownp_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("flownp_request_seconds", "HTTP request latency by route.", ["route"],
                                 buckets=_BUCKETS, registry=r)
        self.in_flight = Gauge("flownp_in_flight_requests", "HTTP requests being answered.", registry=r)
        self.engine_jobs = Gauge("flownp_engine_jobs", "Model jobs running or queued.", registry=r)
        self.engine_cost = Gauge("flownp_engine_cost", "Estimated work of the jobs running or queued "
                                 "(service.admission units).", registry=r)
        self.tickets = Gauge("flownp_retry_tickets", "Retry tickets holding a place in line.", registry=r)
        self.engine_seconds = Histogram("flownp_engine_seconds", "Model work per request (in a worker).",
                                        ["op"], buckets=_BUCKETS, registry=r)
        self.nfe = Counter("flownp_solver_evaluations", "Velocity-field evaluations by the ODE solvers.",
                           ["model", "op"], registry=r)
        self.points = Counter("flownp_points_served", "Target points answered.", ["model", "op"], registry=r)
        self.samples = Counter("flownp_samples_served", "Samples drawn (target sets).", ["model"], registry=r)
        self.rejected = Counter("flownp_rejected", "Requests refused or stopped by the engine (overloaded, too_costly, "
                                "deadline, client_disconnected).",
                                ["reason"], registry=r)
