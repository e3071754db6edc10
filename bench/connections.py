"""Connection floods from one client against one `python -m gateway`: how long slowloris connections
live, /healthz latency under thousands of idle connections, and the issue's figure (1,100 connections
that send one byte each, against a gateway with 1,024 open files). All traffic to 127.0.0.0/8.

    .venv/bin/python -m bench.connections                  # every scenario, this tree
    .venv/bin/python -m bench.connections figure --tree /tmp/base   # the figure, another checkout

The floods come from 127.0.0.1 (and 127.0.0.3), each in a child process of its own
(`bench.connections flood ...`) so that its work never delays the prober's loop; /healthz is asked
from 127.0.0.2, another client, on one kept-alive connection.
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
    """`count` connections from `source`, each sending `first` and then `trickle` a byte every
    `interval_s` until the gateway closes it; a connection closed is opened again after `reopen_s`
    (None: not)."""

    def __init__(
        self,
        port: int,
        count: int,
        first: bytes = b"",
        trickle: bytes = b"",
        *,
        source: str = "127.0.0.1",
        interval_s: float = 1.0,
        reopen_s: float | None = None,
    ) -> None:
        self.port, self.count, self.first, self.trickle, self.source = port, count, first, trickle, source
        self.interval_s, self.reopen_s = interval_s, reopen_s
        self.lifetimes: list[float] = []  # of connections the gateway held, then closed
        self.refused = 0  # answered 503 at once, or reset before a byte could be read
        self.open = 0
        self.connect_errors = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def _one(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(self.source, 0)
                )
            except OSError:
                self.connect_errors += 1
            else:
                await self._hold(reader, writer)
            if self.reopen_s is None:
                return
            await asyncio.sleep(self.reopen_s)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def trickle() -> None:
            writer.write(self.first)
            for byte in self.trickle:
                await asyncio.sleep(self.interval_s)  # the client's pace
                writer.write(bytes([byte]))

        opened = time.monotonic()
        self.open += 1
        trickling = asyncio.create_task(trickle())
        received = b""
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            trickling.cancel()
            writer.close()
        if received.startswith(b"HTTP/1.1 503") or (not received and time.monotonic() - opened < 0.5):
            self.refused += 1
        else:
            self.lifetimes.append(time.monotonic() - opened)

    async def start(self) -> None:
        for _ in range(self.count):
            self._tasks.append(asyncio.create_task(self._one()))
            await asyncio.sleep(0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stats(self) -> dict[str, object]:
        lives = sorted(self.lifetimes)
        return {
            "open": self.open,
            "refused": self.refused,
            "closed_after_holding": len(lives),
            "lifetime_s": [lives[0], lives[len(lives) // 2], lives[-1]] if lives else None,
            "connect_errors": self.connect_errors,
        }


ENDLESS = b"".join(f"X-{n}: {'a' * 10}\r\n".encode() for n in range(1000))
KINDS = {
    "idle": (b"", b""),
    "byte": (b"G", b""),
    "door": (b"G", b"ET /healthz HTTP/1.1\r\n" + ENDLESS),
    "aiohttp": (b"P", b"OST /api/sandbox/exec HTTP/1.1\r\n" + ENDLESS),
}


async def flood_child(
    port: int, kind: str, count: int, source: str, seconds: float, reopen_s: float | None
) -> None:
    """The flood, in a process of its own so that its work never delays the prober's loop: says
    "ready" once its connections are open, floods for `seconds`, then prints its figures."""
    first, trickle = KINDS[kind]
    flood = Flood(port, count, first, trickle, source=source, reopen_s=reopen_s)
    await flood.start()
    await asyncio.sleep(2)
    print(json.dumps({"ready": flood.open}), flush=True)
    await asyncio.sleep(seconds)
    print(json.dumps(flood.stats()), flush=True)
    await flood.stop()


@contextlib.asynccontextmanager
async def flooding(
    port: int,
    kind: str,
    count: int,
    seconds: float,
    *,
    source: str = "127.0.0.1",
    reopen_s: float | None = None,
) -> AsyncIterator[dict[str, object]]:
    """Runs a flood child; yields once it is ready, and fills the dict with its figures at the end."""
    command = ["-m", "bench.connections", "flood", "--port", str(port), "--kind", kind, "--count", str(count)]
    command += ["--source", source, "--seconds", str(seconds)]
    if reopen_s is not None:
        command += ["--reopen", str(reopen_s)]
    child = await asyncio.create_subprocess_exec(
        sys.executable, *command, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    assert child.stdout is not None
    figures: dict[str, object] = json.loads(await child.stdout.readline())
    try:
        yield figures
    finally:
        figures.update(json.loads(await child.stdout.readline()))
        await child.wait()


async def slowloris(tree: Path) -> None:
    """Slowloris connections, a byte a second, with the defaults: 500 GET heads (the door's) from
    one client, 500 POST heads (aiohttp's) from another; /healthz meanwhile from a third."""
    async with gateway_process(tree, None) as gateway:
        async with (
            flooding(gateway.port, "door", 500, 25) as door,
            flooding(gateway.port, "aiohttp", 500, 25, source="127.0.0.3") as through_aiohttp,
        ):
            samples, failed = await healthz_latencies(gateway.port, 15)
        for name, figures in (("door (GET)", door), ("aiohttp (POST)", through_aiohttp)):
            print(f"slowloris via {name}: {figures}")
        print(f"  /healthz meanwhile: {percentiles(samples)}, {failed} failed")


async def idle(tree: Path, count: int, **env: str) -> None:
    """/healthz quiet, then under `count` idle connections from one client, each reopened a second
    after the gateway closes (or refuses) it."""
    async with gateway_process(tree, None, **env) as gateway:
        quiet, failed = await healthz_latencies(gateway.port, 10)
        print(f"/healthz quiet: {percentiles(quiet)}, {failed} failed")
        async with flooding(gateway.port, "idle", count, 22, reopen_s=1.0) as figures:
            loaded, failed = await healthz_latencies(gateway.port, 20)
        print(
            f"/healthz under {count} idle connections from one client ({env or 'defaults'}):"
            f" {percentiles(loaded)}, {failed} failed; flood: {figures}"
        )


async def figure(tree: Path) -> None:
    """The issue's figure: 1,024 open files, 1,100 connections sending one byte each, each opened
    again half a second after the gateway closes it (a client that keeps its flood up)."""
    async with gateway_process(tree, 1024) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, local_addr=(PROBER, 0))
        writer.write(HEALTHZ)
        await read_answer(reader)
        async with flooding(gateway.port, "byte", 1100, 30, reopen_s=0.5) as figures:
            # Longer than the Docker client keeps an idle connection to the engine (aiohttp's 15 s),
            # so that /healthz needs a new one; the flood's pace, not a synchronisation.
            await asyncio.sleep(20)
            for _ in range(3):
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
                    status, body = await healthz_new_connection(gateway.port, 5)
                    fresh = f"{status} {body.decode()[:100]}"
                except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
                    fresh = f"failed: {err!r}"
                print(f"  /healthz on a new connection from another client: {fresh}")
                await asyncio.sleep(1)
        print(f"figure ({tree}): flood {figures}")
        writer.close()


def enough_files(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(count, hard), hard))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", nargs="*", default=["slowloris", "idle", "figure"])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose gateway runs")
    parser.add_argument("--idle", type=int, default=5000, help="idle connections in the idle scenario")
    # The flood child's own arguments.
    parser.add_argument("--port", type=int)
    parser.add_argument("--kind", choices=sorted(KINDS))
    parser.add_argument("--count", type=int)
    parser.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--reopen", type=float)
    args = parser.parse_args()
    enough_files(max(args.idle, args.count or 0) + 2000)
    if args.scenario == ["flood"]:
        await flood_child(args.port, args.kind, args.count, args.source, args.seconds, args.reopen)
        return
    if "slowloris" in args.scenario:
        await slowloris(args.tree)
    if "idle" in args.scenario:
        await idle(args.tree, args.idle)
        await idle(args.tree, args.idle, GATEWAY_MAX_CONNECTIONS_PER_CLIENT="0")
    if "figure" in args.scenario:
        await figure(args.tree)


if __name__ == "__main__":
    asyncio.run(main())
