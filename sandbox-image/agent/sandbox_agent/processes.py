"""Processes: programs the agent keeps, outliving the connection that started them (the e2b-style API).

  process.start   J {"argv", "cwd"?, "env"?, "stdin": bool, "timeout_ms": N | null, "background": bool,
                     "limits": {"live", "ended", "buffer", "retention_s"}}
                  -> J {"ok": true, "process": {...}}; then 0 frames feed stdin (an empty one closes it)
                  until the gateway closes the connection, which leaves the process running
  process.list    -> J {"ok": true, "processes": [...]}
  process.get     J {"id"} -> J {"ok": true, "process": {...}}
  process.attach  J {"id", "from": offset} -> J {"ok": true, "process": {...}, "offset": N}, then
                  1 and 2 frames of output from N on, J {"gap": {"from", "to"}} where bytes were dropped
                  (the offset continues at "to"), live, and J {"exit": {...}} at the end
  process.input   J {"id"} -> J {"ok": true}; then 0 frames as for process.start
  process.signal  J {"id", "signal": number} -> J {"ok": true, "signalled": N}

Every process has an output log: the bytes of stdout and stderr, in the order read, each byte at an
offset (a running count over both streams), bounded per process with the oldest dropped, so a reader
resumes from any offset and learns what it missed. A background process has no timeout: it ends when
it is signalled or the sandbox stops; a foreground one also at its timeout. None ends with a
connection. Ended processes stay listed for their retention, and at most `ended` of them are kept.
The bounds come from the gateway with each start (its settings), under the ceilings here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal as signals
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import programs, protocol, spawn
from .programs import MAX_TIMEOUT_MS, Ending, Program
from .protocol import OpError
from .server import Connection

# Ceilings on what a gateway may ask for: what this small resident process can afford.
MAX_LIVE, MAX_ENDED = 256, 1024
MAX_BUFFER = 64 * 1024 * 1024
MAX_RETENTION_S = 7 * 24 * 3600
MAX_ENV_BYTES = 256 * 1024
# Once a process's output has overflowed its log, the agent reads it no faster than this: a flood then
# waits on its full pipe instead of keeping the agent busy copying what will be dropped.
FLOOD_BYTES_PER_S = 4 * 1024 * 1024
# Folders inside the sandbox, not this process's temporary files.
ALLOWED_CWD = ("/workspace", "/tmp")  # noqa: S108


class OutputLog:
    """The last `limit` bytes a process wrote, as tagged chunks at running offsets."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: deque[tuple[int, bytes, bytes]] = deque()  # (offset, kind, data)
        self.start = 0  # the offset of the oldest byte kept
        self.end = 0  # the offset of the next byte written
        self.overflowed_at: float | None = None
        self._changed = asyncio.Event()

    def append(self, kind: bytes, data: bytes) -> None:
        self.chunks.append((self.end, kind, data))
        self.end += len(data)
        while self.end - self.start > self.limit:
            offset, old_kind, old = self.chunks[0]
            over = self.end - self.start - self.limit
            if over >= len(old):
                self.chunks.popleft()
                self.start = offset + len(old)
            else:
                self.chunks[0] = (offset + over, old_kind, old[over:])
                self.start = offset + over
            if self.overflowed_at is None:
                self.overflowed_at = time.monotonic()
        self.wake()

    def wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def next_change(self) -> asyncio.Event:
        """Set at the next append or at the end; taken before waiting, so that no change is missed."""
        return self._changed

    def read(self, offset: int) -> tuple[tuple[int, int] | None, list[tuple[bytes, bytes]], int]:
        """From `offset` on: the gap (dropped bytes) before what is kept, if any, the chunks, and the
        offset after them."""
        offset = min(max(offset, 0), self.end)
        gap = (offset, self.start) if offset < self.start else None
        offset = max(offset, self.start)
        out = []
        for at, kind, data in self.chunks:
            if at + len(data) <= offset:
                continue
            out.append((kind, data[offset - at :] if at < offset else data))
            offset = at + len(data)
        return gap, out, offset


@dataclass
class Limits:
    live: int
    ended: int
    buffer: int
    retention_s: float


@dataclass(eq=False)
class ManagedProcess:
    id: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    background: bool
    timeout_ms: int | None
    retention_s: float
    log: OutputLog
    started_at: float = field(default_factory=time.time)
    program: Program | None = None
    stdin: asyncio.StreamWriter | None = None
    ending: Ending | None = None
    ended_at: float | None = None
    ended_monotonic: float | None = None
    task: asyncio.Future[None] | None = None

    def describe(self) -> dict[str, Any]:
        ending = self.ending
        return {
            "id": self.id,
            "argv": self.argv,
            "cwd": self.cwd,
            "env": self.env,
            "pid": self.program.pid if self.program else None,
            "background": self.background,
            "timeout_ms": self.timeout_ms,
            "state": "running" if ending is None else "exited",
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "exit_code": ending.exit if ending else None,
            "signal": _signal_name(ending.signal) if ending else None,
            "timed_out": ending.timed_out if ending else False,
            "stdin_open": self.stdin is not None,
            "output": {"start": self.log.start, "end": self.log.end, "limit": self.log.limit},
        }

    def exit_message(self) -> dict[str, Any]:
        assert self.ending is not None
        return {
            "exit_code": self.ending.exit,
            "signal": _signal_name(self.ending.signal),
            "timed_out": self.ending.timed_out,
            "offset": self.log.end,
        }

    async def sink(self, kind: bytes, data: bytes) -> None:
        self.log.append(kind, data)
        if self.log.overflowed_at is not None:
            due = self.log.overflowed_at + (self.log.end - self.log.limit) / FLOOD_BYTES_PER_S
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)


def _signal_name(signum: int | None) -> str | None:
    if signum is None:
        return None
    try:
        return signals.Signals(signum).name
    except ValueError:
        return str(signum)


class Registry:
    """The sandbox's processes, running and recently ended."""

    def __init__(self) -> None:
        self._processes: dict[str, ManagedProcess] = {}

    def get(self, request: dict[str, Any]) -> ManagedProcess:
        self._forget_expired()
        process_id = request.get("id")
        process = self._processes.get(process_id) if isinstance(process_id, str) else None
        if process is None:
            raise OpError("not_found", f"no process {process_id!r} in this sandbox")
        return process

    def all(self) -> list[ManagedProcess]:
        self._forget_expired()
        return sorted(self._processes.values(), key=lambda p: p.started_at)

    def live(self) -> int:
        return sum(1 for p in self._processes.values() if p.ending is None)

    def add(self, process: ManagedProcess, limits: Limits) -> None:
        self._forget_expired()
        if self.live() >= limits.live:
            raise OpError("too_many", f"at most {limits.live} processes may run at once in a sandbox")
        self._processes[process.id] = process

    def discard(self, process: ManagedProcess) -> None:
        self._processes.pop(process.id, None)

    def ended(self, limits: Limits) -> None:
        """After a process ended: at most limits.ended ended ones are kept, the oldest go first."""
        self._forget_expired()
        ended = sorted(
            (p for p in self._processes.values() if p.ended_monotonic is not None),
            key=lambda p: p.ended_monotonic or 0.0,
        )
        for process in ended[: max(len(ended) - limits.ended, 0)]:
            del self._processes[process.id]

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for process in list(self._processes.values()):
            if process.ended_monotonic is not None and now - process.ended_monotonic > process.retention_s:
                del self._processes[process.id]

    async def stop_all(self) -> None:
        """The agent is stopping: every process ends with it."""
        for process in self._processes.values():
            if process.program is not None and process.ending is None:
                process.program.kill()
        tasks = [p.task for p in self._processes.values() if p.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


def _int_in(request: dict[str, Any], name: str, low: int, high: int) -> int:
    value = request.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise OpError("bad_request", f"{name} must be an integer from {low} to {high}")
    return value


def _parse_limits(request: dict[str, Any]) -> Limits:
    limits = request.get("limits")
    if not isinstance(limits, dict):
        raise OpError("bad_request", "limits must be an object")
    return Limits(
        live=_int_in(limits, "live", 1, MAX_LIVE),
        ended=_int_in(limits, "ended", 0, MAX_ENDED),
        buffer=_int_in(limits, "buffer", 1, MAX_BUFFER),
        retention_s=_int_in(limits, "retention_s", 0, MAX_RETENTION_S),
    )


def _parse_cwd(request: dict[str, Any]) -> str:
    cwd = request.get("cwd", spawn.WORKSPACE)
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise OpError("bad_request", "cwd must be an absolute path")
    normal = os.path.normpath(cwd)
    if not any(normal == top or normal.startswith(top + "/") for top in ALLOWED_CWD):
        raise OpError("bad_request", "cwd must be inside /workspace or /tmp")
    return normal


def _parse_env(request: dict[str, Any]) -> dict[str, str]:
    env = request.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise OpError("bad_request", "env must map strings to strings")
    if sum(len(k) + len(v) for k, v in env.items()) > MAX_ENV_BYTES:
        raise OpError("bad_request", f"env is over {MAX_ENV_BYTES} bytes")
    if any(not k or "=" in k or "\0" in k or "\0" in v for k, v in env.items()):
        raise OpError("bad_request", "env names must be non-empty, without '=' or NUL")
    return env


async def start(registry: Registry, connection: Connection, request: dict[str, Any]) -> None:
    argv = programs.parse_argv(request)
    cwd, env, limits = _parse_cwd(request), _parse_env(request), _parse_limits(request)
    background = bool(request.get("background"))
    timeout_ms = None if background else _int_in(request, "timeout_ms", 1, MAX_TIMEOUT_MS)
    process = ManagedProcess(
        id=secrets.token_hex(8),
        argv=argv,
        cwd=cwd,
        env=env,
        background=background,
        timeout_ms=timeout_ms,
        retention_s=limits.retention_s,
        log=OutputLog(limits.buffer),
    )
    registry.add(process, limits)
    try:
        # Private names stay private even when asked for: the user's own env cannot bring them back.
        environment = {**spawn.base_environment(), **env}
        for name in spawn.PRIVATE_ENV:
            environment.pop(name, None)
        program = await Program.start(argv, process.sink, stdin=True, env=environment, cwd=cwd)
    except BaseException:
        registry.discard(process)
        raise
    process.program, process.stdin = program, program.child.stdin
    process.task = asyncio.ensure_future(_supervise(registry, process, limits))
    await connection.send_json({"ok": True, "process": process.describe()})
    await _feed(connection, process)


async def _supervise(registry: Registry, process: ManagedProcess, limits: Limits) -> None:
    assert process.program is not None
    try:
        timeout_s = None if process.timeout_ms is None else process.timeout_ms / 1000
        process.ending = await process.program.wait(timeout_s)
    finally:
        await process.program.close()
        if process.ending is None:  # cancelled: the agent is stopping
            process.ending = Ending(exit=None, signal=signals.SIGKILL, timed_out=False, duration_ms=0)
        process.stdin = None
        process.ended_at, process.ended_monotonic = time.time(), time.monotonic()
        process.log.wake()
        registry.ended(limits)


async def _feed(connection: Connection, process: ManagedProcess) -> None:
    while (message := await connection.read_frame()) is not None:
        kind, payload = message
        if kind != protocol.STDIN or process.stdin is None:
            continue
        stdin = process.stdin
        if not await programs.write_stdin(stdin, payload) and process.stdin is stdin:
            process.stdin = None


async def list_processes(registry: Registry, connection: Connection, request: dict[str, Any]) -> None:
    await connection.send_json({"ok": True, "processes": [p.describe() for p in registry.all()]})


async def get(registry: Registry, connection: Connection, request: dict[str, Any]) -> None:
    await connection.send_json({"ok": True, "process": registry.get(request).describe()})


async def input_(registry: Registry, connection: Connection, request: dict[str, Any]) -> None:
    process = registry.get(request)
    if process.stdin is None:
        why = "the process's stdin is closed" if process.ending is None else "the process ended"
        raise OpError("conflict", why)
    await connection.send_json({"ok": True})
    await _feed(connection, process)


async def signal(registry: Registry, connection: Connection, request: dict[str, Any]) -> None:
    process = registry.get(request)
    signum = request.get("signal")
    if not isinstance(signum, int) or signum not in set(signals.valid_signals()) or signum == 0:
        raise OpError("bad_request", "signal must be a signal's number")
    if process.ending is not None or process.program is None:
        raise OpError("conflict", "the process ended")
    await connection.send_json({"ok": True, "signalled": process.program.signal(signum)})


async def attach(registry: Registry, connection: Connection, request: dict[str, Any]) -> None:
    process = registry.get(request)
    offset = request.get("from", 0)
    if not isinstance(offset, int) or offset < 0:
        raise OpError("bad_request", "from must be a non-negative offset")
    offset = min(offset, process.log.end)
    await connection.send_json({"ok": True, "process": process.describe(), "offset": offset})
    # The gateway closing its side ends the stream: watched apart, since a quiet process writes nothing.
    gone = asyncio.ensure_future(_until_closed(connection))
    try:
        while not gone.done():
            gap, chunks, offset = process.log.read(offset)
            if gap is not None:
                await connection.send_json({"gap": {"from": gap[0], "to": gap[1]}})
            for kind, data in chunks:
                await connection.send(protocol.frame(kind, data))
            if process.ending is not None and offset == process.log.end:
                await connection.send_json({"exit": process.exit_message()})
                return
            changed = asyncio.ensure_future(process.log.next_change().wait())
            await asyncio.wait({changed, gone}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
    finally:
        gone.cancel()


async def _until_closed(connection: Connection) -> None:
    while await connection.read_frame() is not None:
        pass
