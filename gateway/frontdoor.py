"""The listener's front door: every connection is read here first. The preview requests that make up
nearly all of a dev server's traffic, bodiless GET and HEAD and the HMR WebSocket, are proxied here on
asyncio's protocol level; every other connection is handed to aiohttp, whole, for the rest of its life.

aiohttp's server costs more per request than the proxying itself (bench/proxy.py: a bare aiohttp
handler answers in three times the time a bare protocol does), which is what stood between the preview
and its latency target. So the front door takes only requests it can judge cheaply and exactly: a
strict subset of HTTP/1.1 (http1.py), admitted by the same gate aiohttp asks (preview_access.py), and
hands over anything else before it has written a byte: bodies, odd heads, the app's own requests,
errors of any kind, which aiohttp then answers as it always has. The hand-over replays the bytes read
so far into aiohttp's protocol. Answers are written by door_answers.py; WebSockets, after the dev
server's 101, are spliced by splice.py, as aiohttp's are.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from aiohttp import web
from aiohttp.log import access_logger

from .access_log import log_access
from .app import KEEPALIVE_S
from .connections import (
    REFUSAL_ANSWERS,
    Refusal,
    Slot,
)
from .door_answers import answer_now, response_head, stream_answer, timed_out, upgrade_refused
from .errors import GatewayError
from .http1 import HEAD_LIMIT, Head, HeadParser, may_be_fast, parse_head
from .keys import METRICS, PREVIEW_GATE, SETTINGS, UPSTREAM
from .logs import HEADER as REQUEST_ID_HEADER
from .logs import current_request_id, request_id_for
from .metrics import Metrics
from .preview_access import PATH_ROUTE_LABEL, ROOT_ROUTE_LABEL, Admitted, PreviewGate, PreviewRequest, Route
from .preview_headers import request_head, upgrade_head, upgrade_response_headers, upstream_headers
from .settings import Settings
from .splice import Splice, UpgradeRefused, upgrade_upstream
from .upstream import Response, UpstreamConnection, UpstreamError, UpstreamPool, UpstreamTimeout

if TYPE_CHECKING:
    # server.py makes the doors; a door only reads its server's state.
    from .server import GatewayServer

log = logging.getLogger(__name__)

# Bytes a client may send ahead (pipelining) before reading from it pauses.
READ_AHEAD = 256 * 1024


class HandOver(Exception):
    """The request is aiohttp's to answer; nothing of a response has been written."""


def seen_by_admission(request: Head) -> PreviewRequest | None:
    host = request.header("host")
    if host is None:
        return None
    return PreviewRequest(
        host=host,
        path=request.target.split("?", 1)[0],
        authorization=request.header("authorization"),
        cookie=request.header("cookie"),
        origin=request.header("origin"),
        upgrade=request.upgrade,
    )


@dataclass(frozen=True, slots=True)
class Deps:
    """The app's shared objects the door uses on every request, looked up once: each app lookup is
    a Python call, and the door's whole work per request is a few dozen."""

    settings: Settings
    gate: PreviewGate
    upstream: UpstreamPool
    metrics: Metrics

    @classmethod
    def of(cls, app: web.Application) -> Deps:
        return cls(
            settings=app[SETTINGS], gate=app[PREVIEW_GATE], upstream=app[UPSTREAM], metrics=app[METRICS]
        )


class FrontDoor(asyncio.Protocol):
    def __init__(self, server: GatewayServer) -> None:
        self._server = server
        # Kept: get_running_loop() makes a getpid() system call, and _used runs on every request.
        self._loop = asyncio.get_running_loop()
        self._parser: HeadParser | None = None
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._busy = False  # a request is being answered, with or without a task
        self.task: asyncio.Task[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._reading_paused = False
        self._closing = False
        self._last_used = 0.0
        self._in_flight: UpstreamConnection | None = None  # a request sent without a task of its own
        self._idle_check: asyncio.TimerHandle | None = None
        # When the request head being read began (the accept, for the first); None between heads.
        self._head_since: float | None = None
        self._slot: Slot | None = None  # None: refused, or the connection is no longer the door's
        self.remote = ""

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        admitted = self._server.client_connections.admit(self.remote)
        if not isinstance(admitted, Slot):
            self._refuse(admitted)
            return
        self._slot = admitted
        self._server.doors.add(self)
        loop = self._loop
        self._last_used = self._head_since = loop.time()
        self._idle_check = loop.call_at(self._head_since + self._server.head_timeout_s, self._check_idle)

    def _refuse(self, reason: Refusal) -> None:
        """Before a byte is read: a refusal costs the gateway one descriptor for a moment."""
        self._server.refused[reason].inc()
        assert self._transport is not None
        self._transport.write(REFUSAL_ANSWERS[reason])
        self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._slot is None:
            return  # refused: closing already
        self._buffer += data
        if not self._busy:
            self._next_request()
        elif len(self._buffer) > READ_AHEAD and self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        # The client closed its side: the connection ends now, as aiohttp's do, and with it whatever
        # it waits for upstream. (Keeping a half-closed connection open for its answer would let every
        # abandoned request hold a dev server's connection until that answer, for good if it never
        # comes; browsers do not half-close.)
        self._closing = True
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.doors.discard(self)
        self._writable.set()
        if self._slot is not None:
            self._slot.release()
            self._slot = None
        if self._idle_check is not None:
            self._idle_check.cancel()
        if self.task is not None:
            self.task.cancel()
        if self._in_flight is not None:
            # A client that gave up releases its upstream connection at once, answered or not.
            self._in_flight.close()

    # -- the requests --
    def _next_request(self) -> None:
        buffer = self._buffer
        if not buffer:
            if self._closing:
                self.close()
            return
        if not may_be_fast(buffer):
            self._hand_over()
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > HEAD_LIMIT:
                self._hand_over()
            else:
                self._head_arriving()
            return
        self._head_since = None
        if self._parser is None:
            self._parser = HeadParser()
        request = parse_head(bytes(buffer[: end + 4]), self._parser)
        seen = None if request is None else seen_by_admission(request)
        route = None if seen is None else self._route(seen)
        if request is None or seen is None or route is None:
            self._hand_over()
            return
        self._busy = True
        if request.upgrade or not self._serve_now(request, route, seen):
            self.task = self._loop.create_task(self._serve(request, route, seen))

    def _route(self, seen: PreviewRequest) -> Route | None:
        """The preview a request is for; None for the app's own requests and for every refusal,
        which are aiohttp's to answer (it asks the same gate, and words the answer)."""
        try:
            return self.deps.gate.route(seen.host, seen.path, seen.authorization is not None)
        except GatewayError:
            return None

    def _serve_now(self, request: Head, route: Route, seen: PreviewRequest) -> bool:
        """Sends the request upstream without a task of its own when nothing needs waiting for (the
        sandbox's port is known, activity was written lately, a pooled connection is free): the
        answer is then written from the upstream connection's callback. False if it needs the task."""
        try:
            admitted = self.deps.gate.admit_now(route, seen)
        except GatewayError:
            self._busy = False
            self._hand_over()
            return True
        connection = None if admitted is None else self.deps.upstream.idle_connection(admitted.target)
        if admitted is None or connection is None:
            return False
        request_id = request_id_for(request.header("x-request-id"))
        headers = upstream_headers(request.headers, self.remote, seen.host, "http", admitted.upstream_host)
        answered = functools.partial(self._answered, request, admitted, request_id, time.perf_counter())
        self._in_flight = connection
        connection.send_then(request_head(request.method, request.target, headers), request.method, answered)
        return True

    def _answered(
        self,
        request: Head,
        preview: Admitted,
        request_id: str,
        started: float,
        head: asyncio.Future[Response],
    ) -> None:
        self._in_flight = None
        error = head.exception()
        if (
            isinstance(error, UpstreamTimeout)
            and self._transport is not None
            and not self._transport.is_closing()
        ):
            # Handed over, it would be asked again and waited for as long once more.
            self.write(timed_out(request, request_id))
            self._done(request, preview.prefix, 504, started, request_id)
            return
        if error is not None:
            # Nothing is written yet: aiohttp tries once more and answers, with the 502 page if need be.
            self._busy = False
            self._hand_over()
            return
        upstream = head.result()
        if self._transport is None or self._transport.is_closing():
            upstream.close()  # the client has gone
            return
        status = answer_now(self, request, preview.prefix, upstream, request_id)
        if status is None:
            self.task = self._loop.create_task(
                self._stream(request, preview.prefix, upstream, request_id, started)
            )
            return
        self._done(request, preview.prefix, status, started, request_id)

    async def _stream(
        self, request: Head, prefix: str, upstream: Response, request_id: str, started: float
    ) -> None:
        try:
            status = await stream_answer(self, request, prefix, upstream, request_id)
        except Exception:
            log.exception("the front door failed on %s %s", request.method, request.target.split("?")[0])
            self.close()
            return
        finally:
            self.task = None
        self._done(request, prefix, status, started, request_id)

    async def _serve(self, request: Head, route: Route, seen: PreviewRequest) -> None:
        started = time.perf_counter()
        try:
            if request.upgrade:
                status = await serve_websocket(self, request, route, seen)
            else:
                status = await serve_http(self, request, route, seen)
        except HandOver:
            self.task = None
            self._busy = False
            self._hand_over()
            return
        except Exception:
            log.exception("the front door failed on %s %s", request.method, request.target.split("?")[0])
            self.task = None
            self.close()
            return
        self.task = None
        if status == 101:
            return  # the splice has the connection now, and accounts for it when it ends
        self._done(request, route.prefix, status, started, current_request_id.get())

    def _done(self, request: Head, prefix: str, status: int, started: float, request_id: str) -> None:
        """The answer is written: count it, then go on to the next request on the connection."""
        seconds = time.perf_counter() - started
        _account(self.deps.metrics, self.remote, request, prefix, status, seconds, request_id)
        self._server.answered += 1
        self._busy = False
        del self._buffer[: request.size]
        if not request.keep_alive or self._closing:
            self.close()
            return
        self._used()
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        self._next_request()

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, starting with the bytes not yet answered."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._server.doors.discard(self)
        self._server.handed_over += 1
        if self._idle_check is not None:
            self._idle_check.cancel()
        head_started = self._loop.time() if self._head_since is None else self._head_since
        slot, self._slot = self._slot, None
        handler = self._server.aiohttp_protocol(slot, head_started)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._reading_paused:
            transport.resume_reading()
        if self._buffer:
            handler.data_received(bytes(self._buffer))
            self._buffer.clear()
        if self._closing:
            handler.eof_received()

    # -- used by the serve functions --
    @property
    def server(self) -> GatewayServer:
        return self._server

    @property
    def deps(self) -> Deps:
        return self._server.deps

    @property
    def busy(self) -> bool:
        return self._busy

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    async def drained(self) -> None:
        await self._writable.wait()

    def take_over(self, request: Head) -> tuple[asyncio.Transport, bytes, Slot]:
        """The connection, the bytes the client sent after `request`, and the connection's slot
        (released when the splice ends), for a splice."""
        assert self._transport is not None
        assert self._slot is not None
        slot, self._slot = self._slot, None
        self._server.doors.discard(self)
        if self._idle_check is not None:
            self._idle_check.cancel()
        rest = bytes(self._buffer[request.size :])
        self._buffer.clear()
        if self._reading_paused:
            self._transport.resume_reading()
        return self._transport, rest, slot

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def close_when_idle(self) -> None:
        self._closing = True
        if not self._busy:
            self.close()

    def _used(self) -> None:
        loop = self._loop
        self._last_used = loop.time()
        if self._idle_check is None:
            self._idle_check = loop.call_at(self._last_used + KEEPALIVE_S, self._check_idle)

    def _head_arriving(self) -> None:
        """Part of a head is in: the rest must follow within the head timeout."""
        if self._head_since is not None:
            return
        loop = self._loop
        self._head_since = loop.time()
        due = self._head_since + self._server.head_timeout_s
        check = self._idle_check
        if check is None or check.when() > due:
            if check is not None:
                check.cancel()
            self._idle_check = loop.call_at(due, self._check_idle)

    def _check_idle(self) -> None:
        """Closes a connection idle for KEEPALIVE_S, or whose request head is not in within the
        head timeout (slowloris), without an answer; one timer for both."""
        loop = self._loop
        now = loop.time()
        due = self._last_used + KEEPALIVE_S
        if not self._busy:
            if self._head_since is not None:
                head_due = self._head_since + self._server.head_timeout_s
                if now >= head_due:
                    self._server.door_head_timeouts.inc()
                    self.close()
                    return
                due = min(due, head_due)
            if now >= due:
                self.close()
                return
        self._idle_check = loop.call_at(due if due > now else now + 1.0, self._check_idle)


def _account(
    metrics: Metrics, remote: str, request: Head, prefix: str, status: int, seconds: float, request_id: str
) -> None:
    """Metrics and the access line of an answer the door gave; a WebSocket's when it ends, as aiohttp's."""
    metrics.count_request(
        ROOT_ROUTE_LABEL if prefix == "/" else PATH_ROUTE_LABEL, request.method, status, seconds
    )
    if access_logger.isEnabledFor(logging.INFO):
        log_access(
            access_logger,
            remote=remote,
            method=request.method,
            path=request.target.split("?", 1)[0],
            status=status,
            seconds=seconds,
            request_id=request_id,
        )


async def _admit(door: FrontDoor, route: Route, seen: PreviewRequest, request: Head) -> Admitted:
    try:
        admitted = await door.deps.gate.admit(route, seen)
    except GatewayError:
        raise HandOver from None
    current_request_id.set(request_id_for(request.header("x-request-id")))
    return admitted


async def serve_http(door: FrontDoor, request: Head, route: Route, seen: PreviewRequest) -> int:
    """Proxies one bodiless request; returns the status sent."""
    admitted = await _admit(door, route, seen, request)
    headers = upstream_headers(request.headers, door.remote, seen.host, "http", admitted.upstream_host)
    head = request_head(request.method, request.target, headers)
    try:
        upstream = await door.deps.upstream.request(
            admitted.target, head, None, chunked=False, method=request.method
        )
    except UpstreamTimeout:
        door.write(timed_out(request, current_request_id.get()))
        return 504
    except UpstreamError:
        # Nothing is listening, most likely: aiohttp tries once more and answers with the 502 page.
        raise HandOver from None
    request_id = current_request_id.get()
    status = answer_now(door, request, admitted.prefix, upstream, request_id)
    if status is None:
        status = await stream_answer(door, request, admitted.prefix, upstream, request_id)
    return status


async def serve_websocket(door: FrontDoor, request: Head, route: Route, seen: PreviewRequest) -> int:
    """Relays the upgrade; after the dev server's 101, splices the two connections."""
    admitted = await _admit(door, route, seen, request)
    try:
        answer = await upgrade_upstream(
            door.deps.upstream,
            admitted.target,
            upgrade_head(
                request.headers, request.target, door.remote, seen.host, "http", admitted.upstream_host
            ),
        )
    except (UpgradeRefused, UpstreamError):
        # Nothing listening, or no relay free: aiohttp tries once more and words the answer.
        raise HandOver from None
    request_id = current_request_id.get()
    if answer.status != 101:
        door.write(upgrade_refused(answer.status, request_id))
        return answer.status
    answer_headers = upgrade_response_headers(answer.headers)
    answer_headers[REQUEST_ID_HEADER] = request_id
    client, ahead, slot = door.take_over(request)
    client.write(response_head(101, answer_headers.items()))
    server, deps, remote, started = door.server, door.deps, door.remote, time.perf_counter()

    def ended(splice: Splice) -> None:
        server.splices.discard(splice)
        slot.release()  # the client's transport is closing now
        _account(deps.metrics, remote, request, route.prefix, 101, time.perf_counter() - started, request_id)

    splice = Splice(
        client,
        answer.transport,
        user=admitted.user,
        counts_activity=admitted.viewer.counts_as_activity,
        activity=deps.gate.activity,
        metrics=deps.metrics,
        on_close=ended,
    )
    splice.start_on_transport(ahead, answer.ahead)
    server.splices.add(splice)
    server.answered += 1
    return 101
