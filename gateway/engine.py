"""The gateway's two clients of the Docker engine: one for calls, one for streams.

A terminal holds a connection to the engine for as long as it is open, and a run holds one for its
output. With one pool for everything, a hundred open terminals took every connection the pool allowed
(aiohttp's 100), and every user's start, stop and `GET` waited behind them until they closed. So the
calls that answer at once (create, inspect, remove, ping) have a client of their own, and whatever
streams (runs and terminals: their exec, its stream, its inspects) goes through a second client whose
pool has no size limit: what bounds those connections is the gateway's own limits per user on
terminals and runs, not a pool that everybody shares.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import aiohttp

log = logging.getLogger(__name__)

# Request/response calls to the engine; exec and attach streams drop the read timeouts themselves
# (aiodocker keeps only the connect timeouts for a stream).
TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)
# Where aiodocker looks for the engine when neither the settings nor DOCKER_HOST name one.
DEFAULT_SOCKETS = (Path("/run/docker.sock"), Path("/var/run/docker.sock"))
UNIX = "unix://"


@dataclass(frozen=True)
class Engine:
    calls: aiodocker.Docker
    streams: aiodocker.Docker

    async def close(self) -> None:
        await self.streams.close()
        # aiodocker leaves a connector it was given open; closing one it made again is harmless.
        await self.streams.connector.close()
        await self.calls.close()


def connect(docker_host: str | None) -> Engine:
    calls = aiodocker.Docker(url=docker_host, timeout=TIMEOUT)
    path = _unix_socket(docker_host)
    if path is None:
        # TCP, SSH or a Docker context: aiodocker's own connector, whose pool is aiohttp's default.
        log.warning("streams to a Docker engine that is not on a unix socket share a pool of 100")
        return Engine(calls, aiodocker.Docker(url=docker_host, timeout=TIMEOUT))
    unbounded = aiohttp.UnixConnector(path, limit=0)
    # With a connector of its own, aiodocker takes the URL as the base of its requests' URLs; the
    # socket's path is the connector's. "localhost" is what aiodocker itself puts there.
    return Engine(calls, aiodocker.Docker(url=UNIX + "localhost", connector=unbounded, timeout=TIMEOUT))


def _unix_socket(docker_host: str | None) -> str | None:
    url = docker_host or os.environ.get("DOCKER_HOST")
    if url is None:
        found = next((path for path in DEFAULT_SOCKETS if path.is_socket()), None)
        return str(found) if found else None
    return url[len(UNIX) :] if url.startswith(UNIX) else None
