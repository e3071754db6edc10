"""Connection floods from one client against one `python -m gateway`: how long slowloris connections
live, /healthz latency under thousands of idle connections, and the issue's figure (1,100 connections
that send one byte each, against a gateway with 1,024 open files). All traffic to 127.0.0.0/8.

    .venv/bin/python -m bench.connections                  # every scenario, this tree
    .venv/bin/python -m bench.connections figure --tree /tmp/base   # the figure, another checkout

The flood comes from 127.0.0.1; /healthz is asked from 127.0.0.2, another client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from .common import ROOT, free_port, remove_containers, scratch_database

PROBER = "127.0.0.2"
LIMITED = (
    "import resource, runpy, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "runpy.run_module('gateway', run_name='__main__', alter_sys=True)"
)


@dataclass
class Gateway:
    port: int
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def gateway_process(tree: Path, files: int | None, **env: str) -> AsyncIterator[Gateway]:
    """`python -m gateway` from `tree`, under a hard open-file limit of `files` if given."""
    name = f"sgbench-{secrets.token_hex(3)}"
    port = free_port()
    async with scratch_database() as database_url:
        environment = {
            **os.environ,
            "GATEWAY_PORT": str(port),
            "DATABASE_URL": database_url,
            "GATEWAY_NAME": name,
            "SANDBOX_NETWORK": name,
            "GATEWAY_JWT_SECRET": secrets.token_urlsafe(48),
            "GATEWAY_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(tree),
            **env,
        }
        command = ["-m", "gateway"] if files is None else ["-c", LIMITED, str(files)]
        process = await asyncio.create_subprocess_exec(sys.executable, *command, env=environment, cwd=tree)
        try:
            await wait_healthy(port)
            yield Gateway(port, process)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
            await remove_containers(name)


async def wait_healthy(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            status, _ = await healthz_new_connection(port)
            if status == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("the gateway did not become healthy")


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length")), 0)
    return int(lines[0].split()[1]), await reader.readexactly(length)


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def healthz_new_connection(port: int, timeout_s: float = 5) -> tuple[int, bytes]:
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(PROBER, 0))
        try:
            writer.write(HEALTHZ)
            return await read_answer(reader)
        finally:
            writer.close()


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    if not ordered:
        return "no samples"

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    return f"n={len(ordered)} p50={at(0.5):.1f} ms p99={at(0.99):.1f} ms max={ordered[-1] * 1000:.1f} ms"


async def healthz_latencies(port: int, seconds: float) -> tuple[list[float], int]:
    """/healthz on one kept-alive connection from another client, as often as it answers."""
    samples: list[float] = []
    failed = 0
    connector = aiohttp.TCPConnector(local_addr=(PROBER, 0), limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    body = await response.json()
                    if response.status == 200 and body["docker"] and body["database"]:
                        samples.append(time.perf_counter() - started)
                    else:
                        failed += 1
            except (aiohttp.ClientError, TimeoutError):
                failed += 1
            await asyncio.sleep(0.02)
    return samples, failed


class Flood:
    """`count` connections from 127.0.0.1, each sending `first` and then `trickle` a byte every
    `interval_s`; a connection the gateway closes is opened again after `reopen_s` (None: not)."""

    def __init__(
        self,
        port: int,
        count: int,
        first: bytes = b"",
        trickle: bytes = b"",
        interval_s: float = 1.0,
        reopen_s: float | None = None,
    ) -> None:
        self.port, self.count, self.first, self.trickle = port, count, first, trickle
        self.interval_s, self.reopen_s = interval_s, reopen_s
        self.lifetimes: list[float] = []  # of connections the gateway closed after a 1 s+ life
        self.refused = 0  # closed within a second (a 503 or a reset)
        self.open = 0
        self.connect_errors = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def _one(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.connect_errors += 1
                if self.reopen_s is None:
                    return
                await asyncio.sleep(self.reopen_s)
                continue
            opened = time.monotonic()
            self.open += 1
            try:
                writer.write(self.first)
                for byte in self.trickle:
                    if reader.at_eof():
                        break
                    await asyncio.sleep(self.interval_s)
                    writer.write(bytes([byte]))
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass
            except ConnectionError:
                pass
            finally:
                self.open -= 1
                writer.close()
            lived = time.monotonic() - opened
            if lived < 1.0:
                self.refused += 1
            else:
                self.lifetimes.append(lived)
            if self.reopen_s is None:
                return
            await asyncio.sleep(self.reopen_s)

    async def start(self) -> None:
        for _ in range(self.count):
            self._tasks.append(asyncio.create_task(self._one()))
            await asyncio.sleep(0)

    async def wait(self, timeout_s: float) -> None:
        await asyncio.wait(self._tasks, timeout=timeout_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def slowloris(tree: Path) -> None:
    """1,000 slowloris connections, a byte a second: half GET heads (the door's), half POST heads
    (aiohttp's), defaults otherwise."""
    async with gateway_process(tree, None) as gateway:
        endless = b"".join(f"X-{n}: {'a' * 10}\r\n".encode() for n in range(1000))
        door = Flood(gateway.port, 500, b"G", b"ET /healthz HTTP/1.1\r\n" + endless)
        aiohttp_path = Flood(gateway.port, 500, b"P", b"OST /api/sandbox/exec HTTP/1.1\r\n" + endless)
        await door.start()
        await aiohttp_path.start()
        samples, failed = await healthz_latencies(gateway.port, 12)
        await door.wait(60)
        await aiohttp_path.wait(60)
        for name, flood in (("door (GET)", door), ("aiohttp (POST)", aiohttp_path)):
            lives = sorted(flood.lifetimes)
            print(
                f"slowloris via {name}: {len(lives)} held, closed after"
                f" min {lives[0]:.2f} s, median {lives[len(lives) // 2]:.2f} s, max {lives[-1]:.2f} s;"
                f" {flood.refused} refused at once"
                if lives
                else f"slowloris via {name}: none held, {flood.refused} refused"
            )
        print(f"  /healthz meanwhile: {percentiles(samples)}, {failed} failed")
        await door.stop()
        await aiohttp_path.stop()


async def idle(tree: Path, count: int, **env: str) -> None:
    """/healthz quiet, then under `count` idle connections from one client, each reopened a second
    after the gateway closes (or refuses) it."""
    async with gateway_process(tree, None, **env) as gateway:
        quiet, failed = await healthz_latencies(gateway.port, 10)
        print(f"/healthz quiet: {percentiles(quiet)}, {failed} failed")
        flood = Flood(gateway.port, count, reopen_s=1.0)
        await flood.start()
        await asyncio.sleep(3)  # the flood's connections opened (their pace, not a synchronisation)
        held = flood.open
        loaded, failed = await healthz_latencies(gateway.port, 20)
        print(
            f"/healthz under {count} idle connections from one client ({env or 'defaults'}):"
            f" {percentiles(loaded)}, {failed} failed; {held} held open at the start,"
            f" {flood.refused} refusals and {len(flood.lifetimes)} closes meanwhile"
        )
        await flood.stop()


async def figure(tree: Path) -> None:
    """The issue's figure: 1,024 open files, 1,100 connections sending one byte each."""
    async with gateway_process(tree, 1024) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, local_addr=(PROBER, 0))
        writer.write(HEALTHZ)
        await read_answer(reader)
        # Reopened half a second after the gateway closes one: a client that keeps its flood up.
        flood = Flood(gateway.port, 1100, b"G", reopen_s=0.5)
        await flood.start()
        # Longer than the Docker client keeps an idle connection to the engine (aiohttp's 15 s), so
        # that /healthz needs a new one; the flood's pace, not a synchronisation.
        await asyncio.sleep(20)
        print(
            f"figure ({tree}): {flood.open} of 1100 held after 20 s, {flood.refused} refused,"
            f" {len(flood.lifetimes)} closed after a while, {flood.connect_errors} connect errors"
        )
        for attempt in range(3):
            started = time.perf_counter()
            try:
                async with asyncio.timeout(15):
                    writer.write(HEALTHZ)
                    status, body = await read_answer(reader)
                seen = f"{status} {json.loads(body)}"
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as err:
                seen = f"failed: {err!r}"
            took = (time.perf_counter() - started) * 1000
            print(f"  /healthz on a connection opened before the flood: {seen} ({took:.0f} ms)")
            try:
                status, body = await healthz_new_connection(gateway.port, 10)
                fresh = f"{status} {body.decode()[:100]}"
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
                fresh = f"failed: {err!r}"
            print(f"  /healthz on a new connection: {fresh}")
            if attempt < 2:
                await asyncio.sleep(1)
        writer.close()
        await flood.stop()


def enough_files(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(count, hard), hard))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", nargs="*", default=["slowloris", "idle", "figure"])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose gateway runs")
    parser.add_argument("--idle", type=int, default=5000, help="idle connections in the idle scenario")
    args = parser.parse_args()
    enough_files(args.idle + 2000)
    if "slowloris" in args.scenario:
        await slowloris(args.tree)
    if "idle" in args.scenario:
        await idle(args.tree, args.idle)
        await idle(args.tree, args.idle, GATEWAY_MAX_CONNECTIONS_PER_CLIENT="0")
    if "figure" in args.scenario:
        await figure(args.tree)


if __name__ == "__main__":
    asyncio.run(main())
