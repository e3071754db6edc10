"""A lean HTTP/1.1 client for the preview proxy: pooled keep-alive connections to the sandboxes'
published ports and, through each sandbox's agent, to any port inside it; bytes in and out with
httptools parsing the responses.

Where a request goes is its target: a port published on 127.0.0.1 (an int: the default route's 5173),
`Relayed` (a port of the sandbox, through its agent's "connect"), or `DevServer`, the default route:
the published 5173 first and, when that leads nowhere while the agent reaches 127.0.0.1:5173 inside
(Vite without --host), the agent. Relayed connections are pooled and kept alive like the others.

aiohttp's client spends more per request than the whole rest of the proxy (py-spy), for features a
proxy to a known loopback port does not use: cookies, redirects, tracing, URL building, decompression.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import httptools

from . import agent
from .agent import AgentAddress
from .errors import AgentFailed, AgentUnavailable

# Node's http server closes idle keep-alive connections after 5 s; ours are dropped before that, so a
# request never lands on a connection the server is closing.
IDLE_TIMEOUT_S = 4.0
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# Enough for a few browser tabs and a benchmark's 64 connections, each kept rather than reopened.
MAX_IDLE_PER_PORT = 128


CONNECT_TIMEOUT_S = 10.0
# How long a dev server may take to start answering a request (the head), once the request is sent.
RESPONSE_TIMEOUT_S = 30.0
# How long a default route whose published port led nowhere goes through the agent before the
# published port is tried again (a dev server restarted with --host is then fast again).
VIA_AGENT_S = 30.0
MAX_REMEMBERED = 10_000  # such ports, at most (then forgotten all at once, and found again)


@dataclass(frozen=True, slots=True)
class Relayed:
    """A port inside a sandbox, reached through its agent."""

    agent: AgentAddress
    port: int
    max_relays: int


@dataclass(frozen=True, slots=True)
class DevServer:
    """The default route: 5173 as published, else through the agent (`relayed`)."""

    published: int
    relayed: Relayed


Target = int | Relayed | DevServer
P = TypeVar("P", bound=asyncio.Protocol)


class UpstreamError(Exception):
    """The upstream refused, dropped or garbled the exchange before a response head arrived."""


class RelaysExhausted(UpstreamError):
    """The sandbox's agent has as many relays open as it may (max_relays): a 429, not a 502."""

    def __init__(self, refusal: AgentFailed) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect, or did not start its answer, in time: it is busy, hung or
    frozen (a paused container accepts connections and never answers)."""


class Response:
    def __init__(
        self, status: int, reason: str, headers: list[tuple[str, str]], connection: _Connection
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._connection = connection
        self.finished = False

    def body(self) -> AsyncIterator[bytes]:
        return self._connection.body()

    def complete_body(self) -> bytes | None:
        """The whole body if it has already arrived with the head (a small response usually has),
        which also frees the connection; else None, and `body()` streams it."""
        return self._connection.complete_body()

    def close(self) -> None:
        """Gives up on the rest of the body: a connection left mid-response can carry nothing more,
        and would otherwise sit open, paused, for as long as the dev server keeps it."""
        if not self.finished:
            self._connection.close()


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, target: Target) -> None:
        self._pool = pool
        self.target = target
        # Kept: get_running_loop() makes a getpid() system call, and send runs on every request.
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._on_head: Callable[[asyncio.Future[Response]], None] | None = None
        self._headers: list[tuple[str, str]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._failed: BaseException | None = None
        self._readable = asyncio.Event()
        self._skip_body = False
        self._interim = False
        self._keep_alive = False
        self._writable = asyncio.Event()
        self._writable.set()
        self.idle_since = time.monotonic()
        self.closed = False
        self._head_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._complete or self._head is None:
            # Bytes after a complete response, or with no request in flight, answer nothing we asked:
            # read as the next request's answer, they would hand one request another's response.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail(UpstreamError(f"malformed response: {err}"))
        # After the whole read is parsed, so that a small body is complete when the callback looks.
        if self._on_head is not None and self._head.done():
            self._call_on_head()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        if not self._complete:
            self._fail(UpstreamError("the upstream closed the connection"))

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # An interim response (100 Continue, 103 Early Hints) is not the answer: the final one
            # follows it on the same connection.
            self._interim = True
            self._headers = []
            return
        # Asked now: once the message is complete, llhttp has reset and answers False.
        self._keep_alive = self._parser.should_keep_alive()
        self._disarm()
        if self._head is not None and not self._head.done():
            self._response = Response(status, "", self._headers, self)
            self._head.set_result(self._response)
        if self._skip_body:
            # A response to HEAD announces a length it does not send; the parser cannot know that.
            self.on_message_complete()
            self.close()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        self._readable.set()
        if self._buffered > HIGH_WATER and self._transport is not None:
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._readable.set()

    # -- use --
    def _arm(self) -> None:
        """The request is all sent: from now its answer has RESPONSE_TIMEOUT_S to begin."""
        self._head_timer = self._loop.call_later(self._pool.response_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _timed_out(self) -> None:
        self._head_timer = None
        self._fail(UpstreamTimeout(f"no answer within {self._pool.response_timeout_s:g} s"))

    def _fail(self, err: BaseException) -> None:
        self._disarm()
        self._failed = err
        if self._head is not None and not self._head.done():
            self._head.set_exception(err)
        self._readable.set()
        self.close()
        if self._on_head is not None:
            self._call_on_head()

    def _call_on_head(self) -> None:
        assert self._on_head is not None
        assert self._head is not None
        on_head, self._on_head = self._on_head, None
        on_head(self._head)

    def close(self) -> None:
        self.closed = True
        self._disarm()
        if self._transport is not None:
            self._transport.close()

    def send(self, head: bytes, method: str, *, whole: bool = True) -> asyncio.Future[Response]:
        """Sends a request head; the future resolves with the response head. `whole`: the request
        has no body, so the time its answer may take starts now."""
        assert self._transport is not None
        self._head = self._loop.create_future()
        self._skip_body = method == "HEAD"
        if self.closed:
            # Lost between connecting and sending (docker-proxy accepts, then closes when nothing
            # listens in the sandbox): the answer will never come, so it fails now, not at the timeout.
            self._head.set_exception(self._failed or UpstreamError("the upstream closed the connection"))
            if self._on_head is not None:
                self._loop.call_soon(self._call_on_head)
            return self._head
        self._transport.write(head)
        if whole:
            self._arm()
        return self._head

    def send_then(
        self, head: bytes, method: str, on_head: Callable[[asyncio.Future[Response]], None]
    ) -> None:
        """`send`, with `on_head` called from this protocol's own callbacks once the head (or the
        failure) is in: a caller without a task of its own gets its answer one loop pass sooner, and
        a small body whole (`complete_body`)."""
        self._on_head = on_head
        self.send(head, method)

    async def exchange(
        self, head: bytes, body: AsyncIterable[bytes] | None, chunked: bool, method: str
    ) -> Response:
        assert self._transport is not None
        self.send(head, method, whole=body is None)
        assert self._head is not None
        if body is not None:
            try:
                async for chunk in body:
                    if self.closed:
                        break
                    self._transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    # The upload goes only as fast as the dev server takes it.
                    await self._writable.wait()
            except BaseException:
                # The request went out in part: this connection can carry nothing more, and nobody
                # will wait for its answer.
                self._head.cancel()
                self.close()
                raise
            if chunked and not self.closed:
                self._transport.write(b"0\r\n\r\n")
            if not self.closed:
                self._arm()
        try:
            return await self._head
        except asyncio.CancelledError:
            # The client went away while the answer was awaited: nobody will read it, and a dev
            # server that never answers would otherwise hold this connection for good.
            self.close()
            raise

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered < LOW_WATER and self._transport is not None and not self.closed:
                    self._transport.resume_reading()
                yield chunk
            if self._failed is not None:
                raise self._failed
            if self._complete:
                self._finish()
                return
            self._readable.clear()
            await self._readable.wait()

    def complete_body(self) -> bytes | None:
        if not self._complete or self._failed is not None:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._finish()
        return body

    def _finish(self) -> None:
        if self._response is not None:
            self._response.finished = True
            self._response = None
        if self.closed or not self._keep_alive:
            self.close()
            return
        # The same parser reads the next response: llhttp takes one message after another.
        self._headers, self._head, self._complete = [], None, False
        self.idle_since = time.monotonic()
        # A body taken whole (complete_body) may have paused reading on its way past HIGH_WATER; a
        # pooled connection must read, or the next request's answer would never arrive.
        if self._transport is not None:
            self._transport.resume_reading()
        self._pool.release(self)


# What a caller holds while a request is in flight (to close it if its own client goes).
UpstreamConnection = _Connection


async def open_connection(target: int | Relayed, protocol: Callable[[], P]) -> P:
    """A new connection to `target` with the protocol `protocol` makes; UpstreamError (or its
    UpstreamTimeout, RelaysExhausted) if there is none. Both transports' HTTP and WebSocket alike."""
    if isinstance(target, Relayed):
        try:
            _, taker = await agent.relay(target.agent, target.port, target.max_relays, protocol)
        except AgentFailed as err:
            if err.code == "too_many":
                raise RelaysExhausted(err) from err
            raise UpstreamError(err.message) from err
        except AgentUnavailable as err:
            raise UpstreamError(err.message) from err
        return cast(P, taker)
    loop = asyncio.get_running_loop()
    try:
        _, made = await asyncio.wait_for(
            loop.create_connection(protocol, "127.0.0.1", target), CONNECT_TIMEOUT_S
        )
    except TimeoutError as err:
        raise UpstreamTimeout(f"cannot connect to 127.0.0.1:{target} within {CONNECT_TIMEOUT_S:g} s") from err
    except OSError as err:
        raise UpstreamError(f"cannot connect to 127.0.0.1:{target}: {err}") from err
    return made


class UpstreamPool:
    """Idle keep-alive connections per target, and which default routes go through the agent."""

    def __init__(self, response_timeout_s: float = RESPONSE_TIMEOUT_S) -> None:
        self._idle: dict[Target, list[_Connection]] = collections.defaultdict(list)
        self.response_timeout_s = response_timeout_s
        # Published ports that led nowhere while the agent reached the dev server: since when.
        self._via_agent: dict[int, float] = {}

    def way(self, target: Target) -> int | Relayed:
        """Where a new connection to `target` goes now."""
        if not isinstance(target, DevServer):
            return target
        since = self._via_agent.get(target.published)
        if since is not None and time.monotonic() - since < VIA_AGENT_S:
            return target.relayed
        return target.published

    def may_retry(self, target: Target, way: int | Relayed | None, err: BaseException) -> bool:
        """Whether a default route's request that failed on the published port should go through the
        agent instead: a dev server listening on the sandbox's loopback only (Vite without --host),
        which Docker's proxy cannot reach, so it accepts and closes. Not after a timeout: something
        was there, and is slow."""
        return (
            isinstance(target, DevServer)
            and way == target.published
            and not isinstance(err, UpstreamTimeout | TimeoutError)
        )

    def reached_via_agent(self, target: Target) -> None:
        if isinstance(target, DevServer):
            if len(self._via_agent) >= MAX_REMEMBERED:
                self._via_agent.clear()
            self._via_agent[target.published] = time.monotonic()

    async def open(self, target: Target, protocol: Callable[[], P]) -> tuple[P, int | Relayed]:
        """A new connection to `target`, and the way it went: through the agent for a default route
        whose published port leads nowhere (refused, or no dev server on the sandbox's address)."""
        way = self.way(target)
        try:
            return await open_connection(way, protocol), way
        except UpstreamError as err:
            if not self.may_retry(target, way, err):
                raise
        assert isinstance(target, DevServer)
        made = await open_connection(target.relayed, protocol)
        self.reached_via_agent(target)
        return made, target.relayed

    async def request(
        self, target: Target, head: bytes, body: AsyncIterable[bytes] | None, *, chunked: bool, method: str
    ) -> Response:
        connection = self.idle_connection(target)
        way: int | Relayed | None = None  # a pooled connection went its way long ago
        if connection is None:
            connection, way = await self.open(target, lambda: _Connection(self, target))
        try:
            return await connection.exchange(head, body, chunked, method)
        except UpstreamError as err:
            # Docker's proxy accepts a connection to a published port, and only then finds nothing
            # behind it: a request without a body goes again through the agent. One with a body is
            # gone (its body was read), but from now on the route goes through the agent at once.
            if way is None or not self.may_retry(target, way, err):
                raise
            assert isinstance(target, DevServer)
            retried = await open_connection(target.relayed, lambda: _Connection(self, target))
            self.reached_via_agent(target)
            if body is not None:
                retried.close()
                raise
        return await retried.exchange(head, None, chunked, method)

    def idle_connection(self, target: Target) -> _Connection | None:
        """A pooled connection to `target` that is ready now, without waiting to connect."""
        idle = self._idle.get(target)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_TIMEOUT_S:
                return connection
            connection.close()
        return None

    def release(self, connection: _Connection) -> None:
        idle = self._idle[connection.target]
        if len(idle) < MAX_IDLE_PER_PORT:
            idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
