"""Helpers shared by the tests: tokens and polling with a deadline."""

from __future__ import annotations

import asyncio
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiodocker
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from gateway.keys import DB
from gateway.server import GatewayRunner
from gateway.settings import Settings
from gateway.tokens import mint_token

JWT_SECRET = secrets.token_urlsafe(48)

MakeClient = Callable[..., Awaitable[TestClient]]


def auth(user: str, lifetime_s: int = 600, *, admin: bool = False) -> dict[str, str]:
    """Headers that authenticate as `user` with a token signed by the test secret."""
    settings = Settings(jwt_key=JWT_SECRET, database_url="unused")
    token = mint_token(user, settings, lifetime_s, admin=admin)
    return {"Authorization": f"Bearer {token}"}


async def poll(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, interval_s: float = 0.05
) -> None:
    """Waits until `check` is true; fails the test when the deadline passes first."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def running_container_id(client: TestClient, user: str) -> str:
    """The container id the gateway recorded for `user`, read from its database."""
    async with client.app[DB].acquire() as conn:
        container_id = await conn.fetchval("SELECT container_id FROM sessions WHERE user_id = $1", user)
    assert isinstance(container_id, str)
    return container_id


async def docker_shell_ok(docker: aiodocker.Docker, container_id: str, command: list[str]) -> bool:
    """Runs `command` in the container directly over the Docker API; whether it exited 0."""
    execution = await docker.containers.container(container_id).exec(command, user="sandbox")
    async with execution.start(detach=False) as stream:
        while await stream.read_out() is not None:
            pass
    # The stream can end before the engine has reaped the process: ExitCode is null until then, and
    # a null read as "not 0" would let a negative check pass too early.
    exit_code: int | None = None

    async def reaped() -> bool:
        nonlocal exit_code
        state = await execution.inspect()
        exit_code = state["ExitCode"]
        return not state["Running"] and exit_code is not None

    await poll(reaped, timeout_s=10)
    return exit_code == 0


def free_port() -> int:
    """A port that is free now, below the ephemeral range (32768 and up) where the kernel and Docker
    pick ports for outgoing connections and published container ports, so neither takes it from us
    between now and the moment the gateway binds it."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 30000")


class GatewayTestServer(TestServer):
    """A TestServer served as `python -m gateway` serves: by the GatewayRunner, front door first."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)


async def exec_bash(client: TestClient, code: str, user: str = "alice") -> dict[str, Any]:
    """Runs `code` with bash through POST /api/sandbox/exec; the result's body."""
    response = await client.post(
        "/api/sandbox/exec", headers=auth(user), json={"language": "bash", "code": code}
    )
    assert response.status == 200, await response.text()
    result: dict[str, Any] = await response.json()
    return result
