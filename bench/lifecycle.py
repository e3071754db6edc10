"""Starting a sandbox through POST /api/sandbox vs. creating and starting the same container directly.

    .venv/bin/python -m bench.lifecycle [--runs N]

The baseline creates and starts a container from the very configuration the gateway uses (same image,
limits, mounts, network, published port) with aiodocker, its user's filesystem mounted once before
(disks.py); the API start adds auth, the per-user and capacity locks in PostgreSQL, the free-disk
check, mounting the user's filesystem, the published-port lookup and the session rows. Each sample
is followed by a stop that is not timed (which unmounts the filesystem). Runs alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiodocker
import aiohttp

from gateway.containers import container_config
from gateway.disks import Disks
from gateway.docker_runtime import attach_disk

from .common import Gateway, report, running_gateway


async def through_api(session: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    async with session.post(f"{gateway.url}/api/sandbox", headers=headers) as response:
        assert response.status == 201, await response.text()
    elapsed = time.perf_counter() - started
    async with session.delete(f"{gateway.url}/api/sandbox", headers=headers) as response:
        assert response.status == 204, await response.text()
    return elapsed


async def direct(docker: aiodocker.Docker, gateway: Gateway, user: str) -> float:
    config = container_config(gateway.settings, user)
    name = f"{gateway.settings.gateway_name}-{user}"
    started = time.perf_counter()
    container = await docker.containers.create(config, name=name)
    await container.start()
    elapsed = time.perf_counter() - started
    await container.delete(force=True)
    return elapsed


async def main(runs: int) -> None:
    async with running_gateway() as gateway, aiohttp.ClientSession() as session, aiodocker.Docker() as docker:
        headers = gateway.headers("bench")
        # Warm up: the network, the filesystems and the image's layers.
        await through_api(session, gateway, headers)
        settings = gateway.settings
        disks = Disks(settings)
        await attach_disk(disks, docker, settings, "bench-direct")
        await direct(docker, gateway, "bench-direct")
        api, baseline = [], []
        for _ in range(runs):
            api.append(await through_api(session, gateway, headers))
            baseline.append(await direct(docker, gateway, "bench-direct"))
        await disks.detach("bench-direct")
    report(
        f"sandbox start ({runs} runs each, alternating)",
        {"direct create+start": baseline, "gateway POST /api/sandbox": api},
        baseline="direct create+start",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
