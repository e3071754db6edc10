"""One program from its start to its end, for runs (runs.py) and processes (processes.py) alike.

The same decisions for both: started as the user with a tag of its own (spawn.py), its output read in
chunks and handed to a sink as it comes, ended at its deadline or when its owner says so, and when the
program itself ends, everything it left behind (a forked, detached or setsid child) is killed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import protocol, spawn
from .protocol import OpError

# After the program's end and the sweep, how long its pipes may take to drain.
DRAIN_TIMEOUT_S = 5.0
READ_CHUNK = 64 * 1024
MAX_TIMEOUT_MS = 24 * 3600 * 1000

# Where output goes: called with the stream's kind (protocol.STDOUT or STDERR) and the bytes.
Sink = Callable[[bytes, bytes], Awaitable[None]]


@dataclass(frozen=True)
class Ending:
    exit: int | None
    signal: int | None
    timed_out: bool
    duration_ms: int


def exit_status(returncode: int | None) -> int | None:
    """As a shell reports it: 128 + the signal's number for a program a signal ended."""
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


def parse_argv(request: dict[str, Any]) -> list[str]:
    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise OpError("bad_request", "argv must be a non-empty list of strings")
    return argv


class Program:
    """A started program: its Child, its tag, and (from wait()) the tasks that read its output into
    `sink`."""

    def __init__(self, child: spawn.Child, tag: int, sink: Sink) -> None:
        self.child, self.tag, self._sink = child, tag, sink
        self.started = time.monotonic()
        self._pumps: list[asyncio.Future[None]] = []

    @classmethod
    async def start(
        cls,
        argv: list[str],
        sink: Sink,
        *,
        stdin: bool,
        env: dict[str, str] | None = None,
        cwd: str = spawn.WORKSPACE,
    ) -> Program:
        """Raises OpError spawn_failed when the OS cannot start it (no such program or folder)."""
        tag = spawn.new_tag()
        try:
            child = await spawn.spawn(
                argv,
                tag=tag,
                env=env if env is not None else spawn.base_environment(),
                cwd=cwd,
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            )
        except OSError as err:
            raise OpError("spawn_failed", f"could not start {argv[0]}: {err.strerror}") from None
        return cls(child, tag, sink)

    @property
    def pid(self) -> int:
        return self.child.pid

    async def wait(self, timeout_s: float | None, stop: asyncio.Future[Any] | None = None) -> Ending:
        """Until the program ends, its timeout passes or `stop` is done; then it ends, all of it, and
        its output drains into the sink. The sink sees no byte before this is called (a run answers
        its request first)."""
        stdout, stderr = self.child.stdout, self.child.stderr
        assert stdout is not None
        assert stderr is not None
        self._pumps = [
            asyncio.ensure_future(_pump(stdout, protocol.STDOUT, self._sink)),
            asyncio.ensure_future(_pump(stderr, protocol.STDERR, self._sink)),
        ]
        exited = self.child.exited
        waiting: set[asyncio.Future[Any]] = {exited} if stop is None else {exited, stop}
        done, _ = await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        timed_out = not done
        if exited not in done:
            self.kill()
            await exited
        # What the program left behind ends with it.
        spawn.kill_tagged(self.tag)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await asyncio.gather(*self._pumps)
        returncode = self.child.returncode
        return Ending(
            exit=exit_status(returncode),
            signal=-returncode if returncode is not None and returncode < 0 else None,
            timed_out=timed_out,
            duration_ms=round((time.monotonic() - self.started) * 1000),
        )

    def signal(self, signum: int) -> int:
        """Sends signum to every process of the program; how many there were."""
        return spawn.signal_tagged(self.tag, signum)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.child.kill()
        spawn.signal_tagged(self.tag, signal.SIGKILL)

    async def close(self) -> None:
        """Whatever happened, nothing of it is left: for a `finally`."""
        for task in self._pumps:
            task.cancel()
        if self.child.returncode is None:
            self.kill()
        await asyncio.gather(*self._pumps, return_exceptions=True)


async def _pump(pipe: asyncio.StreamReader, kind: bytes, sink: Sink) -> None:
    while data := await pipe.read(READ_CHUNK):
        await sink(kind, data)


async def feed_stdin(connection: Any, child: spawn.Child) -> None:
    """Writes the connection's 0 frames to the program's stdin (an empty one closes it); returns when
    the peer's side of the connection ends."""
    stdin = child.stdin
    while (message := await connection.read_frame()) is not None:
        kind, payload = message
        if kind != protocol.STDIN or stdin is None:
            continue
        if not await write_stdin(stdin, payload):
            stdin = None


async def write_stdin(stdin: asyncio.StreamWriter, payload: bytes) -> bool:
    """Writes payload, or closes stdin when it is empty; whether stdin is still open."""
    try:
        if not payload:
            stdin.close()
            return False
        stdin.write(payload)
        await stdin.drain()
        return True
    except (ConnectionError, BrokenPipeError):
        # The program ended or closed its stdin: the rest of the input has nowhere to go.
        return False
