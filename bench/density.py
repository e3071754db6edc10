"""Many idle sandboxes: what each costs the host and the gateway, whether starts slow down as they
accumulate, and what a reaper pass costs.

    .venv/bin/python -m bench.density [--sandboxes N]

Starts N sandboxes through the API one after another (the baseline is the first ten), then measures
host memory (MemAvailable) and gateway RSS per sandbox, a reaper pass over the N running sessions (none
idle), and passes over 1,000 synthetic session rows: none idle, then all idle (each stopped; their
containers do not exist, so this measures the gateway and PostgreSQL, not Docker).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import aiodocker
import aiohttp
import asyncpg

from gateway import db
from gateway.reaper import reap_once
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


async def timed_reap(settings: Settings, idle_timeout_s: float) -> tuple[float, int]:
    """One reaper pass as a gateway runs it, without the start-up reconciliation of a whole app
    (which would mark the synthetic rows, whose containers do not exist, stopped before the pass)."""
    pool = await db.create_pool(settings.database_url)
    try:
        async with aiodocker.Docker() as docker:
            sandboxes = Sandboxes(settings, pool, docker)
            started = time.perf_counter()
            reaped = await reap_once(sandboxes, pool, idle_timeout_s)
            return time.perf_counter() - started, len(reaped)
    finally:
        await db.close_pool(pool)


async def main(count: int) -> None:
    async with running_gateway(MAX_SANDBOXES=str(count + 10)) as gateway, aiohttp.ClientSession() as session:
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

    first, last = statistics.median(latencies[:10]), statistics.median(latencies[-10:])
    print(f"\ndensity ({count} idle sandboxes started through the API)")
    print(f"  host memory per idle sandbox      {host_per / 2**20:8.1f} MiB")
    print(f"  gateway RSS per sandbox           {rss_per / 2**20:8.2f} MiB")
    print(f"  start latency, first ten (median) {first * 1000:8.0f} ms")
    print(f"  start latency, last ten (median)  {last * 1000:8.0f} ms   x{last / first:.2f} of the first ten")
    print(f"  reaper pass over {count} running sessions, none idle   {busy_pass * 1000:8.1f} ms")
    print(f"  reaper pass over {count} + 1,000 rows, none idle       {scan_pass * 1000:8.1f} ms")
    print(f"  reaper pass stopping {reaped} idle synthetic sessions  {reap_pass * 1000:8.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=100)
    asyncio.run(main(parser.parse_args().sandboxes))
