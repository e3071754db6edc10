"""Runs through POST /api/sandbox/exec (the agent) vs. `docker exec` vs. the interpreter's own start,
and the latency of streamed output through the processes API (server-sent events).

    .venv/bin/python -m bench.exec [--runs N]

For `console.log(1)`, `print(1)` and bash `true`: the API (gateway, agent, run op, exit), the same
argv as a direct aiodocker exec as user sandbox in /workspace (read to the end, exit code asked), and
the interpreter's own start-to-exit measured inside the sandbox (a python3 loop timing fork, exec and
wait of the same argv). The paths take turns in blocks of ten, so that drift on the machine hits all
alike and no run pays for the engine's clean-up after a docker exec (see main).

Streaming: a background process prints its own clock (time.time_ns) every 100 ms; the client notes
its clock (the same kernel's) when the SSE event carrying it arrives; the difference is the time from
the write to the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from collections.abc import Awaitable, Callable

import aiodocker
import aiohttp
import asyncpg

from gateway import db
from gateway.agent import AgentAddress
from gateway.docker_runtime import PUBLISHED_HOST
from gateway.execute import ExecRequest, ExecRunner

from .common import Gateway, report, running_gateway

CASES = {
    "node console.log(1)": ("node", "console.log(1)", ["node", "-e", "console.log(1)"], "1\n"),
    "python print(1)": ("python", "print(1)", ["python3", "-u", "-c", "print(1)"], "1\n"),
    "bash true": ("bash", "true", ["bash", "-c", "true"], ""),
}
INSIDE = """
import json, subprocess, sys, time
argv, runs = json.loads(sys.argv[1]), int(sys.argv[2])
samples = []
for _ in range(runs + 3):
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    samples.append(time.perf_counter() - started)
print(json.dumps(samples[3:]))
"""
# Runs of one path in a row (see main).
BLOCK = 10
TICKER = """
import sys, time
for _ in range({n}):
    time.sleep(0.1)
    sys.stdout.write(f"{{time.time_ns()}}\\n")
"""


async def through_api(
    session: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str], case: str
) -> float:
    language, code, _, expected = CASES[case]
    started = time.perf_counter()
    async with session.post(
        f"{gateway.url}/api/sandbox/exec", headers=headers, json={"language": language, "code": code}
    ) as response:
        body = await response.json()
    elapsed = time.perf_counter() - started
    assert (body["stdout"], body["exit_code"]) == (expected, 0), body
    return elapsed


async def agent_address(gateway: Gateway, user: str) -> AgentAddress:
    conn = await asyncpg.connect(gateway.settings.database_url)
    try:
        session = await db.get_session(conn, user)
    finally:
        await conn.close()
    assert session is not None
    assert session.agent_port is not None
    assert session.agent_secret is not None
    return AgentAddress(PUBLISHED_HOST, session.agent_port, session.agent_secret)


async def through_agent(runner: ExecRunner, address: AgentAddress, case: str) -> float:
    """The gateway's own runner straight to the agent: the run op without HTTP, auth and PostgreSQL."""
    language, code, _, expected = CASES[case]
    started = time.perf_counter()
    request = ExecRequest(language=language, code=code, stdin=b"", timeout_ms=10_000)  # type: ignore[arg-type]
    result = await runner.run(address, request)
    elapsed = time.perf_counter() - started
    assert (result.stdout, result.exit_code) == (expected, 0), result
    return elapsed


async def direct(docker: aiodocker.Docker, container_id: str, case: str) -> float:
    _, _, argv, expected = CASES[case]
    started = time.perf_counter()
    execution = await docker.containers.container(container_id).exec(
        argv, user="sandbox", workdir="/workspace"
    )
    output = b""
    async with execution.start(detach=False) as stream:
        while (message := await stream.read_out()) is not None:
            output += message.data
    exit_code = (await execution.inspect())["ExitCode"]
    elapsed = time.perf_counter() - started
    assert (output.decode(), exit_code) == (expected, 0), (output, exit_code)
    return elapsed


async def inside(
    session: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str], case: str, runs: int
) -> list[float]:
    argv = CASES[case][2]
    code = f"import sys; sys.argv = ['', {json.dumps(json.dumps(argv))}, '{runs}']\n{INSIDE}"
    async with session.post(
        f"{gateway.url}/api/sandbox/exec",
        headers=headers,
        json={"language": "python", "code": code, "timeout_ms": 60_000},
    ) as response:
        body = await response.json()
    assert body["exit_code"] == 0, body
    samples: list[float] = json.loads(body["stdout"])
    return samples


async def streaming(
    session: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str], n: int
) -> list[float]:
    """Write-to-client latency of each line a background process prints."""
    body = {"language": "python", "code": TICKER.format(n=n), "background": True}
    async with session.post(f"{gateway.url}/api/sandbox/processes", headers=headers, json=body) as response:
        process = await response.json()
        assert response.status == 201, process
    latencies = []
    url = f"{gateway.url}/api/sandbox/processes/{process['id']}/output"
    async with session.get(url, headers=headers) as response:
        event = None
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "stdout":
                received = time.time_ns()
                for stamp in json.loads(line[6:])["text"].split():
                    latencies.append((received - int(stamp)) / 1e9)
            elif line.startswith("data: ") and event == "exit":
                break
    return latencies


async def _block(run: Callable[[], Awaitable[float]]) -> list[float]:
    return [await run() for _ in range(BLOCK + 1)][1:]


async def main(runs: int) -> None:
    async with running_gateway() as gateway, aiohttp.ClientSession() as session, aiodocker.Docker() as docker:
        headers = gateway.headers("bench")
        async with session.post(f"{gateway.url}/api/sandbox", headers=headers) as response:
            assert response.status in (200, 201), await response.text()
        container_id = (await docker.containers.get(f"{gateway.settings.gateway_name}-bench")).id
        address = await agent_address(gateway, "bench")
        runner = ExecRunner(gateway.settings.exec)
        rows: dict[str, dict[str, list[float]]] = {}
        for case in CASES:
            # Warm every path: node's first start reads its binary from disk.
            for _ in range(3):
                await through_api(session, gateway, headers, case)
                await through_agent(runner, address, case)
                await direct(docker, container_id, case)
            api: list[float] = []
            agent_only: list[float] = []
            baseline: list[float] = []
            # Blocks of each path in turn: drift still hits all alike, and a `docker exec` leaves the
            # engine and containerd busy for a while after it returns (cleaning up the exec), which
            # runs interleaved one by one would pay for although nothing of theirs uses the engine.
            # The first run of a block, right after the switch, is not kept.
            for _ in range(math.ceil(runs / BLOCK)):
                api += await _block(lambda case=case: through_api(session, gateway, headers, case))
                agent_only += await _block(lambda case=case: through_agent(runner, address, case))
                baseline += await _block(lambda case=case: direct(docker, container_id, case))
            own = await inside(session, gateway, headers, case, runs)
            rows[case] = {
                "inside (own start)": own,
                "docker exec": baseline,
                "agent run op (no HTTP)": agent_only,
                "gateway POST /exec": api,
            }
        stream = await streaming(session, gateway, headers, max(runs, 30))
    for case, row in rows.items():
        report(
            f"{case} ({len(row['gateway POST /exec'])} runs each, in alternating blocks of {BLOCK})",
            row,
            baseline="inside (own start)",
        )
    print("\nratios of medians (API / own start, API / docker exec)")
    for case, row in rows.items():
        api, own, docker_exec = (
            statistics.median(row[k]) for k in ("gateway POST /exec", "inside (own start)", "docker exec")
        )
        print(f"  {case:<24}{api / own:>8.2f}x{api / docker_exec:>8.2f}x   API median {api * 1000:.1f} ms")
    first = stream[0]
    stream.sort()
    median = statistics.median(stream)
    print(
        f"\nSSE write-to-client latency ({len(stream)} lines): median {median * 1000:.2f} ms,"
        f" p95 {stream[int(len(stream) * 0.95) - 1] * 1000:.2f} ms, max {stream[-1] * 1000:.2f} ms"
        f", first line {first * 1000:.2f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    asyncio.run(main(parser.parse_args().runs))
