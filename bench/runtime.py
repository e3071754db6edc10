"""Start, exec and preview under gVisor (runsc) beside runc, in one run, with ratios.

    .venv/bin/python -m bench.runtime [--runs N] [--requests N]

Two gateway processes, one with SANDBOX_RUNTIME=runc and one with SANDBOX_RUNTIME=runsc, are measured
alternately with the very requests of bench.lifecycle (POST /api/sandbox, then an untimed DELETE),
bench.exec (POST /exec of node) and bench.proxy's upstream (GET of a small preview response through the
gateway, one connection, one request at a time). The engine must know runsc (scripts/ensure-runsc.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiodocker
import aiohttp

from . import exec as exec_bench
from . import lifecycle
from .common import Gateway, report, running_gateway
from .proxy import USER, start_upstream

RUNTIMES = ("runc", "runsc")


async def preview_request(session: aiohttp.ClientSession, gateway: Gateway) -> float:
    url = f"{gateway.url}/preview/{USER}/small"
    headers = {"Host": gateway.settings.preview_host, **gateway.headers(USER)}
    started = time.perf_counter()
    async with session.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        await response.read()
    return time.perf_counter() - started


async def main(runs: int, requests: int) -> None:
    starts: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
    execs: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
    previews: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
    async with (
        running_gateway(SANDBOX_RUNTIME="runc") as runc,
        running_gateway(SANDBOX_RUNTIME="runsc") as runsc,
        aiohttp.ClientSession() as session,
        aiodocker.Docker() as docker,
    ):
        gateways = {"runc": runc, "runsc": runsc}
        for _ in range(runs + 1):  # the first of each is a warm-up
            for runtime, gateway in gateways.items():
                elapsed = await lifecycle.through_api(session, gateway, gateway.headers("start"))
                starts[runtime].append(elapsed)
        for gateway in gateways.values():
            await start_upstream(gateway, docker)
        for _ in range(runs + 3):
            for runtime, gateway in gateways.items():
                execs[runtime].append(await exec_bench.through_api(session, gateway, gateway.headers(USER)))
        for _ in range(requests + 10):
            for runtime, gateway in gateways.items():
                previews[runtime].append(await preview_request(session, gateway))
    report(
        f"sandbox start, POST /api/sandbox ({runs} runs each, alternating)",
        {runtime: samples[1:] for runtime, samples in starts.items()},
        baseline="runc",
    )
    report(
        f"exec of {exec_bench.CODE}, POST /exec ({runs} runs each, alternating)",
        {runtime: samples[3:] for runtime, samples in execs.items()},
        baseline="runc",
    )
    report(
        f"preview GET of a small response through the gateway ({requests} each, alternating)",
        {runtime: samples[10:] for runtime, samples in previews.items()},
        baseline="runc",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.runs, arguments.requests))
