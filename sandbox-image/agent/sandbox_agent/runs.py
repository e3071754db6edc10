"""The "run" operation: one program from start to end on its connection, as POST /api/sandbox/exec.

  gateway: J {"op": "run", "argv": [...], "stdin": bool, "timeout_ms": N, "max_output": N}
           then, if stdin, 0 frames of input and an empty 0 frame for its end
  agent:   J {"ok": true, "pid": P}, 1 and 2 frames as the program writes them, then
           J {"exit": code or null, "timed_out": bool, "truncated": bool, "duration_ms": N}

The agent ends the run at its timeout, kills every process the program started when it ends (its
tag, spawn.py), and ends it too when the gateway's connection goes: no run outlives its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from . import protocol, spawn
from .protocol import OpError
from .server import Connection

# After the program's end and the sweep, how long its pipes may take to drain.
DRAIN_TIMEOUT_S = 5.0
# Output past the cap is read and dropped no faster than this: a flood (`cat /dev/zero`) then waits on
# its full pipe instead of keeping the agent busy copying what nobody gets, and a program that prints
# only a little too much still ends on its own.
DISCARD_BYTES_PER_S = 1024 * 1024
READ_CHUNK = 64 * 1024
MAX_TIMEOUT_MS = 24 * 3600 * 1000


@dataclass
class _Caps:
    """Forwards the first `limit` bytes of each stream, drops the rest, and notes that it did."""

    limit: int
    sent: dict[bytes, int] = field(default_factory=lambda: {protocol.STDOUT: 0, protocol.STDERR: 0})
    dropped: int = 0
    first_dropped_at: float = 0.0

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def keep(self, kind: bytes, data: bytes) -> bytes:
        room = max(self.limit - self.sent[kind], 0)
        if len(data) > room:
            if not self.dropped:
                self.first_dropped_at = time.monotonic()
            self.dropped += len(data) - room
            data = data[:room]
        self.sent[kind] += len(data)
        return data

    async def hold_back(self) -> None:
        due = self.first_dropped_at + self.dropped / DISCARD_BYTES_PER_S
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)


def exit_status(returncode: int | None) -> int | None:
    """As a shell reports it: 128 + the signal's number for a program a signal ended."""
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


def _parse(request: dict[str, Any]) -> tuple[list[str], bool, float, int]:
    argv, timeout_ms, limit = request.get("argv"), request.get("timeout_ms"), request.get("max_output")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise OpError("bad_request", "argv must be a non-empty list of strings")
    if not isinstance(timeout_ms, int) or not 0 < timeout_ms <= MAX_TIMEOUT_MS:
        raise OpError("bad_request", "timeout_ms must be a positive integer")
    if not isinstance(limit, int) or limit < 0:
        raise OpError("bad_request", "max_output must be a non-negative integer")
    return argv, bool(request.get("stdin")), timeout_ms / 1000, limit


async def run(connection: Connection, request: dict[str, Any]) -> None:
    argv, has_stdin, timeout_s, limit = _parse(request)
    tag = spawn.new_tag()
    started = time.monotonic()
    try:
        stdin = asyncio.subprocess.PIPE if has_stdin else asyncio.subprocess.DEVNULL
        process = await spawn.spawn(argv, tag=tag, env=spawn.base_environment(), stdin=stdin)
    except OSError as err:
        raise OpError("spawn_failed", f"could not start {argv[0]}: {err.strerror}") from None
    await connection.send_json({"ok": True, "pid": process.pid})
    caps = _Caps(limit)
    assert process.stdout is not None
    assert process.stderr is not None
    pumps = [
        asyncio.ensure_future(_pump(process.stdout, protocol.STDOUT, connection, caps)),
        asyncio.ensure_future(_pump(process.stderr, protocol.STDERR, connection, caps)),
    ]
    gateway = asyncio.ensure_future(_from_gateway(connection, process))
    timed_out = False
    try:
        exited = process.exited
        done, _ = await asyncio.wait(
            {exited, gateway}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if exited not in done:
            # The timeout, or the gateway went away: either way the run ends now, all of it.
            timed_out = gateway not in done
            _kill(process, tag)
            await exited
        # What the program left behind (a forked, detached or setsid child) ends with it.
        spawn.kill_tagged(tag)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await asyncio.gather(*pumps)
        if gateway in done:
            return  # nobody is left to tell
        await connection.send_json(
            {
                "exit": exit_status(process.returncode),
                "timed_out": timed_out,
                "truncated": caps.truncated,
                "duration_ms": round((time.monotonic() - started) * 1000),
            }
        )
    finally:
        for task in (*pumps, gateway):
            task.cancel()
        if process.returncode is None:
            _kill(process, tag)
        await asyncio.gather(*pumps, gateway, return_exceptions=True)


def _kill(process: spawn.Child, tag: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    spawn.signal_tagged(tag, signal.SIGKILL)


async def _pump(pipe: asyncio.StreamReader, kind: bytes, connection: Connection, caps: _Caps) -> None:
    while data := await pipe.read(READ_CHUNK):
        if kept := caps.keep(kind, data):
            await connection.send(protocol.frame(kind, kept))
        if caps.truncated:
            await caps.hold_back()


async def _from_gateway(connection: Connection, process: spawn.Child) -> None:
    """Feeds stdin from the gateway's frames; returns when the gateway's side of the connection ends."""
    stdin = process.stdin
    while (message := await connection.read_frame()) is not None:
        kind, payload = message
        if kind != protocol.STDIN or stdin is None:
            continue
        try:
            if not payload:
                stdin.close()
                stdin = None
                continue
            stdin.write(payload)
            await stdin.drain()
        except (ConnectionError, BrokenPipeError):
            # The program ended or closed its stdin: the rest of the input has nowhere to go.
            stdin = None
