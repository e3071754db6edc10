"""The agent's listener: who may talk to it, the handshake, and the dispatch to an operation.

Only the gateway may: a connection whose peer is this sandbox itself (loopback, or its own address)
is closed at accept, before a byte is read, so user code cannot even try the secret, and a flood from
inside costs an accept and a close. From outside, Docker's published port on the host's 127.0.0.1 is
the only way in (inter-container traffic is off), and the first frame must carry the secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol
from .protocol import OpError, ProtocolError

log = logging.getLogger("sandbox_agent")

PORT = 49983
HANDSHAKE_TIMEOUT_S = 5.0
# Connections that have not yet shown the secret: past this many, new ones are closed at accept.
MAX_UNAUTHENTICATED = 64

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
        self._unauthenticated = 0
        self._servers: list[asyncio.Server] = []

    async def start(self, port: int = PORT) -> None:
        # Both families: the engine may reach the sandbox over either. Bound before anything else
        # is imported or started, so that the gateway's first connection finds it.
        self._servers.append(await asyncio.start_server(self._accept, "0.0.0.0", port, backlog=256))
        if socket.has_ipv6:
            try:
                self._servers.append(await asyncio.start_server(self._accept, "::", port, backlog=256))
            except OSError:
                pass  # no IPv6 in this sandbox (or the wildcard above took both)

    async def serve_forever(self) -> None:
        await asyncio.gather(*(server.serve_forever() for server in self._servers))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if _from_inside(writer) or self._unauthenticated >= MAX_UNAUTHENTICATED:
            writer.transport.abort()
            return
        self._unauthenticated += 1
        authenticated = False
        try:
            request = await self._handshake(reader)
            self._unauthenticated -= 1
            authenticated = True
            if request is None:
                return
            await self._dispatch(Connection(reader, writer), request)
        except (ProtocolError, ConnectionError, TimeoutError) as err:
            log.debug("connection ended: %r", err)
        except Exception:
            log.exception("operation failed")
        finally:
            if not authenticated:
                self._unauthenticated -= 1
            writer.transport.abort() if writer.transport.is_closing() else writer.close()

    async def _handshake(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
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
        op = request.get("op")
        handler = self._operations.get(op) if isinstance(op, str) else None
        try:
            if request.get("v") != protocol.VERSION:
                raise OpError("agent_version", f"this agent speaks version {protocol.VERSION}")
            if handler is None:
                raise OpError("unknown_op", f"no operation {op!r}")
            await handler(connection, request)
        except OpError as err:
            await connection.send_json(protocol.error_message(err.code, err.message))


def digest_of(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def _from_inside(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer is this sandbox: loopback, or its own address (the local end's)."""
    peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    if not peer or not local:
        return True
    address = ipaddress.ip_address(peer[0].split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback or peer[0] == local[0]
