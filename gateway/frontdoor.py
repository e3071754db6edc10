"""The listener's front door: every connection is read here first. The preview requests that make up
nearly all of a dev server's traffic, bodiless GET and HEAD and the HMR WebSocket, are proxied here on
asyncio's protocol level; every other connection is handed to aiohttp, whole, for the rest of its life.

aiohttp's server costs more per request than the proxying itself (bench/proxy.py: a bare aiohttp
handler answers in three times the time a bare protocol does), which is what stood between the preview
and its latency target. So the front door takes only requests it can judge cheaply and exactly: a
strict subset of HTTP/1.1, checked as aiohttp would check it (preview.py's own functions), and hands
over anything else before it has written a byte: bodies, odd heads, errors of any kind, which aiohttp
then answers as it always has. The hand-over replays the bytes read so far into aiohttp's protocol.

After a WebSocket upgrade, the two connections are spliced on the protocol level: each side's
`data_received` writes straight into the other side's transport, and a full transport pauses reading
on the other side. Nothing parses a frame; this is what the fast proxies do after the upgrade.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import httptools
from aiohttp import hdrs, web
from aiohttp.log import access_logger
from aiohttp.web_protocol import RequestHandler

from .access_log import log_access
from .activity import ActivityRecorder
from .errors import GatewayError
from .keys import ACTIVITY, METRICS, PREVIEW_SESSIONS, SANDBOXES, SETTINGS, TOKENS, UPSTREAM
from .logs import HEADER as REQUEST_ID_HEADER
from .logs import current_request_id, request_id_for
from .metrics import Metrics
from .preview import (
    BODILESS_STATUSES,
    DROPPED_RESPONSE_HEADERS,
    UPGRADE_HEAD_LIMIT,
    UPSTREAM_CONNECT_S,
    check_preview_origin,
    header_lines,
    parse_answer_head,
    request_head,
    response_headers,
    sound_preview_path,
    upgrade_head,
    upgrade_response_headers,
    upstream_headers,
)
from .preview_auth import check_viewer
from .preview_sessions import PreviewSessions
from .sandboxes import Sandboxes
from .settings import Settings
from .tokens import USER_PATTERN, TokenVerifier
from .upstream import Response, UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

PREVIEW_ROUTE = "/preview/{user}/{tail}"  # the metrics label aiohttp gives the preview route
FAST_STARTS = (b"GET /preview/", b"HEAD /preview/")
FAST_START_MAX = max(len(start) for start in FAST_STARTS)
# Longer heads go to aiohttp, which has the limits and the 431 for them.
HEAD_LIMIT = 16 * 1024
# Control bytes other than CR, LF and tab: legal to no strict parser, and aiohttp's to refuse.
CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
# Bytes a client may send ahead (pipelining) before reading from it pauses.
READ_AHEAD = 256 * 1024
KEEPALIVE_S = 75.0  # as aiohttp's keepalive_timeout
SHUTDOWN_S = 10.0


# The door sets these itself: the request id always, the length when it has the whole body.
DROPPED = DROPPED_RESPONSE_HEADERS | {"x-request-id"}
DROPPED_SIZED = DROPPED | {"content-length"}
STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}


class HandOver(Exception):
    """The request is aiohttp's to answer; nothing of a response has been written."""


@dataclass(slots=True)
class Head:
    method: str
    target: str  # the raw path and query, as sent
    headers: list[tuple[str, str]]
    keep_alive: bool
    upgrade: bool
    size: int
    single: dict[str, str]  # SINGLE_HEADERS by lower-case name; parse_head saw each once at most

    def header(self, name: str) -> str | None:
        return self.single.get(name)


# Headers the front door reads: more than one of any, and aiohttp decides which counts.
SINGLE_HEADERS = frozenset({"host", "authorization", "cookie", "upgrade", "origin", "x-request-id"})
# A body announced, even an empty one, or one that waits for a go-ahead.
BODY_HEADERS = frozenset({"expect", "transfer-encoding", "content-length"})


class HeadParser:
    """httptools' request parser with the callbacks parse_head needs. One per connection: llhttp
    reads one message after another, and a parser costs more to make than a head does to parse."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.start()

    def start(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.single: dict[str, str] = {}
        self.refused = False  # a body header, or a SINGLE_HEADERS one twice
        self.complete = False
        self.keep_alive = False
        self.version = ""
        self.method = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them, so that both paths forward the same bytes.
        text = name.decode("utf-8", "surrogateescape")
        decoded = value.decode("utf-8", "surrogateescape")
        self.headers.append((text, decoded))
        lowered = text.lower()
        if lowered in SINGLE_HEADERS:
            if lowered in self.single:
                self.refused = True
            self.single[lowered] = decoded
        elif lowered in BODY_HEADERS:
            self.refused = True

    def on_headers_complete(self) -> None:
        # Asked now: once the message is complete, llhttp has reset its flags.
        self.keep_alive = self.parser.should_keep_alive()
        self.version = self.parser.get_http_version()
        self.method = self.parser.get_method()

    def on_message_complete(self) -> None:
        self.complete = True


def _plain(head: bytes) -> bool:
    """No control bytes, no bare CR or LF, no obs-fold. (Counting, and deleting the control bytes
    to see whether any were there, beat regular expressions by four times, on every request.)"""
    crlf = head.count(b"\r\n")
    return (
        head.count(b"\r") == crlf
        and head.count(b"\n") == crlf
        and b"\n " not in head
        and b"\n\t" not in head
        and len(head.translate(None, CONTROL_BYTES)) == len(head)
    )


def parse_head(head: bytes, parser: HeadParser | None = None) -> Head | None:
    """The request in `head` (up to and including its blank line) if the front door may answer it:
    HTTP/1.1, GET or HEAD, no body, plain bytes, the headers it reads at most once each. `parser`:
    the connection's, which has read the requests before this one; after None it is spent."""
    if not _plain(head):
        return None
    if parser is None:
        parser = HeadParser()
    else:
        parser.start()
    upgrade = False
    try:
        parser.parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        upgrade = True
    except httptools.HttpParserError:
        return None
    # A body (Content-Length, Transfer-Encoding) leaves the message incomplete at the end of the head.
    if not parser.complete or parser.refused or parser.version != "1.1":
        return None
    method = parser.method
    if method != b"GET" and method != b"HEAD":
        return None
    single = parser.single
    if "host" not in single or not parser.url.isascii():
        return None
    wants_websocket = upgrade and single.get("upgrade", "").lower() == "websocket"
    if ("upgrade" in single or upgrade) and not wants_websocket:
        # An upgrade to anything but WebSocket, or an Upgrade header the parser did not take as one.
        return None
    return Head(
        method=method.decode("ascii"),
        target=parser.url.decode("ascii"),
        headers=parser.headers,
        keep_alive=parser.keep_alive,
        upgrade=upgrade,
        size=len(head),
        single=single,
    )


def _may_be_fast(buffer: bytearray) -> bool:
    if len(buffer) >= FAST_START_MAX:
        return buffer.startswith(FAST_STARTS)
    return any(buffer[: len(start)] == start[: len(buffer)] for start in FAST_STARTS)


@dataclass(frozen=True, slots=True)
class Deps:
    """The app's shared objects the door uses on every request, looked up once: each app lookup is
    a Python call, and the door's whole work per request is a few dozen."""

    settings: Settings
    tokens: TokenVerifier
    sessions: PreviewSessions
    sandboxes: Sandboxes
    activity: ActivityRecorder
    upstream: UpstreamPool
    metrics: Metrics

    @classmethod
    def of(cls, app: web.Application) -> Deps:
        return cls(
            settings=app[SETTINGS],
            tokens=app[TOKENS],
            sessions=app[PREVIEW_SESSIONS],
            sandboxes=app[SANDBOXES],
            activity=app[ACTIVITY],
            upstream=app[UPSTREAM],
            metrics=app[METRICS],
        )


class GatewayServer(web.Server):
    """aiohttp's server, with the front door as each connection's first protocol."""

    def __init__(self, app: web.Application, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = app
        self.doors: set[FrontDoor] = set()
        self.splices: set[Splice] = set()
        # Requests the front door answered, and connections it handed to aiohttp (tests read them).
        self.answered = 0
        self.handed_over = 0

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        return FrontDoor(self)

    @functools.cached_property
    def deps(self) -> Deps:
        # On the first request, not at construction: by then the app has started and set them all.
        return Deps.of(self.app)

    def aiohttp_protocol(self) -> RequestHandler:
        """aiohttp's own protocol, for a connection the front door hands over."""
        return super().__call__()

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for door in list(self.doors):
            door.close_when_idle()
        for splice in list(self.splices):
            splice.close()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        # Answers that need no task of their own are a loop pass from done; those with one get time.
        busy = [door.task for door in self.doors if door.task is not None]
        await super().shutdown(timeout)
        if busy:
            _, pending = await asyncio.wait(busy, timeout=timeout or SHUTDOWN_S)
            for task in pending:
                task.cancel()
        for door in list(self.doors):
            door.close()


class GatewayRunner(web.AppRunner):
    """An AppRunner whose server is the GatewayServer; for web sites and TestServer alike."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The same handler, request factory and options aiohttp's own server was made with.
        return GatewayServer(
            self.app, server.request_handler, request_factory=server.request_factory, **self._kwargs
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
        self._idle_check: asyncio.TimerHandle | None = None
        self.remote = ""

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        self._server.doors.add(self)
        self._used()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._next_request()
        elif len(self._buffer) > READ_AHEAD and self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        # A client may half-close after its last request; the answer still goes out.
        self._closing = True
        return self._busy

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.doors.discard(self)
        self._writable.set()
        if self._idle_check is not None:
            self._idle_check.cancel()
        if self.task is not None:
            self.task.cancel()

    # -- the requests --
    def _next_request(self) -> None:
        buffer = self._buffer
        if not buffer:
            if self._closing:
                self.close()
            return
        if not _may_be_fast(buffer):
            self._hand_over()
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > HEAD_LIMIT:
                self._hand_over()
            return
        if self._parser is None:
            self._parser = HeadParser()
        request = parse_head(bytes(buffer[: end + 4]), self._parser)
        if request is None:
            self._hand_over()
            return
        self._busy = True
        if request.upgrade or not self._serve_now(request):
            self.task = self._loop.create_task(self._serve(request))

    def _serve_now(self, request: Head) -> bool:
        """Sends the request upstream without a task of its own when nothing needs waiting for (the
        sandbox's port is known, activity was written lately, a pooled connection is free): the
        answer is then written from the upstream connection's callback. False if it needs the task."""
        try:
            preview = _admit_now(self, request)
        except HandOver:
            self._busy = False
            self._hand_over()
            return True
        connection = None if preview is None else self.deps.upstream.idle_connection(preview.port)
        if preview is None or connection is None:
            return False
        request_id = request_id_for(request.header("x-request-id"))
        headers = upstream_headers(request.headers, self.remote, preview.host, "http")
        answered = functools.partial(self._answered, request, preview, request_id, time.perf_counter())
        connection.send_then(request_head(request.method, request.target, headers), request.method, answered)
        return True

    def _answered(
        self,
        request: Head,
        preview: _Preview,
        request_id: str,
        started: float,
        head: asyncio.Future[Response],
    ) -> None:
        error = head.exception()
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
        self._done(request, status, started, request_id)

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
        self._done(request, status, started, request_id)

    async def _serve(self, request: Head) -> None:
        started = time.perf_counter()
        try:
            if request.upgrade:
                status = await serve_websocket(self, request)
            else:
                status = await serve_http(self, request)
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
        self._done(request, status, started, current_request_id.get())

    def _done(self, request: Head, status: int, started: float, request_id: str) -> None:
        """The answer is written: count it, then go on to the next request on the connection."""
        _account(self.deps.metrics, self.remote, request, status, time.perf_counter() - started, request_id)
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
        handler = self._server.aiohttp_protocol()
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

    def take_over(self, request: Head) -> tuple[asyncio.Transport, bytes]:
        """The connection, and the bytes the client sent after `request`, for a splice."""
        assert self._transport is not None
        self._server.doors.discard(self)
        if self._idle_check is not None:
            self._idle_check.cancel()
        rest = bytes(self._buffer[request.size :])
        self._buffer.clear()
        if self._reading_paused:
            self._transport.resume_reading()
        return self._transport, rest

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

    def _check_idle(self) -> None:
        loop = self._loop
        due = self._last_used + KEEPALIVE_S
        if not self._busy and loop.time() >= due:
            self.close()
            return
        self._idle_check = loop.call_at(max(due, loop.time() + 1.0), self._check_idle)


def _account(
    metrics: Metrics, remote: str, request: Head, status: int, seconds: float, request_id: str
) -> None:
    """Metrics and the access line of an answer the door gave; a WebSocket's when it ends, as aiohttp's."""
    metrics.count_request(PREVIEW_ROUTE, request.method, status, seconds)
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


@dataclass(slots=True)
class _Preview:
    user: str
    prefix: str
    port: int
    host: str


def _checked(door: FrontDoor, request: Head) -> tuple[str, str, str]:
    """The user, prefix and host of a request preview.preview would serve, with its checks in its
    order; HandOver for any refusal, which is aiohttp's to put in words."""
    deps = door.deps
    path = request.target.split("?", 1)[0]
    user = path.split("/", 3)[2] if path.count("/") >= 3 else ""
    prefix = f"/preview/{user}/"
    if not USER_PATTERN.fullmatch(user) or not sound_preview_path(path, prefix):
        raise HandOver
    host = request.header("host") or ""
    authorization = request.header("authorization")
    if host != deps.settings.preview_host and authorization is None:
        raise HandOver
    try:
        check_viewer(user, authorization, request.header("cookie"), deps.tokens, deps.sessions)
        if request.upgrade:
            check_preview_origin(request.header("origin"), deps.settings)
    except GatewayError:
        raise HandOver from None
    return user, prefix, host


def _admit_now(door: FrontDoor, request: Head) -> _Preview | None:
    """_admit without waiting: None if the port must be looked up or activity written."""
    user, prefix, host = _checked(door, request)
    deps = door.deps
    port = deps.sandboxes.cached_preview_port(user)
    if port is None or deps.activity.due(user):
        return None
    return _Preview(user, prefix, port, host)


async def _admit(door: FrontDoor, request: Head) -> _Preview:
    user, prefix, host = _checked(door, request)
    try:
        port = await door.deps.sandboxes.preview_port(user)
    except GatewayError:
        raise HandOver from None
    current_request_id.set(request_id_for(request.header("x-request-id")))
    await door.deps.activity.seen(user)
    return _Preview(user, prefix, port, host)


async def serve_http(door: FrontDoor, request: Head) -> int:
    """Proxies one bodiless request; returns the status sent."""
    preview = await _admit(door, request)
    headers = upstream_headers(request.headers, door.remote, preview.host, "http")
    head = request_head(request.method, request.target, headers)
    try:
        upstream = await door.deps.upstream.request(
            preview.port, head, None, chunked=False, method=request.method
        )
    except UpstreamError:
        # Nothing is listening, most likely: aiohttp tries once more and answers with the 502 page.
        raise HandOver from None
    request_id = current_request_id.get()
    status = answer_now(door, request, preview.prefix, upstream, request_id)
    if status is None:
        status = await stream_answer(door, request, preview.prefix, upstream, request_id)
    return status


def _answer_headers(
    request: Head, prefix: str, upstream: Response, request_id: str, dropped: frozenset[str]
) -> list[tuple[str, str]]:
    answer = response_headers(upstream.headers, prefix, dropped)
    answer.append((REQUEST_ID_HEADER, request_id))
    if not request.keep_alive:
        answer.append((hdrs.CONNECTION, "close"))
    return answer


def answer_now(
    door: FrontDoor, request: Head, prefix: str, upstream: Response, request_id: str
) -> int | None:
    """Writes the answer if its body is all in (a small one usually is), head and body in one write:
    the send() calls are most of the proxy's cost (py-spy). None if the body is still to come."""
    whole = upstream.complete_body()
    if whole is None:
        return None
    status = upstream.status
    if request.method == "HEAD" or status in BODILESS_STATUSES:
        # Their Content-Length, if any, describes a body they do not carry: it stays as it is.
        door.write(_response_head(status, _answer_headers(request, prefix, upstream, request_id, DROPPED)))
    else:
        answer = _answer_headers(request, prefix, upstream, request_id, DROPPED_SIZED)
        answer.append((hdrs.CONTENT_LENGTH, str(len(whole))))
        door.write(_response_head(status, answer) + whole)
    return status


async def stream_answer(
    door: FrontDoor, request: Head, prefix: str, upstream: Response, request_id: str
) -> int:
    """Writes the answer as its body comes: a 50 MB download or an event stream never sits in memory."""
    answer = _answer_headers(request, prefix, upstream, request_id, DROPPED)
    sized = any(name.lower() == "content-length" for name, _ in answer)
    if not sized:
        answer.append((hdrs.TRANSFER_ENCODING, "chunked"))
    door.write(_response_head(upstream.status, answer))
    try:
        async for chunk in upstream.body():
            door.write(chunk if sized else b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await door.drained()
        if not sized:
            door.write(b"0\r\n\r\n")
    except UpstreamError as err:
        # The head is out: all that is left is to end the connection, as aiohttp's path does.
        log.info("preview body to %s cut short: %r", door.remote, err)
        door.close()
    finally:
        upstream.close()
    return upstream.status


def _response_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    line = STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n"
    # Upstream values were decoded as latin-1 (upstream.py): encoded back, they are the bytes it sent.
    return f"{line}{header_lines(headers)}\r\n".encode("latin-1", "replace")


async def serve_websocket(door: FrontDoor, request: Head) -> int:
    """Relays the upgrade; after the dev server's 101, splices the two connections."""
    preview = await _admit(door, request)
    loop = asyncio.get_running_loop()
    try:
        transport, answer = await asyncio.wait_for(
            loop.create_connection(_UpgradeAnswer, "127.0.0.1", preview.port), UPSTREAM_CONNECT_S
        )
    except (OSError, TimeoutError):
        raise HandOver from None
    try:
        transport.write(upgrade_head(request.headers, request.target, door.remote, preview.host, "http"))
        status, headers = await asyncio.wait_for(answer.head, UPSTREAM_CONNECT_S)
    except (OSError, TimeoutError, UpstreamError):
        transport.close()
        raise HandOver from None
    if status != 101:
        # The dev server refused (wrong path, bad token, no such subprotocol): its status goes on.
        transport.close()
        body = f"the dev server refused the WebSocket ({status})".encode()
        extra = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        door.write(_response_head(status, [*extra, (REQUEST_ID_HEADER, current_request_id.get())]) + body)
        return status
    answer_headers = upgrade_response_headers(headers)
    answer_headers[REQUEST_ID_HEADER] = current_request_id.get()
    client, ahead = door.take_over(request)
    client.write(_response_head(101, answer_headers.items()))
    Splice(door, client, transport, preview.user, request, ahead, answer.rest())
    return 101


class _UpgradeAnswer(asyncio.Protocol):
    """Reads the dev server's answer to the upgrade, and holds whatever follows it until the splice."""

    def __init__(self) -> None:
        self.head: asyncio.Future[tuple[int, list[tuple[str, str]]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._buffer = bytearray()
        self._end = -1

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.head.done():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > UPGRADE_HEAD_LIMIT:
                self.head.set_exception(UpstreamError("the dev server's answer has no end"))
            return
        self._end = end + 4
        try:
            self.head.set_result(parse_answer_head(bytes(self._buffer[: self._end])))
        except ValueError as err:
            self.head.set_exception(UpstreamError(f"malformed answer: {err}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(UpstreamError("the dev server closed the connection"))

    def rest(self) -> bytes:
        return bytes(self._buffer[self._end :])


class _Pipe(asyncio.Protocol):
    """One direction of a splice: what arrives on its transport goes out on the peer's."""

    def __init__(self, splice: Splice, peer: asyncio.Transport) -> None:
        self._splice = splice
        self._peer = peer

    def data_received(self, data: bytes) -> None:
        self._peer.write(data)
        self._splice.moved += len(data)

    def pause_writing(self) -> None:
        # This side's transport is backed up: stop reading what would be written to it.
        self._peer.pause_reading()

    def resume_writing(self) -> None:
        self._peer.resume_reading()

    def eof_received(self) -> bool:
        self._splice.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.close()


class Splice:
    """A preview WebSocket after the upgrade: two transports copying into each other until either
    closes; traffic in an interval counts as activity, as terminal traffic does."""

    def __init__(
        self,
        door: FrontDoor,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        user: str,
        request: Head,
        client_ahead: bytes,
        upstream_ahead: bytes,
    ) -> None:
        self._deps = deps = door.deps
        self._server = door.server
        self._remote = door.remote
        self._client = client
        self._upstream = upstream
        self._user = user
        self._request = request
        self._request_id = current_request_id.get()
        self._started = time.perf_counter()
        self.moved = 0
        self._last_moved = 0
        self._closed = False
        self._recording: set[asyncio.Task[None]] = set()
        client.set_protocol(_Pipe(self, upstream))
        upstream.set_protocol(_Pipe(self, client))
        if upstream_ahead:
            client.write(upstream_ahead)
        if client_ahead:
            upstream.write(client_ahead)
        self._server.splices.add(self)
        self._server.answered += 1
        deps.metrics.open_websockets.labels("preview").inc()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(deps.activity.interval_s, self._record_activity)

    def _record_activity(self) -> None:
        if self.moved != self._last_moved:
            self._last_moved = self.moved
            task = asyncio.get_running_loop().create_task(self._deps.activity.seen(self._user))
            self._recording.add(task)
            task.add_done_callback(self._recording.discard)
        self._timer = asyncio.get_running_loop().call_later(
            self._deps.activity.interval_s, self._record_activity
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        self._client.close()
        self._upstream.close()
        self._server.splices.discard(self)
        self._deps.metrics.open_websockets.labels("preview").dec()
        seconds = time.perf_counter() - self._started
        _account(self._deps.metrics, self._remote, self._request, 101, seconds, self._request_id)
