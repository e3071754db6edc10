"""The agent's listener: who may talk to it, the handshake, and the dispatch to an operation.

Only the gateway may: a connection whose peer is this sandbox itself (loopback, or its own address)
is closed at accept, before a byte is read, so user code cannot even try the secret, and a flood from
inside costs an accept and a close. From outside, Docker's published port on the host's 127.0.0.1 is
the only way in (inter-container traffic is off), and the first frame must carry the secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol
from .protocol import OpError, ProtocolError

log = logging.getLogger("sandbox_agent")

PORT = 49983
# The gateway sends its request the moment it connects: a connection that shows nothing for this long
# is not the gateway's.
HANDSHAKE_TIMEOUT_S = 2.0
# Connections that have not yet shown the secret: past this many, the oldest is dropped for the new
# one. Something on the host that holds connections open without a secret then cannot keep the
# gateway out, whose own handshake completes within a round trip of its connect.
MAX_UNAUTHENTICATED = 64
# How long a finished operation's connection keeps reading what the gateway still sends (see _linger).
LINGER_S = 2.0
LINGER_READ = 64 * 1024
# Connections taken from a listener's backlog at one wake-up, before other work gets a turn.
ACCEPT_BATCH = 256
BACKLOG = 1024
# How long a listener rests after an accept fails (out of descriptors) before it tries again.
ACCEPT_RETRY_S = 1.0

Handler = Callable[["Connection", dict[str, Any]], Awaitable[None]]


class Connection:
    """One operation's connection, after the handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        # The backpressure toward a gateway that reads slowly: the producer waits here.
        await self.writer.drain()

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send(protocol.json_frame(message))

    async def read_frame(self) -> tuple[bytes, bytes] | None:
        return await protocol.read_frame(self.reader)


class AgentServer:
    def __init__(self, secret_digest: str, operations: dict[str, Handler]) -> None:
        # Only the digest is known here: what a connection shows is hashed and compared with it.
        self._digest = secret_digest.lower().encode()
        self._operations = operations
        # Transports still in their handshake, oldest first (dicts keep insertion order).
        self._unauthenticated: dict[asyncio.WriteTransport, None] = {}
        self._listeners: list[socket.socket] = []
        # The connections being served (the loop holds tasks weakly).
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self, port: int = PORT) -> None:
        # Both families: the engine may reach the sandbox over either. Bound before anything else
        # is imported or started, so that the gateway's first connection finds it.
        # Every interface of the sandbox: Docker's proxy comes in on its bridge address, and what comes
        # from inside is refused at accept (_from_inside).
        self._listeners.append(_listening(socket.AF_INET, "0.0.0.0", port))  # noqa: S104
        if socket.has_ipv6:
            # No IPv6 in this sandbox is no error.
            with contextlib.suppress(OSError):
                self._listeners.append(_listening(socket.AF_INET6, "::", port))
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.add_reader(listener, self._accept_ready, listener)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_future()
        finally:
            for listener in self._listeners:
                loop.remove_reader(listener)
                listener.close()

    def _accept_ready(self, listener: socket.socket) -> None:
        """Takes what the listener's backlog holds. A connection from inside is closed here, on the bare
        socket, before asyncio makes a transport, a protocol and a task for it: a flood from inside
        then costs a few microseconds a connection, so the backlog keeps draining, and the gateway's
        connection is not among those the kernel drops when it is full (it would wait a SYN
        retransmission, a second or more)."""
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                connection, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # Out of descriptors, most likely: the backlog waits a while rather than spin.
                log.warning("accept failed, resting %g s: %s", ACCEPT_RETRY_S, err)
                loop.remove_reader(listener)
                loop.call_later(ACCEPT_RETRY_S, self._resume, listener)
                return
            if _from_inside(peer, connection.getsockname()):
                # A reset, not a FIN: no TIME_WAIT left behind for each of a flood's connections.
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()
                continue
            connection.setblocking(False)
            task = loop.create_task(self._serve(connection))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    def _resume(self, listener: socket.socket) -> None:
        # Not on a listener serve_forever has closed meanwhile (fileno -1).
        if listener.fileno() != -1:
            asyncio.get_running_loop().add_reader(listener, self._accept_ready, listener)

    async def _serve(self, connection: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=connection)
        except OSError:
            connection.close()
            return
        if len(self._unauthenticated) >= MAX_UNAUTHENTICATED:
            oldest = next(iter(self._unauthenticated))
            del self._unauthenticated[oldest]
            oldest.abort()
        self._unauthenticated[writer.transport] = None
        try:
            request = await self._handshake(reader)
            self._unauthenticated.pop(writer.transport, None)
            await self._dispatch(Connection(reader, writer), request)
        except (ProtocolError, ConnectionError, TimeoutError) as err:
            log.debug("connection ended: %r", err)
            writer.transport.abort()
        except Exception:
            log.exception("operation failed")
        finally:
            self._unauthenticated.pop(writer.transport, None)
            await _linger(reader, writer)

    async def _handshake(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            first = await protocol.read_frame(reader)
        if first is None or first[0] != protocol.JSON:
            raise ProtocolError("the first frame must be the request")
        request = protocol.parse_json(first[1])
        secret = request.pop("secret", None)
        shown = digest_of(secret.encode()).encode() if isinstance(secret, str) else b""
        if not hmac.compare_digest(shown, self._digest):
            raise ProtocolError("refused: no valid secret")
        return request

    async def _dispatch(self, connection: Connection, request: dict[str, Any]) -> None:
        try:
            await self._handler(request)(connection, request)
        except OpError as err:
            await connection.send_json(protocol.error_message(err.code, err.message))

    def _handler(self, request: dict[str, Any]) -> Handler:
        if request.get("v") != protocol.VERSION:
            raise OpError("agent_version", f"this agent speaks version {protocol.VERSION}")
        op = request.get("op")
        handler = self._operations.get(op) if isinstance(op, str) else None
        if handler is None:
            raise OpError("unknown_op", f"no operation {op!r}")
        return handler


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Closes a finished operation's connection as HTTP servers do a lingering close: our side ends
    first, and what the gateway still sends is read and dropped until it closes too (at most LINGER_S).
    Closing with input unread makes the kernel send a reset, and a reset can take with it what the
    gateway had not read yet: a run's end, when its program exited without reading a large stdin that
    the gateway was still writing (the gateway's write then fails, and its stream reader raises the
    error before the frames it holds)."""
    if writer.is_closing():
        return
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(LINGER_READ):
                pass
    except (ConnectionError, TimeoutError, OSError):
        pass
    finally:
        writer.close()


def digest_of(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def _listening(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((host, port))
        listener.listen(BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def _from_inside(peer: Any, local: Any) -> bool:
    """Whether the peer is this sandbox: loopback, or its own address (the local end's)."""
    if not peer or not local:
        return True
    address = ipaddress.ip_address(peer[0].split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback or peer[0] == local[0]
