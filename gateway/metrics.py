"""Prometheus metrics: what an operator watches, through the Prometheus client library.

Each gateway process keeps its own counters (scrape every process); `sandboxes` is read from
PostgreSQL at scrape time, so it is the whole deployment's count, the same from every process.
Serving them is metrics_http.py's business.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Iterator, Sequence

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import db
from .errors import DatabaseUnavailable, DockerFailed, DockerUnavailable, GatewayError

log = logging.getLogger(__name__)

PREFIX = "sandbox_gateway"


class HttpRequests(Collector):
    """Requests by route, method and status, and their durations by route: a collector of our own,
    read at scrape time, because counting comes on every proxied request. The client library's
    Counter and Histogram take a lock and walk the buckets in Python for each: more than the rest of
    the metrics' work together. Counted from the event loop's thread only, as everything here."""

    def __init__(self, buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS) -> None:
        # Ending in +Inf, as the client library's own histograms do.
        self._bounds = tuple(buckets) if buckets[-1] == math.inf else (*buckets, math.inf)
        self._bucket_labels = [floatToGoString(bound) for bound in self._bounds]  # type: ignore[no-untyped-call]
        self._counts: dict[tuple[str, str, int], int] = {}
        # Per route: how many answers fell in each bucket (not cumulative yet), and their sum.
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def count(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        buckets = self._buckets.get(route)
        if buckets is None:
            buckets = self._buckets[route] = [0] * len(self._bounds)
            self._sums[route] = 0.0
        # `le` is inclusive: the first bound at or above the duration.
        buckets[bisect.bisect_left(self._bounds, seconds)] += 1
        self._sums[route] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}_http_requests",
            "Requests by route template (previews: /preview/{user}/{tail}), method and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in self._counts.items():
            requests.add_metric([route, method, str(status)], count)
        yield requests
        seconds = HistogramMetricFamily(
            f"{PREFIX}_http_request_seconds",
            "Time to answer, by route template (streams: until the end)",
            labels=["route"],
        )
        for route, buckets in self._buckets.items():
            cumulative = list(itertools.accumulate(buckets))
            seconds.add_metric(
                [route],
                list(zip(self._bucket_labels, cumulative, strict=True)),
                self._sums[route],
            )
        yield seconds


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
        self.http = HttpRequests()
        r.register(self.http)
        # Client connections (connections.py), wired by the front door's server.
        self.client_connections = Gauge(
            f"{PREFIX}_client_connections", "Client connections open on this process", registry=r
        )
        self.connection_limit = Gauge(
            f"{PREFIX}_client_connection_limit",
            "Bounds on client connections: total, per_client (0: none)",
            ["bound"],
            registry=r,
        )
        self.connections_refused = Counter(
            f"{PREFIX}_connections_refused",
            "Client connections refused as they came, by the bound reached: per_client, total",
            ["reason"],
            registry=r,
        )
        self.head_timeouts = Counter(
            f"{PREFIX}_head_timeouts",
            "Connections closed for a request head not in within GATEWAY_HEADER_TIMEOUT_S, by path:"
            " door, aiohttp",
            ["path"],
            registry=r,
        )

    def count_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http.count(route, method, status, seconds)

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
