"""Running a snippet in a sandbox: one Docker exec, its output captured with caps, a hard timeout.

The snippet runs under sandbox-run (in the image), which gives it its stdin and, when it ends, kills
every process that carries the run's id. On timeout the gateway does that from outside with
sandbox-kill-run, so a busy loop or a forked, detached child cannot outlive the run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

import aiodocker
from aiodocker.stream import Stream

from .containers import exec_errors, exit_code
from .errors import TooManyRequests
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
# A run also ends itself this long after its timeout (sandbox-run-deadline), in case no gateway is left
# to end it: one killed with -9 mid-run.
SELF_DEADLINE_GRACE_S = 5
# Output past the cap is read and dropped no faster than this. A flood (`cat /dev/zero`) then waits on
# its full pipe instead of keeping the engine and the gateway copying gigabytes that nobody gets, which
# cost every other user's runs; a program that prints only a little too much still ends on its own.
DISCARD_BYTES_PER_S = 1024 * 1024


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
    dropped: int = 0
    first_dropped_at: float = 0.0

    def add(self, stream: int, data: bytes) -> None:
        buffer = self.stdout if stream == STDOUT else self.stderr
        room = self.limit - len(buffer)
        if len(data) > room:
            if not self.truncated:
                self.truncated, self.first_dropped_at = True, time.monotonic()
            self.dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        buffer += data

    async def collect(self, stream: Stream, *, hold_back: bool = True) -> None:
        while (message := await stream.read_out()) is not None:
            self.add(message.stream, message.data)
            if self.truncated and hold_back:
                await self._hold_back()

    async def _hold_back(self) -> None:
        """Waits until the bytes dropped so far fit DISCARD_BYTES_PER_S; not reading meanwhile is
        what holds the program back (aiodocker stops reading its socket when its queue is full)."""
        due = self.first_dropped_at + self.dropped / DISCARD_BYTES_PER_S
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)


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
        self_deadline_s = math.ceil(timeout_ms / 1000) + SELF_DEADLINE_GRACE_S
        with exec_errors("running the snippet"):
            execution = await container.exec(
                command,
                stdin=bool(stdin),
                user="sandbox",
                workdir="/workspace",
                environment={"SANDBOX_RUN_ID": run_id, "SANDBOX_RUN_DEADLINE_S": str(self_deadline_s)},
            )

        output = _Output(self._settings.max_output_bytes)
        timed_out = False
        started = time.monotonic()
        with exec_errors("running the snippet"):
            async with execution.start(detach=False) as stream:
                try:
                    async with asyncio.timeout(timeout_ms / 1000):
                        await _pump(stream, stdin, output)
                except TimeoutError:
                    timed_out = True
                    # The run's output is read while the kill runs, at full speed: the engine reports
                    # the killer's exit only once the killed run's output is flushed, and a flood
                    # left unread held the kill back until its timeout.
                    with suppress(TimeoutError):
                        async with asyncio.timeout(KILL_TIMEOUT_S + DRAIN_TIMEOUT_S):
                            await asyncio.gather(
                                self._kill_run(container, run_id), output.collect(stream, hold_back=False)
                            )
            duration_ms = round((time.monotonic() - started) * 1000)
            status = await exit_code(execution)
        return ExecResult(
            stdout=output.stdout.decode("utf-8", errors="replace"),
            stderr=output.stderr.decode("utf-8", errors="replace"),
            exit_code=status,
            timed_out=timed_out,
            truncated=output.truncated,
            duration_ms=duration_ms,
        )

    async def start_detached(self, container_id: str, program: list[str]) -> None:
        """Starts `program` outside any run (no run id), so that it outlives the request: a dev server."""
        with exec_errors("running the snippet"):
            execution = await self._docker.containers.container(container_id).exec(
                program, user="sandbox", workdir="/workspace"
            )
            await execution.start(detach=True)

    async def _kill_run(self, container: Any, run_id: str) -> None:
        """Kills the run from outside. A kill that fails is logged, not raised: the run has timed out
        all the same, and the sandbox ends it itself soon after (SELF_DEADLINE_GRACE_S)."""
        try:
            killer = await container.exec(
                ["sandbox-kill-run", run_id], user="sandbox", stdout=True, stderr=True
            )
            async with asyncio.timeout(KILL_TIMEOUT_S), killer.start(detach=False) as stream:
                while (message := await stream.read_out()) is not None:
                    log.warning("sandbox-kill-run: %s", message.data.decode(errors="replace").rstrip())
        except (aiodocker.DockerError, TimeoutError) as err:
            log.warning("could not kill timed-out run %s (the sandbox ends it itself): %r", run_id, err)


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
