"""The gateway's side of the agent in each sandbox (sandbox-image/agent): one connection per operation.

The agent is reached at the port Docker publishes for it on 127.0.0.1, with the secret the gateway
made for the sandbox at its start (both in the session's row), so any gateway process can talk to any
sandbox. These connections are the gateway's own: no engine connection pool is involved, so open
terminals and streams can never take the slots of calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, cast

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
async def operation(
    address: AgentAddress, op: str, *, answer_timeout_s: float = ANSWER_TIMEOUT_S, **params: Any
) -> AsyncIterator[AgentStream]:
    """A connection to the agent carrying `op`: yields once the agent accepted it. Raises
    AgentUnavailable when the agent cannot be reached, AgentFailed with its code when it refuses.
    An operation that works before it answers (a recursive delete) may take longer than the default."""
    stream = await _open(address, op, params, answer_timeout_s)
    try:
        yield stream
    finally:
        stream.close()
        with suppress(ConnectionError):
            await stream.writer.wait_closed()


async def _open(
    address: AgentAddress, op: str, params: dict[str, Any], answer_timeout_s: float
) -> AgentStream:
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(address.host, address.port)
    except (OSError, TimeoutError) as err:
        raise AgentUnavailable(f"the sandbox's agent does not answer: {err!r}") from err
    try:
        request = {"v": protocol.VERSION, "secret": address.secret, "op": op, **params}
        writer.write(protocol.json_frame(request))
        async with asyncio.timeout(answer_timeout_s):
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


class _RelayAnswer(asyncio.Protocol):
    """Reads the agent's answer to "connect"; what follows it is the sandbox server's, and is kept
    for the protocol that takes the connection over."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.rest = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            self.rest += data
            return
        self._buffer += data
        if len(self._buffer) < protocol.HEADER.size:
            return
        kind, length = protocol.HEADER.unpack_from(self._buffer)
        if kind != protocol.JSON or length > protocol.MAX_FRAME:
            self.answer.set_exception(AgentUnavailable("the sandbox's agent broke the protocol"))
            return
        end = protocol.HEADER.size + length
        if len(self._buffer) < end:
            return
        try:
            self.answer.set_result(protocol.parse_json(bytes(self._buffer[protocol.HEADER.size : end])))
        except protocol.ProtocolError as err:
            self.answer.set_exception(AgentUnavailable(f"the sandbox's agent broke the protocol: {err}"))
            return
        self.rest = bytes(self._buffer[end:])
        # Nothing more until the protocol that takes over is in place.
        assert self.transport is not None
        self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            # Docker's proxy accepts and then closes when the agent is not (yet, or any more) listening.
            self.answer.set_exception(AgentUnavailable("the sandbox's agent closed the connection"))


async def relay(
    address: AgentAddress, port: int, max_relays: int, take_over: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """A connection to `port` inside the sandbox through its agent's "connect", handed to the
    protocol `take_over` makes once the agent connected, as if it had been connected there directly.
    Raises AgentUnavailable, or AgentFailed (code port_closed when nothing listens there)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            transport, handshake = await loop.create_connection(_RelayAnswer, address.host, address.port)
    except (OSError, TimeoutError) as err:
        raise AgentUnavailable(f"the sandbox's agent does not answer: {err!r}") from err
    try:
        await _relay_answer(transport, handshake, address, port, max_relays)
    except BaseException:
        transport.close()
        raise
    taker = take_over()
    transport.set_protocol(taker)
    taker.connection_made(transport)
    if handshake.rest:
        taker.data_received(handshake.rest)
    transport.resume_reading()
    return transport, taker


async def _relay_answer(
    transport: asyncio.BaseTransport,
    handshake: _RelayAnswer,
    address: AgentAddress,
    port: int,
    max_relays: int,
) -> None:
    request = {"v": protocol.VERSION, "secret": address.secret, "op": "connect", "port": port}
    cast(asyncio.Transport, transport).write(protocol.json_frame({**request, "max_relays": max_relays}))
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            answer = await handshake.answer
    except TimeoutError as err:
        raise AgentUnavailable("the sandbox's agent does not answer") from err
    if not answer.get("ok"):
        error = answer.get("error") or {}
        raise AgentFailed(
            str(error.get("code", "agent_error")), str(error.get("message", "the agent refused"))
        )
    if transport.is_closing():
        raise AgentUnavailable("the sandbox's agent closed the connection")
