"""Prometheus metrics: what an operator watches, through the Prometheus client library.

Each gateway process keeps its own counters (scrape every process); `sandboxes` is read from
PostgreSQL at scrape time, so it is the whole deployment's count, the same from every process.
Serving them is metrics_http.py's business.
"""

from __future__ import annotations

import logging

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import db
from .errors import DatabaseUnavailable, DockerFailed, DockerUnavailable, GatewayError

log = logging.getLogger(__name__)

PREFIX = "sandbox_gateway"


class Metrics:
    """Every metric of one gateway process, in a registry of its own (no global default registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sandboxes = Gauge(
            f"{PREFIX}_sandboxes",
            "Sandboxes by state, across all gateways (from PostgreSQL)",
            ["state"],
            registry=r,
        )
        self.starts = Counter(
            f"{PREFIX}_sandbox_starts",
            "POST /api/sandbox by result: created, existing, failed",
            ["result"],
            registry=r,
        )
        self.start_seconds = Histogram(
            f"{PREFIX}_sandbox_start_seconds",
            "Time to create and start a sandbox",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.execs = Counter(
            f"{PREFIX}_execs",
            "Finished runs by language and outcome (ok, error, timeout)",
            ["language", "outcome"],
            registry=r,
        )
        self.exec_seconds = Histogram(
            f"{PREFIX}_exec_seconds",
            "Wall time of a run in the sandbox",
            ["language"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.open_websockets = Gauge(
            f"{PREFIX}_open_websockets",
            "WebSockets open on this process: terminal, preview",
            ["kind"],
            registry=r,
        )
        self.reaper_passes = Counter(
            f"{PREFIX}_reaper_passes", "Reaper passes by result: ok, failed", ["result"], registry=r
        )
        self.reaped = Counter(
            f"{PREFIX}_sandboxes_reaped", "Idle sandboxes stopped by the reaper", registry=r
        )
        self.reaper_seconds = Histogram(
            f"{PREFIX}_reaper_pass_seconds", "Time of one reaper pass", registry=r
        )
        self.docker_errors = Counter(
            f"{PREFIX}_docker_errors",
            "Docker failures that reached a response or a reaper pass",
            ["code"],
            registry=r,
        )
        self.database_errors = Counter(
            f"{PREFIX}_database_errors",
            "PostgreSQL failures that reached a response or a reaper pass",
            registry=r,
        )
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "Requests by route template (previews: /preview/{user}/{tail}), method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            f"{PREFIX}_http_request_seconds",
            "Time to answer, by route template (streams: until the end)",
            ["route"],
            registry=r,
        )

    def count_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_seconds.labels(route).observe(seconds)

    def count_error(self, err: GatewayError) -> None:
        if isinstance(err, DockerFailed | DockerUnavailable):
            self.docker_errors.labels(err.code).inc()
        elif isinstance(err, DatabaseUnavailable):
            self.database_errors.inc()

    async def refresh_sandboxes(self, pool: asyncpg.Pool) -> None:
        try:
            async with db.connection(pool) as conn:
                counts = await db.count_by_state(conn)
        except DatabaseUnavailable as err:
            # The scrape still answers, with the last counts; the failure is counted.
            log.warning("metrics: %s", err.message)
            self.database_errors.inc()
            return
        for state in db.SESSION_STATES:
            self.sandboxes.labels(state).set(counts.get(state, 0))

    async def exposition(self, pool: asyncpg.Pool) -> bytes:
        """The text format, with the sandbox counts read just now."""
        await self.refresh_sandboxes(pool)
        return generate_latest(self.registry)
