"""What every benchmark needs: a real gateway process on a free port, tokens, and statistics."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiodocker
import aiohttp
import asyncpg

from gateway.containers import remove_deployment
from gateway.egress import EgressGuard
from gateway.settings import EgressPolicy, Settings
from gateway.tokens import mint_token

ROOT = Path(__file__).resolve().parent.parent
# The users' filesystems, in the set-up's state folder as scripts/run.sh has them.
DISK_DIR = os.environ.get("SANDBOX_DISK_DIR") or str(
    Path(os.environ.get("SANDBOX_GATEWAY_STATE") or ROOT / ".state") / "disks"
)
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Gateway:
    url: str
    settings: Settings
    pid: int

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(user, self.settings, 3600)}"}


def server_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    script = ROOT / "scripts" / "ensure-postgres.sh"
    return subprocess.run([str(script)], check=True, capture_output=True, text=True).stdout.strip()


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A database of its own on the server of DATABASE_URL (or the embedded one), dropped after."""
    url = server_url()
    name = f"sgbench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(url)
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def running_gateway(**env: str) -> AsyncIterator[Gateway]:
    """`python -m gateway` in its own process, with a name of its own; its containers removed after."""
    async with running_gateways(1, **env) as (gateway,):
        yield gateway


@asynccontextmanager
async def running_gateways(count: int, **env: str) -> AsyncIterator[tuple[Gateway, ...]]:
    """`count` gateway processes on one scratch database, with one deployment name and one JWT
    secret, each on its own port: what a load balancer has behind it. Containers removed after."""
    name = env.get("GATEWAY_NAME") or f"sgbench-{secrets.token_hex(3)}"
    shared = {
        "GATEWAY_NAME": name,
        "SANDBOX_NETWORK": name,
        "GATEWAY_JWT_SECRET": secrets.token_urlsafe(48),
        "SANDBOX_DISK_DIR": DISK_DIR,
        **env,
    }
    async with scratch_database() as database_url:
        try:
            async with AsyncExitStack() as processes:
                gateways = [
                    await processes.enter_async_context(_gateway_process(database_url, **shared))
                    for _ in range(count)
                ]
                yield tuple(gateways)
        finally:
            await remove_containers(name)


@asynccontextmanager
async def _gateway_process(database_url: str, **env: str) -> AsyncIterator[Gateway]:
    port = free_port()
    environment = {
        **os.environ,
        "GATEWAY_PORT": str(port),
        "DATABASE_URL": database_url,
        "GATEWAY_LOG_LEVEL": "WARNING",
        **env,
    }
    settings = Settings.from_env(environment)
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_healthy(url)
        yield Gateway(url=url, settings=settings, pid=process.pid)
    finally:
        await _stop(process)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGINT, as an operator would; SIGKILL if it has not ended in STOP_TIMEOUT_S (a bench may
    have left it wedged), so that the containers are still removed after."""
    with suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        print(f"the gateway (pid {process.pid}) did not stop in {STOP_TIMEOUT_S:.0f} s: killed", flush=True)
        process.kill()
        await process.wait()


async def _wait_healthy(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway at {url} did not become healthy in {timeout_s} s")
            await asyncio.sleep(0.1)


async def remove_containers(gateway_name: str) -> None:
    async with aiodocker.Docker() as docker:
        await remove_deployment(docker, gateway_name, DISK_DIR)
    # Its network is named like the deployment (gateway_env); the gateway leaves its rules behind.
    await EgressGuard(EgressPolicy(), gateway_name).remove()


async def start_sandboxes(gateway: Gateway, users: Sequence[str], *, at_once: int = 4) -> None:
    """Starts every user's sandbox through the API, `at_once` at a time."""
    room = asyncio.Semaphore(at_once)
    async with aiohttp.ClientSession() as session:

        async def start(user: str) -> None:
            async with (
                room,
                session.post(f"{gateway.url}/api/sandbox", headers=gateway.headers(user)) as response,
            ):
                if response.status not in (200, 201):
                    answer = await response.text()
                    raise RuntimeError(f"starting {user}'s sandbox: {response.status} {answer}")

        await asyncio.gather(*(start(user) for user in users))


def quantile(samples: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank), in milliseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def summary(samples: Sequence[float]) -> tuple[float, float]:
    """Median and 95th percentile, in milliseconds."""
    return statistics.median(samples) * 1000, quantile(samples, 0.95)


def report(title: str, rows: dict[str, Sequence[float]], baseline: str) -> None:
    """Prints median and p95 per row, and each row's ratio to the baseline row."""
    base_median, base_p95 = summary(rows[baseline])
    print(f"\n{title}")
    print(f"  {'':<28}{'n':>5}{'median ms':>12}{'p95 ms':>10}{'x median':>10}{'x p95':>8}")
    for name, samples in rows.items():
        median, p95 = summary(samples)
        print(
            f"  {name:<28}{len(samples):>5}{median:>12.1f}{p95:>10.1f}"
            f"{median / base_median:>10.2f}{p95 / base_p95:>8.2f}"
        )
