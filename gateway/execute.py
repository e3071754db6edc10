"""Running a snippet in a sandbox: the agent's "run" operation (sandbox-image/agent/sandbox_agent/runs.py),
its output captured with caps, a hard timeout.

The agent starts the program as `sandbox`, ends it at its timeout with every process it started (a
busy loop, a forked, detached child), caps its output and drops the rest slowly, and ends the run if
this gateway goes away. The gateway keeps its own caps and deadline: it trusts nothing to be bounded
that comes out of a sandbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from . import agent, agent_protocol
from .agent import AgentAddress
from .errors import AgentUnavailable
from .settings import ExecSettings
from .user_slots import UserSlots

log = logging.getLogger(__name__)

Language = Literal["node", "python", "bash"]

# The code is an argv element: it never passes through a shell of ours.
PROGRAMS: dict[Language, list[str]] = {
    "node": ["node", "-e"],
    # -u: what a snippet printed before it was killed must not die in a buffer.
    "python": ["python3", "-u", "-c"],
    "bash": ["bash", "-c"],
}
STDOUT, STDERR = agent_protocol.STDOUT, agent_protocol.STDERR
# Past the run's timeout, how long the agent may take to end it, sweep and drain its output (its own
# drain wait is 5 s) before this gateway stops waiting and drops the connection, which ends the run too.
AGENT_GRACE_S = 10.0


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

    def add(self, stream: bytes, data: bytes) -> None:
        buffer = self.stdout if stream == STDOUT else self.stderr
        room = max(self.limit - len(buffer), 0)
        if len(data) > room:
            self.truncated = True
            data = data[:room]
        buffer += data


class ExecRunner:
    def __init__(self, settings: ExecSettings) -> None:
        self._settings = settings
        limit = settings.max_concurrent_per_user
        self._in_flight = UserSlots(limit, f"at most {limit} runs at a time per user; wait for one to finish")

    def slot(self, user: str) -> AbstractAsyncContextManager[None]:
        """A run in flight for `user`, or TooManyRequests past the per-user bound."""
        return self._in_flight.slot(user)

    async def run(self, address: AgentAddress, request: ExecRequest) -> ExecResult:
        program = [*PROGRAMS[request.language], request.code]
        return await self.run_program(address, program, request.stdin, request.timeout_ms)

    async def run_program(
        self, address: AgentAddress, program: list[str], stdin: bytes, timeout_ms: int
    ) -> ExecResult:
        """Runs argv `program` as a run: stdin, output caps, timeout and the process-tree sweep."""
        output = _Output(self._settings.max_output_bytes)
        started = time.monotonic()
        params: dict[str, Any] = {
            "argv": program,
            "stdin": bool(stdin),
            "timeout_ms": timeout_ms,
            "max_output": self._settings.max_output_bytes,
        }
        async with agent.operation(address, "run", **params) as stream:
            if stdin:
                feeder = asyncio.ensure_future(_feed(stream, stdin))
            try:
                async with asyncio.timeout(timeout_ms / 1000 + AGENT_GRACE_S):
                    end = await _collect(stream, output)
            except TimeoutError:
                raise AgentUnavailable("the sandbox's agent did not end the run at its timeout") from None
            finally:
                if stdin:
                    feeder.cancel()
        return ExecResult(
            stdout=output.stdout.decode("utf-8", errors="replace"),
            stderr=output.stderr.decode("utf-8", errors="replace"),
            exit_code=end.get("exit"),
            timed_out=bool(end.get("timed_out")),
            truncated=output.truncated or bool(end.get("truncated")),
            duration_ms=int(end.get("duration_ms") or round((time.monotonic() - started) * 1000)),
        )


async def _collect(stream: agent.AgentStream, output: _Output) -> dict[str, Any]:
    """Output frames until the run's end (a J frame); raises AgentUnavailable if the agent breaks off."""
    while (message := await stream.read_frame()) is not None:
        kind, payload = message
        if kind == agent_protocol.JSON:
            return agent_protocol.parse_json(payload)
        output.add(kind, payload)
    raise AgentUnavailable("the sandbox's agent ended the run's connection before its end")


async def _feed(stream: agent.AgentStream, stdin: bytes) -> None:
    """The input in frames, then its end; the program may exit first, and the agent drop the rest."""
    try:
        for start in range(0, len(stdin), agent_protocol.MAX_FRAME):
            await stream.send(agent_protocol.STDIN, stdin[start : start + agent_protocol.MAX_FRAME])
        await stream.send(agent_protocol.STDIN, b"")
    except ConnectionError:
        pass
