"""The preview proxy's aiohttp transport: every preview request the front door (frontdoor.py) does not
answer itself, HTTP and WebSocket, to the user's dev server on port 5173 of their sandbox, through the
port Docker publishes on 127.0.0.1. Admission is preview_access.py's, headers preview_headers.py's,
the WebSocket splice splice.py's: the same as the front door's.

A sandbox's own origin (`<label>.<preview domain>`) is the dev server's from the root: every path
goes to it, except the gateway's few under `/_sandbox-gateway/`. The path route (`/preview/<user>/`
on the shared preview origin) is served as before.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
from collections.abc import Coroutine
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from .errors import GatewayError, PreviewNotFound
from .keys import METRICS, PREVIEW_GATE, ROUTE_LABEL, SANDBOXES, SETTINGS, UPSTREAM
from .preview_access import (
    RESERVED_PREFIX,
    ROOT_ROUTE_LABEL,
    Admitted,
    PreviewRedirect,
    PreviewRequest,
    Route,
    StoppedPreview,
)
from .preview_auth import LOGIN_PATH
from .preview_headers import (
    BODILESS_STATUSES,
    request_head,
    response_headers,
    upgrade_head,
    upgrade_response_headers,
    upstream_headers,
)
from .schemas import check_identity_coding
from .splice import Splice, UpgradeRefused, upgrade_upstream
from .upstream import RelaysExhausted, Response, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

START_PATH = RESERVED_PREFIX + "start"


async def preview_redirect_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(f"/preview/{request.match_info['user']}/")


async def preview(request: web.Request) -> web.StreamResponse:
    """The path route, /preview/<user>/..., on any host (browsers are sent to the preview origin)."""
    seen = PreviewRequest.of(request)
    try:
        route = request.app[PREVIEW_GATE].route(seen.host, seen.path, seen.authorization is not None)
    except PreviewRedirect as moved:
        raise web.HTTPTemporaryRedirect(f"{moved.location}{request.rel_url.raw_path_qs}") from None
    except GatewayError as err:
        return _error(request, err)
    assert route is not None  # the router matched /preview/
    return await serve(request, route, seen)


async def serve(request: web.Request, route: Route, seen: PreviewRequest) -> web.StreamResponse:
    try:
        admitted = await request.app[PREVIEW_GATE].admit(route, seen)
    except StoppedPreview as stopped:
        return _stopped(request, stopped)
    except GatewayError as err:
        return _error(request, err)
    try:
        if seen.upgrade:
            return await _proxy_websocket(request, admitted)
        return await _proxy_http(request, admitted)
    except RelaysExhausted as err:
        return _error(request, err.refusal)
    except DevServerUnreachable:
        # A sandbox killed from outside (docker kill, OOM) closes its port too: that is said as
        # what it is, and recorded, rather than as a dev server that is not listening yet.
        if await request.app[SANDBOXES].has_stopped(admitted.user):
            return _stopped(request, StoppedPreview(route, admitted.viewer))
        return _not_listening(request, admitted.prefix, admitted.sandbox_port if route.port else None)


class DevServerUnreachable(Exception):
    """Nothing answered on the sandbox's port."""


async def _proxy_http(request: web.Request, target: Admitted) -> web.StreamResponse:
    if request.body_exists:
        check_identity_coding(request)
    headers = upstream_headers(
        request.headers.items(), request.remote or "", request.host, request.scheme, target.upstream_host
    )
    chunked = request.body_exists and hdrs.CONTENT_LENGTH not in request.headers
    if chunked:
        headers.append((hdrs.TRANSFER_ENCODING, "chunked"))
    # aiohttp refused CR and LF in the incoming request, so none reaches this head.
    head = request_head(request.method, request.rel_url.raw_path_qs, headers)
    body = request.content.iter_any() if request.body_exists else None
    try:
        upstream = await _unless_client_left(
            request,
            request.app[UPSTREAM].request(target.target, head, body, chunked=chunked, method=request.method),
        )
    except UpstreamTimeout as err:
        log.info("preview upstream %s timed out: %s", target.sandbox_port, err)
        content_type, page = timeout_answer(_wants_html(request))
        return web.Response(status=504, body=page, headers={hdrs.CONTENT_TYPE: content_type})
    except RelaysExhausted:
        raise
    except UpstreamError as err:
        log.info("preview upstream %s failed: %s", target.sandbox_port, err)
        raise DevServerUnreachable() from err
    answer = CIMultiDict(response_headers(upstream.headers, target.prefix))
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


async def _proxy_websocket(request: web.Request, target: Admitted) -> web.StreamResponse:
    """Relays the upgrade to the dev server, and after its 101 splices the two connections."""
    head = upgrade_head(
        request.headers.items(),
        request.rel_url.raw_path_qs,
        request.remote or "",
        request.host,
        request.scheme,
        target.upstream_host,
    )
    try:
        answer = await upgrade_upstream(request.app[UPSTREAM], target.target, head)
    except UpgradeRefused as err:
        raise DevServerUnreachable() from err
    if answer.status != 101:
        # The dev server refused (wrong path, bad token, no such subprotocol): pass its status on.
        return web.Response(
            status=answer.status, text=f"the dev server refused the WebSocket ({answer.status})"
        )
    try:
        response = web.StreamResponse(status=101, headers=upgrade_response_headers(answer.headers))
        response.force_close()
        await response.prepare(request)
        app = request.app
        assert request.transport is not None  # prepared just now
        splice = Splice(
            request.transport,
            answer.transport,
            user=target.user,
            counts_activity=target.viewer.counts_as_activity,
            activity=app[PREVIEW_GATE].activity,
            metrics=app[METRICS],
        )
        splice.start_on_request(request, answer.ahead)
    except BaseException:
        answer.transport.close()
        raise
    try:
        await splice.closed
    finally:
        splice.close()
    return response


# How often a handler waiting for the dev server's answer looks whether its client is still there.
CLIENT_CHECK_S = 0.25


async def _unless_client_left(request: web.Request, waiting: Coroutine[Any, Any, Response]) -> Response:
    """Awaits the dev server's answer while the client is there. aiohttp does not cancel a handler
    whose client went away (handler_cancellation is off, and must stay off for starts and stops), so
    without this a dev server that never answers would hold the upstream connection until the
    response timeout, for every abandoned request."""
    task = asyncio.ensure_future(waiting)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=CLIENT_CHECK_S)
            transport = request.transport
            if not task.done() and (transport is None or transport.is_closing()):
                task.cancel()  # UpstreamConnection.exchange closes the connection
                raise ConnectionResetError("the client went away before the dev server answered")
        return task.result()
    finally:
        if not task.done():
            task.cancel()


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get(hdrs.ACCEPT, "")


def _error(request: web.Request, err: GatewayError) -> web.Response:
    if not _wants_html(request):
        raise err
    return _page(err.status, "Preview unavailable", err.message)


def _not_listening(request: web.Request, prefix: str, port: int | None = None) -> web.Response:
    """`port`: a port origin's (`<port>-<label>`); None: the default route's 5173."""
    if port is not None:
        message = f"Nothing listens on port {port} in your sandbox. Start a server there (on any address)"
    else:
        how = 'npm run dev -- --host 0.0.0.0 --base "$PREVIEW_BASE"' if prefix != "/" else "npm run dev"
        message = f"Nothing answers on port 5173 in your sandbox yet. Start a dev server, e.g. {how}"
    if _wants_html(request):
        # The dev server is often seconds away from listening: the page tries again by itself.
        return _page(
            502, "Dev server not running", message + ". This page retries every 2 seconds.", refresh_s=2
        )
    return web.json_response({"error": {"code": "dev_server_not_running", "message": message}}, status=502)


TIMEOUT_MESSAGE = (
    "The dev server in your sandbox accepted the request but did not start answering in time: it may be"
    " busy, hung, or its sandbox paused."
)


def timeout_answer(wants_html: bool) -> tuple[str, bytes]:
    """The 504 both transports give when the dev server does not answer in time: type and body."""
    if wants_html:
        title = "Dev server not answering"
        page = (
            f"<!doctype html><meta charset=utf-8><title>{title}</title>"
            f"<body style='font:16px system-ui;margin:3rem;color:#222'><h1>{title}</h1>"
            f"<p>{html.escape(TIMEOUT_MESSAGE)}</p></body>"
        )
        return "text/html; charset=utf-8", page.encode()
    error = {"error": {"code": "dev_server_timeout", "message": TIMEOUT_MESSAGE}}
    return "application/json; charset=utf-8", json.dumps(error).encode()


def _stopped(request: web.Request, stopped: StoppedPreview) -> web.Response:
    """A stopped sandbox greets a viewer who may start it with a button (or starts it: "auto"), on
    its own origin; everyone else, and scripts, get the 409."""
    wake = request.app[SETTINGS].preview_wake
    if (
        not _wants_html(request)
        or stopped.route.label is None
        or wake == "off"
        or not stopped.viewer.may_wake
    ):
        return _error(request, stopped)
    next_path = html.escape(request.rel_url.raw_path_qs, quote=True)
    auto = "<script>document.forms[0].submit()</script>" if wake == "auto" else ""
    body = (
        "<!doctype html><meta charset=utf-8><title>Sandbox stopped</title>"
        "<body style='font:16px system-ui;margin:3rem;color:#222'><h1>This sandbox is stopped</h1>"
        "<p>It was stopped (idle, or by its owner). Its files are kept.</p>"
        f"<form method=post action='{START_PATH}'><input type=hidden name=next value='{next_path}'>"
        "<button id=start-sandbox style='font:inherit;padding:.5rem 1rem'>Start it</button>"
        f"</form>{auto}</body>"
    )
    return web.Response(status=409, text=body, content_type="text/html")


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
    """Preview origins serve previews and the gateway's few pages for them, nothing else: no page,
    no API, so that a preview's scripts cannot reach either on their own origin. On a sandbox's own
    origin every other path is the dev server's, whatever the router matched."""
    gate = request.app[PREVIEW_GATE]
    settings = gate.settings
    host = request.host
    if settings.on_preview_domain(host):
        request[ROUTE_LABEL] = ROOT_ROUTE_LABEL
        seen = PreviewRequest.of(request)
        try:
            route = gate.route(host, seen.path, seen.authorization is not None)
        except GatewayError as err:
            return _error(request, err)
        if route is None:
            # /_sandbox-gateway/...: the gateway's own pages for this origin, and nothing else (a dot
            # segment in the path must not reach the API through the router's normalising).
            resource = request.match_info.route.resource
            if resource is None or not resource.canonical.startswith(RESERVED_PREFIX):
                raise PreviewNotFound("no such page")
            return await handler(request)
        return await serve(request, route, seen)
    if host == settings.preview_host and not (
        request.path.startswith("/preview/") or request.path == LOGIN_PATH
    ):
        raise PreviewNotFound("the preview origin serves previews only")
    return await handler(request)


@web.middleware
async def preview_origin_connections_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On preview origins aiohttp answers only what the front door handed over (a login, an upload,
    an error page), and then says Connection: close, so that the browser's next request, most likely
    a plain GET of the preview, meets the front door on a new connection instead of staying on
    aiohttp's slower path for the rest of the tab's life. Outside the error middleware, so that
    errors are responses here; streamed responses, already sent, keep their connection."""
    settings = request.app[SETTINGS]
    host = request.host
    if host != settings.preview_host and not settings.on_preview_domain(host):
        return await handler(request)
    try:
        response = await handler(request)
    except web.HTTPException as redirect:
        redirect.force_close()
        raise
    if not response.prepared:
        response.force_close()
    return response
