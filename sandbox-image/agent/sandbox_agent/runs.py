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
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from . import programs, protocol
from .programs import MAX_TIMEOUT_MS, Program
from .protocol import OpError
from .server import Connection

log = logging.getLogger(__name__)

# Output past the cap is read and dropped no faster than this: a flood (`cat /dev/zero`) then waits on
# its full pipe instead of keeping the agent busy copying what nobody gets, and a program that prints
# only a little too much still ends on its own.
DISCARD_BYTES_PER_S = 1024 * 1024


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


def _parse(request: dict[str, Any]) -> tuple[list[str], bool, float, int]:
    argv = programs.parse_argv(request)
    timeout_ms, limit = request.get("timeout_ms"), request.get("max_output")
    if not isinstance(timeout_ms, int) or not 0 < timeout_ms <= MAX_TIMEOUT_MS:
        raise OpError("bad_request", "timeout_ms must be a positive integer")
    if not isinstance(limit, int) or limit < 0:
        raise OpError("bad_request", "max_output must be a non-negative integer")
    return argv, bool(request.get("stdin")), timeout_ms / 1000, limit


async def run(connection: Connection, request: dict[str, Any]) -> None:
    argv, has_stdin, timeout_s, limit = _parse(request)
    caps = _Caps(limit)

    async def forward(kind: bytes, data: bytes) -> None:
        if kept := caps.keep(kind, data):
            await connection.send(protocol.frame(kind, kept))
        if caps.truncated:
            await caps.hold_back()

    program = await Program.start(argv, forward, stdin=has_stdin)
    gateway: asyncio.Future[None] | None = None
    try:
        await connection.send_json({"ok": True, "pid": program.pid})
        # The gateway's side ending (it went away) ends the run too.
        gateway = asyncio.ensure_future(programs.feed_stdin(connection, program.child))
        ending = await program.wait(timeout_s, stop=gateway)
        if gateway.done():
            # Nobody is left to tell. Said in the log, since the gateway only sees the connection end
            # (a run cut this way under a fork bomb in gVisor, once in a loaded suite, is unexplained).
            cause = None if gateway.cancelled() else gateway.exception()
            log.info("run %d: the gateway's side ended before the program (%r)", program.pid, cause)
            return
        await connection.send_json(
            {
                "exit": ending.exit,
                "timed_out": ending.timed_out,
                "truncated": caps.truncated,
                "duration_ms": ending.duration_ms,
            }
        )
    finally:
        if gateway is not None:
            gateway.cancel()
        await program.close()
        if gateway is not None:
            await asyncio.gather(gateway, return_exceptions=True)
