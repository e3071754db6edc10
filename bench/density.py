"""Many idle sandboxes: what each costs the host and the gateway, whether starts slow down as they
accumulate, and what a reaper pass costs.

    .venv/bin/python -m bench.density [--sandboxes N] [--runtime runc|runsc] [--ready-samples N]

Starts N sandboxes through the API one after another (the baseline is the first ten), then measures
host memory (MemAvailable) and gateway RSS per sandbox, what each idle sandbox's memory cgroup holds
and, under runc, what its agent holds itself (RSS, PSS, anonymous, from /proc/<pid>/smaps_rollup on
the host), a reaper pass over the N running sessions (none idle), and passes over 1,000 synthetic
session rows: none idle, then all idle (each stopped; their containers do not exist, so this measures
the gateway and PostgreSQL, not Docker). Last, how soon a new sandbox's agent answers: containers made
as a start makes them, timed from the engine's start call returning and from the container's StartedAt
to the first successful ping. Targets (issue 16): at most 20 MiB per idle sandbox with its agent,
its agent answering within 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from datetime import datetime
from pathlib import Path

import aiodocker
import aiohttp
import asyncpg

from gateway import agent, db
from gateway.agent import AgentAddress
from gateway.containers import AGENT_PORT, container_config
from gateway.disks import Disks
from gateway.docker_runtime import DockerRuntime, attach_disk
from gateway.errors import AgentUnavailable
from gateway.reaper import reap_once
from gateway.runtime import SandboxHost
from gateway.sandboxes import Sandboxes
from gateway.settings import Settings

from .common import running_gateway


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cgroup_memory(container_id: str) -> dict[str, int]:
    """The container's memory cgroup: usage (what the limit counts) and its anonymous part (rss)."""
    for root in (Path("/sys/fs/cgroup/memory/docker"), Path("/sys/fs/cgroup/docker")):
        folder = root / container_id
        if (folder / "memory.usage_in_bytes").exists():
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            usage = int((folder / "memory.usage_in_bytes").read_text())
            return {"usage": usage, "rss": int(stat["total_rss"]), "cache": int(stat["total_cache"])}
        if (folder / "memory.current").exists():
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            usage = int((folder / "memory.current").read_text())
            return {"usage": usage, "rss": int(stat["anon"]), "cache": int(stat["file"])}
    return {}


def agent_memory(init_pid: int) -> dict[str, int]:
    """RSS, PSS and anonymous memory of tini's child (the agent), as this host sees them."""
    children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
    if not children:
        return {}
    found = {}
    for line in Path(f"/proc/{children[0]}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Anonymous"):
            found[key] = int(rest.split()[0]) * 1024
    return found


async def idle_costs(docker: aiodocker.Docker, gateway_name: str, runtime: str) -> dict[str, list[int]]:
    label = f'{{"label": ["sandbox-gateway.gateway={gateway_name}"]}}'
    costs: dict[str, list[int]] = {}
    for container in await docker.containers.list(filters=label):
        info = await container.show()
        for key, value in cgroup_memory(info["Id"]).items():
            costs.setdefault(f"cgroup {key}", []).append(value)
        if runtime == "runc":
            for key, value in agent_memory(info["State"]["Pid"]).items():
                costs.setdefault(f"agent {key}", []).append(value)
    return costs


def _timestamp(value: str) -> float:
    """Docker's RFC 3339 with nanoseconds, to seconds since the epoch."""
    head, _, fraction = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{fraction or 0}")


async def agent_ready(docker: aiodocker.Docker, settings: Settings, user: str) -> tuple[float, float]:
    """A sandbox's container made as a start makes it; ms from the start call's return, and from its
    StartedAt, to the agent's first answer to a ping."""
    placement = await SandboxHost(settings, docker).placement()
    secret = secrets.token_urlsafe(32)
    config = container_config(settings, user, placement, agent_secret=secret)
    container = await docker.containers.create(config, name=f"{settings.gateway_name}-{user}")
    try:
        await container.start()
        returned = time.time()
        info = await container.show()
        [port] = [
            b["HostPort"] for b in info["NetworkSettings"]["Ports"][AGENT_PORT] if b["HostIp"] == "127.0.0.1"
        ]
        address = AgentAddress("127.0.0.1", int(port), secret)
        deadline = time.monotonic() + 15
        while True:
            try:
                async with agent.operation(address, "ping"):
                    break
            except AgentUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.001)
        answered = time.time()
        started_at = _timestamp(info["State"]["StartedAt"])
    finally:
        await container.delete(force=True)
    return (answered - returned) * 1000, (answered - started_at) * 1000


async def readiness(settings: Settings, samples: int) -> tuple[list[float], list[float]]:
    from_call, from_started = [], []
    async with aiodocker.Docker() as docker:
        disks = Disks(settings)
        await attach_disk(disks, docker, settings, "bench-ready")
        try:
            await agent_ready(docker, settings, "bench-ready")  # warm: the image's pages
            for _ in range(samples):
                call, started = await agent_ready(docker, settings, "bench-ready")
                from_call.append(call)
                from_started.append(started)
        finally:
            await disks.detach("bench-ready")
    return from_call, from_started


async def timed_reap(settings: Settings, idle_timeout_s: float) -> tuple[float, int]:
    """One reaper pass as a gateway runs it, without the start-up reconciliation of a whole app
    (which would mark the synthetic rows, whose containers do not exist, stopped before the pass)."""
    pool = await db.create_pool(settings.database_url)
    try:
        async with aiodocker.Docker() as docker:
            sandboxes = Sandboxes(settings, pool, DockerRuntime(settings, docker, docker))
            started = time.perf_counter()
            reaped = await reap_once(sandboxes, pool, idle_timeout_s)
            return time.perf_counter() - started, len(reaped)
    finally:
        await db.close_pool(pool)


async def main(count: int, runtime: str, ready_samples: int) -> None:
    async with (
        running_gateway(MAX_SANDBOXES=str(count + 10), SANDBOX_RUNTIME=runtime) as gateway,
        aiohttp.ClientSession() as session,
    ):
        pid = gateway.pid
        memory_before, rss_before = mem_available(), rss(pid)
        latencies = []
        for i in range(count):
            started = time.perf_counter()
            async with session.post(
                f"{gateway.url}/api/sandbox", headers=gateway.headers(f"idle{i}")
            ) as response:
                assert response.status == 201, await response.text()
            latencies.append(time.perf_counter() - started)
        await asyncio.sleep(5)  # let the containers settle before reading memory
        host_per = (memory_before - mem_available()) / count
        rss_per = (rss(pid) - rss_before) / count
        async with aiodocker.Docker() as docker:
            costs = await idle_costs(docker, gateway.settings.gateway_name, runtime)

        settings = gateway.settings
        busy_pass, _ = await timed_reap(settings, idle_timeout_s=3600)

        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(
                "INSERT INTO sessions (user_id, state, container_id, host_port, last_activity)"
                " SELECT 'synthetic' || i, 'running', 'missing' || i, 40000 + i, now() - interval '2 hours'"
                " FROM generate_series(1, 1000) AS i"
            )
        finally:
            await conn.close()
        scan_pass, _ = await timed_reap(settings, idle_timeout_s=3 * 3600)
        reap_pass, reaped = await timed_reap(settings, idle_timeout_s=3600)
        from_call, from_started = await readiness(settings, ready_samples)

    first, last = statistics.median(latencies[:10]), statistics.median(latencies[-10:])
    print(f"\ndensity ({count} idle sandboxes started through the API, runtime {runtime})")
    print(f"  host memory per idle sandbox      {host_per / 2**20:8.1f} MiB   (target <= 20)")
    for key, values in costs.items():
        print(f"  {key + ' (median)':<33} {statistics.median(values) / 2**20:8.1f} MiB")
    print(f"  gateway RSS per sandbox           {rss_per / 2**20:8.2f} MiB")
    print(f"  start latency, first ten (median) {first * 1000:8.0f} ms")
    print(f"  start latency, last ten (median)  {last * 1000:8.0f} ms   x{last / first:.2f} of the first ten")
    print(f"  reaper pass over {count} running sessions, none idle   {busy_pass * 1000:8.1f} ms")
    print(f"  reaper pass over {count} + 1,000 rows, none idle       {scan_pass * 1000:8.1f} ms")
    print(f"  reaper pass stopping {reaped} idle synthetic sessions  {reap_pass * 1000:8.1f} ms")
    print(
        f"  agent's first answer after the start call returned, p50 {statistics.median(from_call):6.1f} ms"
        f"  max {max(from_call):6.1f} ms   (target <= 100)"
    )
    print(
        f"  agent's first answer after StartedAt, p50 {statistics.median(from_started):6.1f} ms"
        f"  max {max(from_started):6.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=100)
    parser.add_argument("--runtime", choices=("runc", "runsc"), default="runc")
    parser.add_argument("--ready-samples", type=int, default=20)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.sandboxes, arguments.runtime, arguments.ready_samples))
