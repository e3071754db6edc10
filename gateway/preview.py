"""The preview proxy: /preview/<user>/... to the user's dev server on port 5173 of their sandbox,
HTTP and WebSocket, through the port Docker publishes on 127.0.0.1.

Browsers get previews only on the preview origin (README, "Preview isolation"); on the main origin a
browser is redirected there, while a script with a bearer token is served directly. The dev server
sees the full path (Vite strips its `base` itself), `Host: localhost:5173` (which Vite's allowed-hosts
check accepts), and the original host, scheme and client in X-Forwarded-*; never our credentials.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from yarl import URL

from .errors import Forbidden, GatewayError, InvalidRequest
from .keys import ACTIVITY, METRICS, SANDBOXES, SETTINGS, UPSTREAM
from .preview_auth import LOGIN_PATH, authorize_viewer, rewrite_set_cookie, strip_preview_cookie
from .schemas import check_identity_coding
from .settings import Settings
from .tokens import USER_PATTERN
from .upstream import UpstreamError

log = logging.getLogger(__name__)

UPSTREAM_HOST = "localhost:5173"
# RFC 9110 7.6.1: meaningful for one connection only. Proxy-Connection is not standard but common.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade"}
)  # fmt: skip
# A dev server must not widen a service worker's scope beyond its own preview.
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"service-worker-allowed"}
# Responses whose Content-Length describes no body of theirs: aiohttp must not recompute it.
BODILESS_STATUSES = frozenset({204, 304})
# Host is the dev server's own, the credentials are the gateway's, and aiohttp has met the client's
# Expect: 100-continue already (the dev server's own 100 would come after it, as a second answer).
REPLACED_REQUEST_HEADERS = frozenset({"host", "authorization", "expect"})
# The gateway alone says where a request came from, in X-Forwarded-*: a client's own claims in these
# would reach the dev server as if the gateway had made them.
CLIENT_FORWARDING_HEADERS = frozenset({"forwarded", "x-real-ip"})
# What of a client's request never reaches the dev server as the client sent it, by lower-case name.
# The client's WebSocket handshake goes on only in an upgrade (upgrade_head), and X-Forwarded-For is
# extended, not taken as it is.
NOT_FORWARDED = HOP_BY_HOP | REPLACED_REQUEST_HEADERS | CLIENT_FORWARDING_HEADERS
NOT_FORWARDED_PREFIXES = ("sec-websocket-", "x-forwarded-")
DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.\.?(?:[/\\]|$)")
# The client's half of the handshake, which goes to the dev server (the other sec-websocket-* do not).
WEBSOCKET_HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions"}
)
UPSTREAM_CONNECT_S = 10.0
UPGRADE_HEAD_LIMIT = 64 * 1024
SPLICE_CHUNK = 256 * 1024
SPLICE_HIGH_WATER = 256 * 1024


async def preview_redirect_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(f"/preview/{request.match_info['user']}/")


async def preview(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    user = request.match_info["user"]
    if not USER_PATTERN.fullmatch(user):
        raise web.HTTPNotFound()
    prefix = f"/preview/{user}/"
    # Matching happened on the decoded, normalised path; what goes upstream is the raw one, so both
    # must agree on whose preview this is.
    if not sound_preview_path(request.rel_url.raw_path, prefix):
        raise InvalidRequest("malformed preview path")
    if request.host != settings.preview_host and "Authorization" not in request.headers:
        # A browser on the main origin: previews render only on the preview origin.
        raise web.HTTPTemporaryRedirect(f"{settings.preview_origin}{request.rel_url.raw_path_qs}")
    try:
        authorize_viewer(request, user)
        port = await request.app[SANDBOXES].preview_port(user)
    except GatewayError as err:
        return _error(request, err)
    await request.app[ACTIVITY].seen(user)
    # The full raw path and query go upstream untouched: Vite strips its base itself.
    target = Target(user=user, port=port, path=request.rel_url.raw_path_qs)
    if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return await _proxy_websocket(request, target, prefix)
    return await _proxy_http(request, target, prefix)


@dataclass(frozen=True, slots=True)
class Target:
    user: str
    port: int
    path: str


def sound_preview_path(raw_path: str, prefix: str) -> bool:
    """Whether a raw path lies inside `prefix` and holds no dot segment, plain or encoded, that a dev
    server decoding it could climb out of the prefix with (browsers send none)."""
    return raw_path.startswith(prefix) and not DOT_SEGMENT.search(unquote(raw_path))


def check_preview_origin(origin: str | None, settings: Settings) -> None:
    """A browser's WebSocket to a preview comes from the preview origin or an allowed one."""
    if origin is not None and origin not in (settings.preview_origin, *settings.allowed_origins):
        raise Forbidden(f"WebSocket connections from origin {origin} are not allowed")


async def _proxy_http(request: web.Request, target: Target, prefix: str) -> web.StreamResponse:
    if request.body_exists:
        check_identity_coding(request)
    headers = upstream_headers(request.headers.items(), request.remote or "", request.host, request.scheme)
    chunked = request.body_exists and hdrs.CONTENT_LENGTH not in request.headers
    if chunked:
        headers.append((hdrs.TRANSFER_ENCODING, "chunked"))
    # aiohttp refused CR and LF in the incoming request, so none reaches this head.
    head = request_head(request.method, target.path, headers)
    body = request.content.iter_any() if request.body_exists else None
    try:
        upstream = await request.app[UPSTREAM].request(
            target.port, head, body, chunked=chunked, method=request.method
        )
    except UpstreamError as err:
        log.info("preview upstream %s failed: %s", target.port, err)
        return _not_listening(request)
    answer = CIMultiDict(response_headers(upstream.headers, prefix))
    if request.method != "HEAD" and upstream.status not in BODILESS_STATUSES:
        whole = upstream.complete_body()
        if whole is not None:
            # Head and body in one write: the send() calls are most of the proxy's cost (py-spy).
            answer.popall(hdrs.CONTENT_LENGTH, None)
            return web.Response(status=upstream.status, headers=answer, body=whole)
    response = web.StreamResponse(status=upstream.status, headers=answer)
    try:
        await response.prepare(request)
        # Streamed as it comes: a 50 MB download or an event stream never sits in memory.
        async for chunk in upstream.body():
            await response.write(chunk)
        await response.write_eof()
    except (UpstreamError, ConnectionResetError) as err:
        # Either side went away mid-body; the status may be sent, so all that is left is to stop.
        log.info("preview body to %s cut short: %r", request.remote, err)
    finally:
        upstream.close()
    return response


def upstream_headers(
    items: Iterable[tuple[str, str]], remote: str, host: str, scheme: str
) -> list[tuple[str, str]]:
    """What of a client's request headers goes to the dev server, and what the gateway adds."""
    kept: list[tuple[str, str]] = []
    connection_listed: set[str] = set()
    forwarded_for = None
    for name, value in items:
        lowered = name.lower()
        if lowered in NOT_FORWARDED or lowered.startswith(NOT_FORWARDED_PREFIXES):
            if lowered == "connection":
                connection_listed.update(token.strip().lower() for token in value.split(","))
            elif lowered == "x-forwarded-for" and forwarded_for is None:
                forwarded_for = value
            continue
        if lowered == "cookie":
            value = strip_preview_cookie(value)
            if not value:
                continue
        kept.append((name, value))
    if not connection_listed <= HOP_BY_HOP:
        # Connection names headers of this hop only, wherever they stand in the request.
        kept = [(name, value) for name, value in kept if name.lower() not in connection_listed]
    kept += (
        (hdrs.HOST, UPSTREAM_HOST),
        ("X-Forwarded-For", f"{forwarded_for}, {remote}" if forwarded_for else remote),
        ("X-Forwarded-Host", host),
        ("X-Forwarded-Proto", scheme),
    )
    return kept


def header_lines(headers: Iterable[tuple[str, str]]) -> str:
    """The header fields of a head, each with its CRLF; the blank line is the caller's."""
    return "".join([f"{name}: {value}\r\n" for name, value in headers])


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    return f"{method} {target} HTTP/1.1\r\n{header_lines(headers)}\r\n".encode("utf-8", "surrogateescape")


def response_headers(
    items: Iterable[tuple[str, str]], prefix: str, dropped: frozenset[str] = DROPPED_RESPONSE_HEADERS
) -> list[tuple[str, str]]:
    """What of the dev server's response headers goes to the client, with redirects and cookies kept
    inside the preview. `dropped`: by lower-case name, the headers the caller sets itself."""
    headers: list[tuple[str, str]] = []
    for name, value in items:
        lowered = name.lower()
        if lowered in dropped:
            continue
        if lowered == "location":
            value = _rewrite_location(value, prefix)
        elif lowered == "set-cookie":
            value = rewrite_set_cookie(value, prefix)
            if not value:
                continue
        headers.append((name, value))
    return headers


def _rewrite_location(location: str, prefix: str) -> str:
    """A redirect stays inside the preview: the dev server's own origin, or a path outside the prefix,
    becomes a path under it. Redirects to other sites are left alone."""
    url = URL(location)
    if url.is_absolute():
        if url.host not in ("localhost", "127.0.0.1", "0.0.0.0") or url.port != 5173:  # noqa: S104
            return location
        location = url.raw_path_qs + (f"#{url.raw_fragment}" if url.raw_fragment else "")
    if location.startswith("/") and not location.startswith(prefix):
        return prefix + location.lstrip("/")
    return location


async def _proxy_websocket(request: web.Request, target: Target, prefix: str) -> web.StreamResponse:
    """Relays the upgrade to the dev server, and after its 101 splices the two connections byte for
    byte. No frame is parsed: the dev server and the browser speak WebSocket (subprotocol, pings,
    compression, close codes) to each other, and the gateway only copies, as fast proxies do."""
    try:
        check_preview_origin(request.headers.get(hdrs.ORIGIN), request.app[SETTINGS])
    except GatewayError as err:
        return _error(request, err)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", target.port, limit=UPGRADE_HEAD_LIMIT), UPSTREAM_CONNECT_S
        )
    except (OSError, TimeoutError):
        return _not_listening(request)
    try:
        writer.write(
            upgrade_head(
                request.headers.items(), target.path, request.remote or "", request.host, request.scheme
            )
        )
        try:
            status, headers = await asyncio.wait_for(_read_head(reader), UPSTREAM_CONNECT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return _not_listening(request)
        if status != 101:
            # The dev server refused (wrong path, bad token, no such subprotocol): pass its status on.
            return web.Response(status=status, text=f"the dev server refused the WebSocket ({status})")
        response = web.StreamResponse(status=101, headers=upgrade_response_headers(headers))
        response.force_close()
        await response.prepare(request)
        with request.app[METRICS].open_websockets.labels("preview").track_inprogress():
            await _splice(request, response, reader, writer, target.user)
        return response
    finally:
        writer.close()


def upgrade_head(items: Iterable[tuple[str, str]], target: str, remote: str, host: str, scheme: str) -> bytes:
    """The upgrade request for the dev server: the request headers as for HTTP, and the client's
    WebSocket handshake headers, which are the dev server's to answer."""
    items = list(items)
    headers = upstream_headers(items, remote, host, scheme)
    headers += ((hdrs.UPGRADE, "websocket"), (hdrs.CONNECTION, "Upgrade"))
    handshake: dict[str, tuple[str, str]] = {}
    for name, value in items:
        if name.lower() in WEBSOCKET_HANDSHAKE_HEADERS:
            handshake.setdefault(name.lower(), (name, value))
    headers += handshake.values()
    # The client's headers were parsed already (by aiohttp or httptools): no CR or LF reaches this.
    return request_head("GET", target, headers)


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]]]:
    return parse_answer_head(await reader.readuntil(b"\r\n\r\n"))


def parse_answer_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    """Status and headers of the dev server's answer to an upgrade; ValueError if it is not one."""
    status_line, *field_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = [
        (name.strip(), value.strip())
        for name, sep, value in (line.partition(":") for line in field_lines)
        if sep
    ]
    return status, headers


def upgrade_response_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    kept: CIMultiDict[str] = CIMultiDict({hdrs.UPGRADE: "websocket", hdrs.CONNECTION: "Upgrade"})
    for name, value in headers:
        if name.lower() in ("sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions"):
            kept.add(name, value)
    return kept


class _ClientToUpstream:
    """Takes the client connection's bytes in place of aiohttp's parser and writes them upstream,
    pausing the client while the upstream socket is backed up."""

    def __init__(self, request: web.Request, writer: asyncio.StreamWriter) -> None:
        self._client = request.transport
        self._writer = writer
        self._draining: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.moved = 0

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._writer.is_closing():
            return False, b""
        self._writer.write(data)
        self.moved += len(data)
        transport = self._writer.transport
        if transport.get_write_buffer_size() > SPLICE_HIGH_WATER and self._draining is None and self._client:
            self._client.pause_reading()
            self._draining = asyncio.ensure_future(self._drain())
        return False, b""

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:
            pass
        finally:
            self._draining = None
            if self._client and not self._client.is_closing():
                self._client.resume_reading()

    def feed_eof(self) -> None:
        self.closed.set()
        if not self._writer.is_closing() and self._writer.can_write_eof():
            self._writer.write_eof()


async def _splice(
    request: web.Request,
    response: web.StreamResponse,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    user: str,
) -> None:
    inbound = _ClientToUpstream(request, writer)
    # Public since aiohttp 3.x for exactly this: WebSocketResponse hands the connection over the same way.
    request.protocol.set_parser(inbound)  # type: ignore[arg-type]
    outbound_moved = 0

    async def outbound() -> None:
        nonlocal outbound_moved
        with suppress(ConnectionError):
            while data := await reader.read(SPLICE_CHUNK):
                outbound_moved += len(data)
                # Awaiting the write is the backpressure toward a slow browser.
                await response.write(data)

    async def record_activity() -> None:
        # Bytes in either direction within an interval count as activity, as terminal traffic does; a
        # socket that only sits open does not keep the sandbox alive.
        activity = request.app[ACTIVITY]
        last = 0
        while True:
            await asyncio.sleep(activity.interval_s)
            if inbound.moved + outbound_moved != last:
                last = inbound.moved + outbound_moved
                await activity.seen(user)

    copying = asyncio.ensure_future(outbound())
    closing = asyncio.ensure_future(inbound.closed.wait())
    recording = asyncio.ensure_future(record_activity())
    try:
        await asyncio.wait({copying, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (copying, closing, recording):
            task.cancel()
        await asyncio.gather(copying, closing, recording, return_exceptions=True)


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get(hdrs.ACCEPT, "")


def _error(request: web.Request, err: GatewayError) -> web.Response:
    if not _wants_html(request):
        raise err
    return _page(err.status, "Preview unavailable", err.message)


def _not_listening(request: web.Request) -> web.Response:
    message = (
        "Nothing answers on port 5173 in your sandbox yet. Start your dev server there, for example "
        'npm run dev -- --host 0.0.0.0 --base "$PREVIEW_BASE"'
    )
    if _wants_html(request):
        # The dev server is often seconds away from listening: the page tries again by itself.
        return _page(
            502, "Dev server not running", message + ". This page retries every 2 seconds.", refresh_s=2
        )
    return web.json_response({"error": {"code": "dev_server_not_running", "message": message}}, status=502)


def _page(status: int, title: str, message: str, refresh_s: int | None = None) -> web.Response:
    refresh = f"<meta http-equiv=refresh content={refresh_s}>" if refresh_s else ""
    body = (
        f"<!doctype html><meta charset=utf-8>{refresh}<title>{html.escape(title)}</title>"
        "<body style='font:16px system-ui;margin:3rem;color:#222'>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body>"
    )
    return web.Response(status=status, text=body, content_type="text/html")


@web.middleware
async def preview_host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The preview origin serves previews and their login, nothing else: no page, no API, so that a
    preview's scripts cannot reach either on their own origin."""
    if request.host == request.app[SETTINGS].preview_host and not (
        request.path.startswith("/preview/") or request.path == LOGIN_PATH
    ):
        raise web.HTTPNotFound()
    return await handler(request)


@web.middleware
async def preview_origin_connections_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On the preview origin aiohttp answers only what the front door handed over (a login, an
    upload, an error page), and then says Connection: close, so that the browser's next request,
    most likely a plain GET of the preview, meets the front door on a new connection instead of
    staying on aiohttp's slower path for the rest of the tab's life. Outside the error middleware,
    so that errors are responses here; streamed responses, already sent, keep their connection."""
    if request.host != request.app[SETTINGS].preview_host:
        return await handler(request)
    try:
        response = await handler(request)
    except web.HTTPException as redirect:
        redirect.force_close()
        raise
    if not response.prepared:
        response.force_close()
    return response
