"""Running a snippet in a sandbox: one Docker exec, its output captured with caps, a hard timeout.

The snippet runs under sandbox-run (in the image), which gives it its stdin and, when it ends, kills
every process that carries the run's id. On timeout the gateway does that from outside with
sandbox-kill-run, so a busy loop or a forked, detached child cannot outlive the run.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

import aiodocker
from aiodocker.stream import Stream

from .containers import docker_errors
from .errors import SandboxNotRunning, TooManyRequests
from .settings import ExecSettings

log = logging.getLogger(__name__)

Language = Literal["node", "python", "bash"]

# The code is an argv element: it never passes through a shell of ours.
PROGRAMS: dict[Language, list[str]] = {
    "node": ["node", "-e"],
    # -u: what a snippet printed before it was killed must not die in a buffer.
    "python": ["python3", "-u", "-c"],
    "bash": ["bash", "-c"],
}
STDOUT, STDERR = 1, 2
KILL_TIMEOUT_S = 10.0
# After a kill, how long the output may still take to drain before we stop listening.
DRAIN_TIMEOUT_S = 5.0


@dataclass(frozen=True, kw_only=True)
class ExecRequest:
    language: Language
    code: str
    stdin: bytes
    timeout_ms: int


@dataclass(frozen=True, kw_only=True)
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    truncated: bool
    duration_ms: int


@dataclass
class _Output:
    """Keeps the first `limit` bytes of each stream and drops the rest, noting that it did."""

    limit: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def add(self, stream: int, data: bytes) -> None:
        buffer = self.stdout if stream == STDOUT else self.stderr
        room = self.limit - len(buffer)
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        buffer += data

    async def collect(self, stream: Stream) -> None:
        while (message := await stream.read_out()) is not None:
            self.add(message.stream, message.data)


class ExecRunner:
    def __init__(self, docker: aiodocker.Docker, settings: ExecSettings) -> None:
        self._docker = docker
        self._settings = settings
        # Per-process count of runs in flight per user. A known limit: with several gateway
        # processes the bound applies per process; a PostgreSQL counter would make it global.
        self._in_flight: Counter[str] = Counter()

    @asynccontextmanager
    async def slot(self, user: str) -> AsyncIterator[None]:
        if self._in_flight[user] >= self._settings.max_concurrent_per_user:
            raise TooManyRequests(
                f"at most {self._settings.max_concurrent_per_user} runs at a time per user; "
                "wait for one to finish"
            )
        self._in_flight[user] += 1
        try:
            yield
        finally:
            self._in_flight[user] -= 1
            if not self._in_flight[user]:
                del self._in_flight[user]

    async def run(self, container_id: str, request: ExecRequest) -> ExecResult:
        program = [*PROGRAMS[request.language], request.code]
        return await self.run_program(container_id, program, request.stdin, request.timeout_ms)

    async def run_program(
        self, container_id: str, program: list[str], stdin: bytes, timeout_ms: int
    ) -> ExecResult:
        """Runs argv `program` as a run: stdin, output caps, timeout and the process-tree sweep."""
        run_id = secrets.token_hex(16)
        container = self._docker.containers.container(container_id)
        command = ["sandbox-run", str(len(stdin)), *program]
        with _exec_errors():
            execution = await container.exec(
                command,
                stdin=bool(stdin),
                user="sandbox",
                workdir="/workspace",
                environment={"SANDBOX_RUN_ID": run_id},
            )

        output = _Output(self._settings.max_output_bytes)
        timed_out = False
        started = time.monotonic()
        with _exec_errors():
            async with execution.start(detach=False) as stream:
                try:
                    async with asyncio.timeout(timeout_ms / 1000):
                        await _pump(stream, stdin, output)
                except TimeoutError:
                    timed_out = True
                    await self._kill_run(container, run_id)
                    with suppress(TimeoutError):
                        async with asyncio.timeout(DRAIN_TIMEOUT_S):
                            await output.collect(stream)
            duration_ms = round((time.monotonic() - started) * 1000)
            exit_code = await _exit_code(execution)
        return ExecResult(
            stdout=output.stdout.decode("utf-8", errors="replace"),
            stderr=output.stderr.decode("utf-8", errors="replace"),
            exit_code=exit_code,
            timed_out=timed_out,
            truncated=output.truncated,
            duration_ms=duration_ms,
        )

    async def start_detached(self, container_id: str, program: list[str]) -> None:
        """Starts `program` outside any run (no run id), so that it outlives the request: a dev server."""
        with _exec_errors():
            execution = await self._docker.containers.container(container_id).exec(
                program, user="sandbox", workdir="/workspace"
            )
            await execution.start(detach=True)

    async def _kill_run(self, container: Any, run_id: str) -> None:
        killer = await container.exec(["sandbox-kill-run", run_id], user="sandbox", stdout=True, stderr=True)
        async with asyncio.timeout(KILL_TIMEOUT_S), killer.start(detach=False) as stream:
            while (message := await stream.read_out()) is not None:
                log.warning("sandbox-kill-run: %s", message.data.decode(errors="replace").rstrip())


async def _pump(stream: Stream, stdin: bytes, output: _Output) -> None:
    """Collects output while feeding stdin, so that a program that reads nothing cannot stall us."""
    if not stdin:
        await output.collect(stream)
        return
    feeder = asyncio.create_task(_feed(stream, stdin))
    try:
        await output.collect(stream)
    finally:
        feeder.cancel()
        with suppress(asyncio.CancelledError):
            await feeder


async def _feed(stream: Stream, stdin: bytes) -> None:
    # The program may exit without reading everything; the socket then refuses the rest.
    with suppress(ConnectionError, RuntimeError):
        await stream.write_in(stdin)


async def _exit_code(execution: Any) -> int | None:
    """The exit code once Docker has noticed the process is gone (a moment after its output ends)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        info = await execution.inspect()
        if not info["Running"] or time.monotonic() > deadline:
            return info["ExitCode"] if not info["Running"] else None
        await asyncio.sleep(0.01)


@contextmanager
def _exec_errors() -> Iterator[None]:
    with docker_errors("running the snippet"):
        try:
            yield
        except aiodocker.DockerError as err:
            # 404: the container is gone; 409: it exists but is not running.
            if err.status in (404, 409):
                raise SandboxNotRunning(
                    "your sandbox is not running; start it with POST /api/sandbox"
                ) from err
            raise
