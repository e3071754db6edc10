"""A preview WebSocket after the dev server's 101: the client's and the dev server's connections copy
into each other, transport to transport, until either closes. No frame is parsed: the browser and the
dev server speak WebSocket (subprotocol, pings, compression, close codes) to each other, as they do
through the fast proxies. Both transports end here: the front door hands over its connection's
transport, aiohttp its request's (whose parser then feeds the splice).

Backpressure both ways: a backed-up side pauses reading on the other. Bytes that crossed in an
interval count as activity, as terminal traffic does; a socket that only sits open does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from .activity import ActivityRecorder
from .metrics import Metrics
from .preview_headers import parse_answer_head
from .upstream import DevServer, RelaysExhausted, Target, UpstreamError, UpstreamPool, open_connection

# Above this much unsent toward the client, reading from the dev server waits (aiohttp's transports
# say nothing to a protocol that is not theirs, so the aiohttp side measures it itself).
CLIENT_HIGH_WATER = 256 * 1024


class _Pipe(asyncio.Protocol):
    """One side of a splice: what arrives on this side's transport goes to `forward`; while this
    side's transport is backed up, the `other` side stops reading what would be written to it."""

    def __init__(self, splice: Splice, forward: Callable[[bytes], None], other: asyncio.Transport) -> None:
        self._splice = splice
        self._forward = forward
        self._other = other

    def data_received(self, data: bytes) -> None:
        self._forward(data)

    def pause_writing(self) -> None:
        self._other.pause_reading()

    def resume_writing(self) -> None:
        self._other.resume_reading()

    def eof_received(self) -> bool:
        self._splice.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.close()


class _ClientFeed:
    """The client's side of a connection aiohttp serves: its protocol hands us the bytes in place of
    its HTTP parser, as it does for its own WebSocketResponse."""

    def __init__(self, splice: Splice) -> None:
        self._splice = splice

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._splice.to_upstream(data)
        return False, b""

    def feed_eof(self) -> None:
        self._splice.close()


class Splice:
    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        *,
        user: str,
        counts_activity: bool,
        activity: ActivityRecorder,
        metrics: Metrics,
        on_close: Callable[[Splice], None] | None = None,
    ) -> None:
        self.client_transport = client
        self.upstream = upstream
        self._user = user
        self._counts_activity = counts_activity
        self._activity = activity
        self._metrics = metrics
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self.moved = 0
        self._last_moved = 0
        self._draining: asyncio.Future[None] | None = None
        self._drain: Callable[[], asyncio.Future[None]] | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._recording: set[asyncio.Task[None]] = set()
        upstream.set_protocol(_Pipe(self, self.to_client, client))
        metrics.open_websockets.labels("preview").inc()
        self._timer = self._loop.call_later(activity.interval_s, self._record_activity)

    def start_on_transport(self, ahead: bytes, upstream_ahead: bytes) -> None:
        """For the front door: the client's transport becomes the splice's. `ahead`: what the
        client sent after its upgrade request; `upstream_ahead`: what followed the dev server's 101."""
        self.client_transport.set_protocol(_Pipe(self, self.to_upstream, self.upstream))
        self._start(ahead, upstream_ahead)

    def start_on_request(self, request: web.Request, upstream_ahead: bytes) -> None:
        """For aiohttp, once it has sent the 101 (the splice made with `request.transport`): the
        request's connection feeds the splice."""
        # Public since aiohttp 3.x for exactly this: WebSocketResponse hands the connection over the same way.
        request.protocol.set_parser(_ClientFeed(self))  # type: ignore[arg-type]
        writer = request.writer
        self._drain = lambda: asyncio.ensure_future(writer.drain())
        self._start(b"", upstream_ahead)

    def _start(self, ahead: bytes, upstream_ahead: bytes) -> None:
        if upstream_ahead:
            self.to_client(upstream_ahead)
        if ahead:
            self.to_upstream(ahead)

    def to_client(self, data: bytes) -> None:
        self.client_transport.write(data)
        self.moved += len(data)
        if (
            self._drain is not None
            and self._draining is None
            and self.client_transport.get_write_buffer_size() > CLIENT_HIGH_WATER
        ):
            self.upstream.pause_reading()
            self._draining = self._drain()
            self._draining.add_done_callback(self._drained)

    def _drained(self, _: asyncio.Future[None]) -> None:
        self._draining = None
        if not self.upstream.is_closing():
            self.upstream.resume_reading()

    def to_upstream(self, data: bytes) -> None:
        self.upstream.write(data)
        self.moved += len(data)

    def _record_activity(self) -> None:
        if self._counts_activity and self.moved != self._last_moved:
            self._last_moved = self.moved
            task = self._loop.create_task(self._activity.seen(self._user))
            self._recording.add(task)
            task.add_done_callback(self._recording.discard)
        self._timer = self._loop.call_later(self._activity.interval_s, self._record_activity)

    def close(self) -> None:
        if self.closed.done():
            return
        self.closed.set_result(None)
        self._timer.cancel()
        if self._draining is not None:
            self._draining.cancel()
        self.client_transport.close()
        self.upstream.close()
        self._metrics.open_websockets.labels("preview").dec()
        if self._on_close is not None:
            self._on_close(self)


# The dev server's answer to an upgrade: bounded in size and in time.
UPGRADE_HEAD_LIMIT = 64 * 1024
UPGRADE_ANSWER_S = 10.0


class UpgradeRefused(Exception):
    """Nothing answered the upgrade, or not with a head (a dev server not running yet, most likely)."""


class _UpgradeAnswer(asyncio.Protocol):
    """Reads the dev server's answer to the upgrade, and holds whatever follows it until the splice."""

    def __init__(self) -> None:
        self.head: asyncio.Future[tuple[int, list[tuple[str, str]]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._buffer = bytearray()
        self._end = -1
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.head.done():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > UPGRADE_HEAD_LIMIT:
                self.head.set_exception(UpgradeRefused("the dev server's answer has no end"))
            return
        self._end = end + 4
        try:
            self.head.set_result(parse_answer_head(bytes(self._buffer[: self._end])))
        except (ValueError, IndexError) as err:
            self.head.set_exception(UpgradeRefused(f"malformed answer: {err}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(UpgradeRefused("the dev server closed the connection"))

    def rest(self) -> bytes:
        return bytes(self._buffer[self._end :])


@dataclass(slots=True)
class UpgradeAnswer:
    transport: asyncio.Transport
    status: int
    headers: list[tuple[str, str]]
    ahead: bytes  # what the dev server sent after its head


async def upgrade_upstream(pool: UpstreamPool, target: Target, head: bytes) -> UpgradeAnswer:
    """Sends the upgrade request to the dev server at `target` and reads its answer. A 101's
    transport is the caller's to splice; any other answer's is already closed. RelaysExhausted when
    the sandbox's agent may relay no more."""
    try:
        answer, way = await pool.open(target, _UpgradeAnswer)
    except RelaysExhausted:
        raise
    except UpstreamError as err:
        raise UpgradeRefused(str(err)) from err
    try:
        return await _exchange(answer, head)
    except UpgradeRefused as err:
        # The default route's published port led nowhere: through the agent, as for HTTP (upstream.py).
        if not pool.may_retry(target, way, err.__cause__ or err):
            raise
    assert isinstance(target, DevServer)
    try:
        answer = await open_connection(target.relayed, _UpgradeAnswer)
    except RelaysExhausted:
        raise
    except UpstreamError as err:
        raise UpgradeRefused(str(err)) from err
    pool.reached_via_agent(target)
    return await _exchange(answer, head)


async def _exchange(answer: _UpgradeAnswer, head: bytes) -> UpgradeAnswer:
    transport = answer.transport
    assert transport is not None
    try:
        transport.write(head)
        status, headers = await asyncio.wait_for(answer.head, UPGRADE_ANSWER_S)
    except (OSError, TimeoutError, UpgradeRefused) as err:
        transport.close()
        raise UpgradeRefused(str(err)) from err
    except BaseException:
        transport.close()
        raise
    if status != 101:
        transport.close()
    return UpgradeAnswer(transport, status, headers, answer.rest())
