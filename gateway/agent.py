"""The gateway's side of the agent in each sandbox (sandbox-image/agent): one connection per operation.

The agent is reached at the port Docker publishes for it on 127.0.0.1, with the secret the gateway
made for the sandbox at its start (both in the session's row), so any gateway process can talk to any
sandbox. These connections are the gateway's own: no engine connection pool is involved, so open
terminals and streams can never take the slots of calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from . import agent_protocol as protocol
from .errors import AgentFailed, AgentUnavailable

CONNECT_TIMEOUT_S = 5.0
# How long a new sandbox's agent may take to listen (it takes well under 100 ms, more under gVisor).
READY_TIMEOUT_S = 15.0
READY_POLL_S = 0.005
# The agent answers the request (or refuses it) at once; a start of a program is in this too.
ANSWER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class AgentAddress:
    host: str
    port: int
    secret: str = field(repr=False)


class AgentStream:
    """One operation's connection, after the agent accepted the request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: dict[str, Any]):
        self.reader, self.writer, self.answer = reader, writer, answer

    async def send(self, kind: bytes, payload: bytes) -> None:
        self.writer.write(protocol.frame(kind, payload))
        await self.writer.drain()

    async def send_json(self, message: dict[str, Any]) -> None:
        self.writer.write(protocol.json_frame(message))
        await self.writer.drain()

    async def read_frame(self) -> tuple[bytes, bytes] | None:
        """The next frame, or None when the agent ended the connection; AgentUnavailable if it broke."""
        try:
            return await protocol.read_frame(self.reader)
        except (protocol.ProtocolError, ConnectionError) as err:
            raise AgentUnavailable(f"the sandbox's agent broke the connection: {err}") from err

    def close(self) -> None:
        self.writer.close()


@asynccontextmanager
async def operation(address: AgentAddress, op: str, **params: Any) -> AsyncIterator[AgentStream]:
    """A connection to the agent carrying `op`: yields once the agent accepted it. Raises
    AgentUnavailable when the agent cannot be reached, AgentFailed with its code when it refuses."""
    stream = await _open(address, op, params)
    try:
        yield stream
    finally:
        stream.close()
        with suppress(ConnectionError):
            await stream.writer.wait_closed()


async def _open(address: AgentAddress, op: str, params: dict[str, Any]) -> AgentStream:
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(address.host, address.port)
    except (OSError, TimeoutError) as err:
        raise AgentUnavailable(f"the sandbox's agent does not answer: {err!r}") from err
    try:
        request = {"v": protocol.VERSION, "secret": address.secret, "op": op, **params}
        writer.write(protocol.json_frame(request))
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            first = await protocol.read_frame(reader)
    except (OSError, TimeoutError, protocol.ProtocolError) as err:
        writer.close()
        raise AgentUnavailable(f"the sandbox's agent does not answer: {err!r}") from err
    if first is None or first[0] != protocol.JSON:
        writer.close()
        # Docker's proxy accepts and then closes when the agent is not (yet, or any more) listening.
        raise AgentUnavailable("the sandbox's agent closed the connection")
    answer = json.loads(first[1])
    if not answer.get("ok"):
        writer.close()
        error = answer.get("error") or {}
        raise AgentFailed(
            str(error.get("code", "agent_error")), str(error.get("message", "the agent refused"))
        )
    return AgentStream(reader, writer, answer)


async def wait_ready(address: AgentAddress, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Returns once the agent answers; AgentUnavailable if it does not within timeout_s. Until the
    agent listens, Docker's proxy accepts connections and closes them."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            async with operation(address, "ping"):
                return
        except AgentUnavailable:
            if asyncio.get_running_loop().time() >= deadline:
                raise
        await asyncio.sleep(READY_POLL_S)
