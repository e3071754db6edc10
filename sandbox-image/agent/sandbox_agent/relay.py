"""The "connect" operation: the gateway reaches any port of the sandbox through the agent, including
servers that listen on the sandbox's loopback only (Vite without --host, `python3 -m http.server
--bind 127.0.0.1`, Flask's and Next.js's defaults), which no published port can reach.

  gateway: J {"op": "connect", "port": P, "max_relays": N}
  agent:   J {"ok": true, "address": "127.0.0.1"} (where it connected), then raw bytes both ways
           or J {"ok": false, "error": {"code": "port_closed" | "bad_request" | "too_many", ...}}

After the answer there is no framing: the connection is the dev server's, so the gateway speaks
HTTP/1.1 and WebSocket over it as if it had connected directly. The gateway sends nothing after its
request until the answer (so nothing of its own sits in the request's buffer when the bytes start).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import Any

from . import protocol, server
from .protocol import OpError
from .server import Connection

CONNECT_TIMEOUT_S = 5.0
# The agent's own ceiling on relays open at once, whatever the gateway asks (its setting is lower).
MAX_RELAYS = 1024
_open_relays = 0


def _parse(request: dict[str, Any]) -> tuple[int, int]:
    port, limit = request.get("port"), request.get("max_relays", MAX_RELAYS)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise OpError("bad_request", "port must be an integer from 1 to 65535")
    if port == server.PORT:
        raise OpError("bad_request", f"port {server.PORT} is the sandbox agent's own")
    if not isinstance(limit, int) or limit < 1:
        raise OpError("bad_request", "max_relays must be a positive integer")
    return port, min(limit, MAX_RELAYS)


def _own_address(connection: Connection) -> str | None:
    """The sandbox's own non-loopback address: the local end of the gateway's connection."""
    local = connection.writer.get_extra_info("sockname")
    if not local:
        return None
    address = ipaddress.ip_address(local[0].split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return None if address.is_loopback or address.is_unspecified else str(address)


class _Side(asyncio.Protocol):
    """One side of a relay: what arrives on this side's transport is written to the other's; while
    this side's transport is backed up, the other side stops reading (the backpressure both ways)."""

    def __init__(self, relay: _Relay) -> None:
        self._relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        # What a server that speaks first sent before the gateway's side was ready (after the answer).
        self._early = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        other = self.other.transport if self.other is not None else None
        if other is None or self._early:
            self._early += data
            return
        other.write(data)

    def flush_early(self) -> None:
        """Once the other side is ready: what arrived before it."""
        if self._early and self.other is not None and self.other.transport is not None:
            self.other.transport.write(bytes(self._early))
            self._early.clear()

    def eof_received(self) -> bool:
        # A half-close goes on to the other side; this transport stays open for what comes back.
        other = self.other.transport if self.other is not None else None
        if other is not None and not other.is_closing() and other.can_write_eof():
            with contextlib.suppress(OSError):
                other.write_eof()
        self._relay.half_closed()
        return True

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if (
            self.other is not None
            and self.other.transport is not None
            and not self.other.transport.is_closing()
        ):
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.end()


class _Relay:
    """The gateway's connection and the server's, each with a `_Side`, copying transport to
    transport: no task and no buffer of our own between them."""

    def __init__(self) -> None:
        self.gateway, self.server = _Side(self), _Side(self)
        self.gateway.other, self.server.other = self.server, self.gateway
        self.done = asyncio.get_running_loop().create_future()
        self._halves = 0

    def half_closed(self) -> None:
        self._halves += 1
        if self._halves == 2:
            self.end()

    def end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _dial(relay: _Relay, port: int, hosts: list[str]) -> str:
    """Connects to the first of `hosts` where something listens on `port`; returns that host."""
    loop = asyncio.get_running_loop()
    for host in hosts:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await loop.create_connection(lambda: relay.server, host, port)
        except (OSError, TimeoutError):
            # Refused, or no such address here (no IPv6 loopback in this sandbox): the next one.
            continue
        return host
    raise OpError("port_closed", f"nothing listens on port {port} in the sandbox")


async def connect(connection: Connection, request: dict[str, Any]) -> None:
    global _open_relays
    port, limit = _parse(request)
    if _open_relays >= limit:
        raise OpError("too_many", f"{limit} connections to the sandbox's ports are open already")
    _open_relays += 1
    relay = _Relay()
    try:
        hosts = ["127.0.0.1"] + (["::1"] if socket.has_ipv6 else [])
        if (own := _own_address(connection)) is not None:
            hosts.append(own)
        address = await _dial(relay, port, hosts)
        # The gateway's connection is the relay's from here: its transport gets the relay's protocol
        # before the answer goes out, so that no byte the gateway sends after reading it can land in
        # the request's stream reader (the gateway sends nothing before it).
        transport = connection.writer.transport
        transport.set_protocol(relay.gateway)
        relay.gateway.connection_made(transport)
        transport.write(protocol.json_frame({"ok": True, "address": address}))
        relay.server.flush_early()
        await relay.done
    finally:
        _open_relays -= 1
        if relay.server.transport is not None:
            relay.server.transport.close()
