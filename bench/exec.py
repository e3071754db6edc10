"""`console.log(1)` through POST /api/sandbox/exec vs. the same exec done directly with aiodocker.

    .venv/bin/python -m bench.exec [--runs N]

Both run `node -e console.log(1)` as user sandbox in /workspace of the same container, read stdout and
stderr to the end and ask Docker for the exit code; the API run adds the gateway (auth, validation, the
session lookup, the per-user bound) and sandbox-run (stdin, the process-tree sweep). Runs alternate so
that drift on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiodocker
import aiohttp

from .common import Gateway, report, running_gateway

CODE = "console.log(1)"


async def through_api(session: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    async with session.post(
        f"{gateway.url}/api/sandbox/exec", headers=headers, json={"language": "node", "code": CODE}
    ) as response:
        body = await response.json()
    elapsed = time.perf_counter() - started
    assert body["stdout"] == "1\n", body
    return elapsed


async def direct(docker: aiodocker.Docker, container_id: str) -> float:
    started = time.perf_counter()
    execution = await docker.containers.container(container_id).exec(
        ["node", "-e", CODE], user="sandbox", workdir="/workspace"
    )
    output = b""
    async with execution.start(detach=False) as stream:
        while (message := await stream.read_out()) is not None:
            output += message.data
    exit_code = (await execution.inspect())["ExitCode"]
    elapsed = time.perf_counter() - started
    assert (output, exit_code) == (b"1\n", 0), (output, exit_code)
    return elapsed


async def main(runs: int) -> None:
    async with running_gateway() as gateway, aiohttp.ClientSession() as session, aiodocker.Docker() as docker:
        headers = gateway.headers("bench")
        async with session.post(f"{gateway.url}/api/sandbox", headers=headers) as response:
            assert response.status in (200, 201), await response.text()
        container_id = (await docker.containers.get(f"{gateway.settings.gateway_name}-bench")).id
        # Warm both paths: node's first start reads its binary from disk.
        for _ in range(3):
            await through_api(session, gateway, headers)
            await direct(docker, container_id)
        api, baseline = [], []
        for _ in range(runs):
            api.append(await through_api(session, gateway, headers))
            baseline.append(await direct(docker, container_id))
    report(
        f"exec of {CODE} ({runs} runs each, alternating)",
        {"direct aiodocker exec": baseline, "gateway POST /exec": api},
        baseline="direct aiodocker exec",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    asyncio.run(main(parser.parse_args().runs))
