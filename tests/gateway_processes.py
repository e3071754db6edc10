"""Real gateway processes (`python -m gateway`) for the tests that need one: several behind one
database, or one to kill. The fixtures are registered in conftest.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.settings import Settings

from .helpers import JWT_SECRET, auth, free_port, poll
from .test_terminal import Screen


@dataclass
class GatewayProcess:
    """One `python -m gateway`; everything it logs goes to `log`."""

    name: str
    url: str
    process: asyncio.subprocess.Process
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


StartGateways = Callable[..., Awaitable[list[GatewayProcess]]]


@pytest.fixture
async def start_gateways(
    settings: Settings, tmp_path: Path, http: aiohttp.ClientSession
) -> AsyncIterator[StartGateways]:
    """Starts gateway processes that share the test's database, deployment name, network and JWT
    secret, each on its own port: what a load balancer would have behind it. They share the public
    URL too, as they would behind one. Stopped in `finally`; the `settings` fixture removes the
    containers they made."""
    started: list[GatewayProcess] = []

    async def start(*names: str, **env: str) -> list[GatewayProcess]:
        gateways = []
        for name in names:
            port = free_port()
            environment = {
                **os.environ,
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(port),
                "GATEWAY_PUBLIC_URL": settings.public_url,
                "GATEWAY_JWT_SECRET": JWT_SECRET,
                "DATABASE_URL": settings.database_url,
                "GATEWAY_NAME": settings.gateway_name,
                "SANDBOX_NETWORK": settings.sandbox_network,
                "SANDBOX_IMAGE": settings.sandbox_image,
                "SANDBOX_MEMORY_MB": "256",
                "SANDBOX_PIDS": "128",
                "GATEWAY_LOG_LEVEL": "INFO",
                **env,
            }
            log = tmp_path / f"gateway-{name}.log"
            with log.open("wb") as sink:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", env=environment, stdout=sink, stderr=sink
                )
            gateway = GatewayProcess(name, f"http://127.0.0.1:{port}", process, log)
            started.append(gateway)
            gateways.append(gateway)
        for gateway in gateways:
            await _wait_healthy(http, gateway)
        return gateways

    try:
        yield start
    finally:
        for gateway in started:
            await stop(gateway)


async def _wait_healthy(http: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    async def healthy() -> bool:
        if gateway.process.returncode is not None:
            pytest.fail(f"gateway {gateway.name} exited at start:\n{gateway.log_text()}")
        try:
            async with http.get(f"{gateway.url}/healthz") as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await poll(healthy, timeout_s=30, interval_s=0.1)


async def stop(gateway: GatewayProcess) -> None:
    await stop_process(gateway.process)


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGINT, as an operator stops a gateway, then SIGKILL if it has not ended 20 s later."""
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, gateway: GatewayProcess, method: str, path: str, user: str, **kwargs: Any
) -> tuple[int, Any]:
    """One API request as `user`; the status and the JSON body (None when there is none)."""
    headers = {**auth(user), **kwargs.pop("headers", {})}
    async with http.request(method, f"{gateway.url}{path}", headers=headers, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


TERMINAL = "/api/sandbox/terminal"
TERMINAL_PROTOCOL = "sandbox-terminal.v1"


async def open_terminal(http: aiohttp.ClientSession, gateway: GatewayProcess, user: str) -> Screen:
    ws = await http.ws_connect(f"{gateway.url}{TERMINAL}", headers=auth(user), protocols=[TERMINAL_PROTOCOL])
    terminal = Screen(ws)
    await ws.send_bytes(b"echo READY-$((40+2)) $SANDBOX_USER\r")
    await terminal.expect(f"READY-42 {user}".encode(), timeout_s=15)
    return terminal
