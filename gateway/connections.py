"""Client connections: how many the gateway holds, and the two bounds on them, so that one client can
never starve the others, and all clients together never starve the gateway's own connections to
Docker and PostgreSQL (which need open files too: past the open-file limit, accept() fails, and so
do the engine's and the database's connects, and /healthz says "docker": false).

Every client connection is counted from the moment the front door accepts it until it closes,
whichever protocol has it by then: the door, aiohttp's handler (request_handler.py) or a splice. The
door takes a Slot for it in connection_made, or refuses it there and then, before reading a byte; the
Slot goes with the connection at a hand-over and is released once, by whoever has it at the end.

"Client" is the peer address. Behind a reverse proxy that is the proxy's address, for every user at
once: there the per-client bound belongs in the proxy (README, "Connections"), and
GATEWAY_MAX_CONNECTIONS_PER_CLIENT=0 turns it off here; the ceiling on all connections still holds.
"""

from __future__ import annotations

import json
import logging
import resource
from typing import Literal

from .errors import TooManyConnections

log = logging.getLogger(__name__)

# Open files the gateway keeps for itself whatever its clients do: the PostgreSQL pool (20,
# db.create_pool), the Docker client's pool for short calls (aiohttp's default of 100 per connector),
# the listeners, the event loop's own (epoll, its self-pipe, signals), stdio and log files, and the
# executor's and subprocesses' pipes, with room to spare.
DEPENDENCY_RESERVE = 256
# A client connection being served may hold one more: a preview's connection to its dev server, a
# terminal's or a run's stream from the engine, a WebSocket's upstream side. So what is left after
# the reserve is shared out two descriptors per client connection.
FILES_PER_CONNECTION = 2
# Below this the gateway would be of no use; an open-file limit that small is a configuration error,
# and the start-up log says so.
MIN_CEILING = 32
# The soft limit counted for "unlimited" (Linux's own nr_open default).
UNLIMITED_FILES = 1 << 20

Refusal = Literal["per_client", "total"]
REFUSALS: tuple[Refusal, ...] = ("per_client", "total")


def open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft


def connection_ceiling(configured: int | None, soft_limit: int) -> int:
    """The most client connections at once: GATEWAY_MAX_CONNECTIONS if set, (soft limit - reserve) / 2
    otherwise. A configured value may give up the halving (an operator who knows that few connections
    stream), never the reserve: past it the gateway itself runs out of descriptors."""
    available = soft_limit - DEPENDENCY_RESERVE
    derived = available // FILES_PER_CONNECTION
    if configured is None:
        ceiling = derived
    elif configured > available:
        log.warning(
            "GATEWAY_MAX_CONNECTIONS=%d leaves too few of the %d open files for Docker and PostgreSQL;"
            " using %d",
            configured,
            soft_limit,
            available,
        )
        ceiling = available
    else:
        ceiling = configured
    if ceiling < MIN_CEILING:
        log.warning(
            "an open-file limit of %d leaves room for %d client connections; raise it (ulimit -n)",
            soft_limit,
            ceiling,
        )
        ceiling = MIN_CEILING
    return ceiling


class Slot:
    """One client connection's place in the counts; released once, however often it is asked to."""

    __slots__ = ("_counts", "client")

    def __init__(self, counts: ClientConnections, client: str) -> None:
        self._counts: ClientConnections | None = counts
        self.client = client

    def release(self) -> None:
        counts, self._counts = self._counts, None
        if counts is not None:
            counts.release(self.client)


class ClientConnections:
    """The open client connections, in all and per peer address."""

    def __init__(self, ceiling: int, per_client: int) -> None:
        self.ceiling = ceiling
        self.per_client = per_client  # 0: no bound per client
        self.open = 0
        self._by_client: dict[str, int] = {}

    def admit(self, client: str) -> Slot | Refusal:
        if self.open >= self.ceiling:
            return "total"
        held = self._by_client.get(client, 0)
        if self.per_client and held >= self.per_client:
            return "per_client"
        self._by_client[client] = held + 1
        self.open += 1
        return Slot(self, client)

    def release(self, client: str) -> None:
        self.open -= 1
        held = self._by_client[client] - 1
        if held:
            self._by_client[client] = held
        else:
            del self._by_client[client]

    def held_by(self, client: str) -> int:
        return self._by_client.get(client, 0)

    def count(self) -> int:
        return self.open


REFUSAL_MESSAGES: dict[Refusal, str] = {
    "per_client": "too many connections from your address; close some and try again",
    "total": "the gateway holds as many connections as it can; try again shortly",
}


def _refusal_answer(reason: Refusal) -> bytes:
    error = TooManyConnections(REFUSAL_MESSAGES[reason])
    body = json.dumps({"error": {"code": error.code, "message": error.message}}).encode()
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Content-Length": str(len(body)),
        **error.headers,
    }
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"HTTP/1.1 {error.status} Service Unavailable\r\n{lines}\r\n".encode() + body


# Written whole, before the connection is closed: made once, as a refusal comes in floods.
REFUSAL_ANSWERS: dict[Refusal, bytes] = {reason: _refusal_answer(reason) for reason in REFUSALS}
