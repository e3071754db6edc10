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

from . import server
from .protocol import OpError
from .server import Connection

CONNECT_TIMEOUT_S = 5.0
# The agent's own ceiling on relays open at once, whatever the gateway asks (its setting is lower).
MAX_RELAYS = 1024
READ_CHUNK = 256 * 1024
# Above this much unsent toward the gateway, reading from the sandbox's server waits.
HIGH_WATER = 256 * 1024

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


class _FromServer(asyncio.Protocol):
    """The sandbox server's side: what it sends goes to the gateway, as it comes."""

    def __init__(self, relay: _Relay) -> None:
        self._relay = relay
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self._relay.to_gateway(data)

    def eof_received(self) -> bool:
        self._relay.server_ended()
        return True  # the gateway may still be sending: keep our half open

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        self._relay.end()


class _Relay:
    def __init__(self, connection: Connection) -> None:
        self._gateway = connection
        self._gateway_transport = connection.writer.transport
        self.server: asyncio.Transport | None = None
        self.protocol = _FromServer(self)
        self.done = asyncio.get_running_loop().create_future()
        self._draining: asyncio.Future[None] | None = None
        self._halves = 0

    def to_gateway(self, data: bytes) -> None:
        transport = self._gateway_transport
        transport.write(data)
        if self._draining is None and transport.get_write_buffer_size() > HIGH_WATER and self.server:
            # The backpressure toward a gateway that reads slowly: stop reading the server until
            # what is queued for the gateway has gone.
            self.server.pause_reading()
            self._draining = asyncio.ensure_future(self._gateway.writer.drain())
            self._draining.add_done_callback(self._drained)

    def _drained(self, _: asyncio.Future[None]) -> None:
        self._draining = None
        if self.server is not None and not self.server.is_closing():
            self.server.resume_reading()

    def server_ended(self) -> None:
        if self._gateway_transport.can_write_eof():
            with contextlib.suppress(OSError):
                self._gateway_transport.write_eof()
        self._half_closed()

    def _half_closed(self) -> None:
        self._halves += 1
        if self._halves == 2:
            self.end()

    async def from_gateway(self) -> None:
        reader = self._gateway.reader
        try:
            while data := await reader.read(READ_CHUNK):
                if self.server is None or self.server.is_closing():
                    self.end()
                    return
                self.server.write(data)
                # The backpressure toward the sandbox's server: the gateway's bytes wait in its own
                # buffer (the reader stops reading past its limit) while the server's is full.
                await self.protocol.writable.wait()
        except ConnectionError:
            self.end()
            return
        if self.server is not None and not self.server.is_closing() and self.server.can_write_eof():
            with contextlib.suppress(OSError):
                self.server.write_eof()
        self._half_closed()

    def end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _dial(relay: _Relay, port: int, hosts: list[str]) -> str:
    """Connects to the first of `hosts` where something listens on `port`; returns that host."""
    loop = asyncio.get_running_loop()
    for host in hosts:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                transport, _ = await loop.create_connection(lambda: relay.protocol, host, port)
        except (OSError, TimeoutError):
            # Refused, or no such address here (no IPv6 loopback in this sandbox): the next one.
            continue
        relay.server = transport
        return host
    raise OpError("port_closed", f"nothing listens on port {port} in the sandbox")


async def connect(connection: Connection, request: dict[str, Any]) -> None:
    global _open_relays
    port, limit = _parse(request)
    if _open_relays >= limit:
        raise OpError("too_many", f"{limit} connections to the sandbox's ports are open already")
    _open_relays += 1
    relay = _Relay(connection)
    pump: asyncio.Future[None] | None = None
    try:
        hosts = ["127.0.0.1"] + (["::1"] if socket.has_ipv6 else [])
        if (own := _own_address(connection)) is not None:
            hosts.append(own)
        address = await _dial(relay, port, hosts)
        await connection.send_json({"ok": True, "address": address})
        pump = asyncio.ensure_future(relay.from_gateway())
        await relay.done
    finally:
        _open_relays -= 1
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if relay.server is not None:
            relay.server.close()
