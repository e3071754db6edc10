"""Terminal latency and throughput through the sandbox's agent (straight to it, and through the gateway's
WebSocket) vs. the same shell as a Docker TTY exec, in one run; and reattaching with its replay.

    .venv/bin/python -m bench.terminal [--keystrokes N] [--megabytes M] [--reattaches R]

Each row opens `bash -l` with a TTY in the same sandbox and replaces it with `cat`, so that each
keystroke is echoed by the kernel's line discipline. Keystroke-to-echo: one byte written, the time until
it comes back. Bulk: `head -c M MB | tr` through the TTY, bytes received per second. Reattach: a v2
socket onto a detached terminal whose replay ring is full, until the whole replay has arrived.
Targets (issue 16): the agent adds < 0.3 ms to the echo p50, bulk >= 0.8x the Docker TTY, reattach
with replay < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiodocker
import aiohttp
import asyncpg

from gateway import agent, agent_protocol
from gateway.agent import AgentAddress
from gateway.docker_runtime import PUBLISHED_HOST

from .common import quantile, running_gateway

Send = Callable[[bytes], Awaitable[None]]
Receive = Callable[[], Awaitable[bytes]]
DONE = b"BULK-2DONE"


async def read_until(receive: Receive, needle: bytes) -> int:
    """Reads until `needle` has arrived; returns how many bytes that took."""
    tail = b""
    total = 0
    while True:
        chunk = await receive()
        total += len(chunk)
        # Only the end of the last chunk is kept: a needle may straddle two chunks, never more.
        window = tail + chunk
        if needle in window:
            return total
        tail = window[-len(needle) :]


async def keystroke_latencies(send: Send, receive: Receive, keystrokes: int) -> list[float]:
    await send(b"echo READY-$((1+1))\r")
    await read_until(receive, b"READY-2")
    await send(b"exec cat\r")
    await asyncio.sleep(0.3)  # let bash become cat; any prompt bytes drain below
    await send(b"x")
    await read_until(receive, b"x")
    latencies = []
    for _ in range(keystrokes):
        started = time.perf_counter()
        await send(b"k")
        await read_until(receive, b"k")
        latencies.append(time.perf_counter() - started)
    await send(b"\x04")  # EOF: cat ends, and so does the session; the bulk run opens a fresh one
    return latencies


async def bulk(send: Send, receive: Receive, megabytes: int) -> float:
    await send(b"echo READY-$((1+1))\r")
    await read_until(receive, b"READY-2")
    started = time.perf_counter()
    await send(
        f"head -c {megabytes * 1_000_000} /dev/zero | tr '\\0' a; echo; echo BULK-$((1+1))DONE\r".encode()
    )
    received = await read_until(receive, DONE)
    return received / (time.perf_counter() - started) / 1e6


async def direct_session(docker: aiodocker.Docker, container_id: str) -> tuple[Send, Receive, Any]:
    execution = await docker.containers.container(container_id).exec(
        ["bash", "-l"],
        stdin=True,
        tty=True,
        user="sandbox",
        workdir="/workspace",
        environment={"TERM": "xterm"},
    )
    stream = execution.start(detach=False)
    await stream.__aenter__()

    async def receive() -> bytes:
        message = await stream.read_out()
        assert message is not None
        return message.data

    return stream.write_in, receive, stream


class AgentSession:
    """A terminal.open straight to the sandbox's agent, as the gateway makes it."""

    def __init__(self) -> None:
        self.stack = AsyncExitStack()

    async def close(self) -> None:
        await self.stack.aclose()


async def agent_session(address: AgentAddress) -> tuple[Send, Receive, Any]:
    handle = AgentSession()
    params = {
        "grace_s": 0,
        "ring_bytes": 256 * 1024,
        "max_terminals": 10,
        "viewer_buffer_bytes": 256 * 1024,
        "viewer_stall_s": 10,
    }
    stream = await handle.stack.enter_async_context(agent.operation(address, "terminal.open", **params))

    async def send(data: bytes) -> None:
        await stream.send(agent_protocol.STDIN, data)

    async def receive() -> bytes:
        while True:
            frame = await stream.read_frame()
            assert frame is not None
            if frame[0] == agent_protocol.STDOUT:
                return frame[1]

    return send, receive, handle


async def gateway_session(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[Send, Receive, Any]:
    ws = await session.ws_connect(
        f"{url}/api/sandbox/terminal", headers=headers, protocols=["sandbox-terminal.v2"]
    )

    async def receive() -> bytes:
        while True:
            message = await ws.receive()
            if message.type == aiohttp.WSMsgType.TEXT:
                continue  # "attached"
            assert message.type == aiohttp.WSMsgType.BINARY, message
            data: bytes = message.data
            return data

    return ws.send_bytes, receive, ws


async def reattach_latencies(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], reattaches: int
) -> tuple[list[float], int]:
    """A detached terminal with a full replay ring, attached to again and again; the replay's size."""
    endpoint = f"{url}/api/sandbox/terminal"
    ws = await session.ws_connect(endpoint, headers=headers, protocols=["sandbox-terminal.v2"])
    terminal_id = json.loads((await ws.receive()).data)["id"]
    await ws.send_bytes(b"head -c 400000 /dev/zero | tr '\\0' a; echo; echo FILLED-$((1+1))\r")
    await read_until(lambda: ws.receive_bytes(), b"FILLED-2")
    await ws.close()
    latencies, replayed = [], 0
    for _ in range(reattaches):
        started = time.perf_counter()
        ws = await session.ws_connect(
            f"{endpoint}?id={terminal_id}", headers=headers, protocols=["sandbox-terminal.v2"]
        )
        replayed = json.loads((await ws.receive()).data)["replayed"]
        received = 0
        while received < replayed:
            received += len((await ws.receive()).data)
        latencies.append(time.perf_counter() - started)
        await ws.close()
    async with session.delete(f"{url}/api/sandbox/terminals/{terminal_id}", headers=headers) as response:
        assert response.status == 204
    return latencies, replayed


async def agent_address(database_url: str, user: str) -> AgentAddress:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT agent_port, agent_secret FROM sessions WHERE user_id = $1", user)
    finally:
        await conn.close()
    assert row is not None
    return AgentAddress(PUBLISHED_HOST, row["agent_port"], row["agent_secret"])


async def main(keystrokes: int, megabytes: int, reattaches: int) -> None:
    async with running_gateway() as gateway, aiohttp.ClientSession() as session, aiodocker.Docker() as docker:
        headers = gateway.headers("bench")
        async with session.post(f"{gateway.url}/api/sandbox", headers=headers) as response:
            assert response.status in (200, 201), await response.text()
        container_id = (await docker.containers.get(f"{gateway.settings.gateway_name}-bench")).id
        address = await agent_address(gateway.settings.database_url, "bench")

        results: dict[str, dict[str, float]] = {}
        for name, opener in (
            ("direct Docker TTY exec", lambda: direct_session(docker, container_id)),
            ("agent, directly", lambda: agent_session(address)),
            ("gateway WebSocket (agent)", lambda: gateway_session(session, gateway.url, headers)),
        ):
            send, receive, handle = await opener()
            latencies = await keystroke_latencies(send, receive, keystrokes)
            await handle.close()
            send, receive, handle = await opener()
            throughput = await bulk(send, receive, megabytes)
            await handle.close()
            results[name] = {
                "p50": statistics.median(latencies) * 1000,
                "p99": quantile(latencies, 0.99),
                "mbps": throughput,
            }
        reattach, replayed = await reattach_latencies(session, gateway.url, headers, reattaches)
    base = results["direct Docker TTY exec"]
    print(f"\nterminal ({keystrokes} keystrokes, {megabytes} MB bulk)")
    print(f"  {'':<26}{'echo p50 ms':>12}{'p99 ms':>9}{'bulk MB/s':>11}{'+p50 ms':>9}{'x bulk':>8}")
    for name, r in results.items():
        print(
            f"  {name:<26}{r['p50']:>12.2f}{r['p99']:>9.2f}{r['mbps']:>11.1f}"
            f"{r['p50'] - base['p50']:>9.2f}{r['mbps'] / base['mbps']:>8.2f}"
        )
    print(
        f"  reattach with a {replayed / 1024:.0f} KiB replay ({reattaches} times): "
        f"p50 {statistics.median(reattach) * 1000:.1f} ms, p99 {quantile(reattach, 0.99):.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keystrokes", type=int, default=500)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--reattaches", type=int, default=50)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.keystrokes, arguments.megabytes, arguments.reattaches))
