"""Who may see a preview: its owner, with the API's bearer token (scripts, curl) or, in a browser, a
preview-session cookie; and anyone holding a live share link of it.

Browsers send no Authorization header on navigations, iframes or module scripts, so the page trades
its token for a one-minute login ticket (POST /api/sandbox/preview-session), and the preview origin
trades the ticket for a cookie: HttpOnly, SameSite=Lax, host-only (no Domain), signed by a key the
gateways keep in PostgreSQL and bound to the one origin it was given on. On a sandbox's own origin it
has Path=/; on the path route, Path=/preview/<user>/. It is stripped before a request reaches the dev
server, and the API never accepts it. The same origin's share cookie comes from a share link
(shares.py), and its start page (POST /_sandbox-gateway/start) wakes a stopped sandbox.
"""

from __future__ import annotations

import time
from urllib.parse import urlencode

import pydantic
from aiohttp import hdrs, web

from . import db, ratelimit
from .errors import Forbidden, InvalidRequest, PreviewNotFound, SandboxNotRunning, Unauthorized
from .keys import DB, PREVIEW_GATE, PREVIEW_HOSTS, PREVIEW_SESSIONS, SANDBOXES, SETTINGS, USER
from .preview_access import AGENT_PORT, RESERVED_PREFIX, PreviewRequest, Route
from .preview_headers import SESSION_COOKIE, SHARE_COOKIE
from .preview_hosts import port_host_label
from .preview_sessions import (
    SESSION_AUDIENCE,
    SESSION_LIFETIME_S,
    TICKET_AUDIENCE,
    TICKET_LIFETIME_S,
    sign,
    sign_share,
    verified_claims,
)
from .schemas import StrictModel, parse_body
from .settings import Settings
from .shares import is_live

LOGIN_PATH = "/_preview/login"  # on the shared preview origin (the path route)
ROOT_LOGIN_PATH = RESERVED_PREFIX + "login"  # on each sandbox's own origin


class PreviewSessionBody(StrictModel):
    # A port of the sandbox whose own origin (`<port>-<label>`) to log in to as well.
    port: int | None = pydantic.Field(default=None, ge=1, le=65535)


async def preview_session(request: web.Request) -> web.Response:
    """POST /api/sandbox/preview-session: login URLs that give this browser the preview cookie, on
    the sandbox's own origin (`login_url`) and on the path route (`path_login_url`), and with
    {"port": P} on that port's origin (`port_login_url`)."""
    options = await parse_body(request, PreviewSessionBody, optional=True)
    user = request[USER]
    settings = request.app[SETTINGS]
    key = request.app[PREVIEW_SESSIONS].key
    label = await request.app[PREVIEW_HOSTS].label(user)
    root_ticket = sign(user, TICKET_AUDIENCE, TICKET_LIFETIME_S, key, host=label)
    path_ticket = sign(user, TICKET_AUDIENCE, TICKET_LIFETIME_S, key)
    origin = settings.preview_root_origin(label)
    body: dict[str, object] = {
        "login_url": f"{origin}{ROOT_LOGIN_PATH}?{urlencode({'ticket': root_ticket})}",
        "path_login_url": f"{settings.preview_origin}{LOGIN_PATH}?{urlencode({'ticket': path_ticket})}",
        **await request.app[PREVIEW_GATE].urls(user),
        "expires_in": TICKET_LIFETIME_S,
    }
    if options.port is not None:
        if options.port == AGENT_PORT:
            raise InvalidRequest(f"port: {AGENT_PORT} is the sandbox agent's own")
        host_label = port_host_label(label, options.port)
        port_ticket = sign(user, TICKET_AUDIENCE, TICKET_LIFETIME_S, key, host=host_label)
        port_origin = settings.preview_root_origin(host_label)
        body["port_url"] = port_origin + "/"
        body["port_login_url"] = f"{port_origin}{ROOT_LOGIN_PATH}?{urlencode({'ticket': port_ticket})}"
    return web.json_response(body)


async def preview_login(request: web.Request) -> web.StreamResponse:
    """GET /_preview/login?ticket=... on the preview origin: the path route's cookie, then the preview."""
    settings = request.app[SETTINGS]
    if request.host != settings.preview_host:
        raise InvalidRequest("preview logins happen on the preview origin")
    user = await _ticket_user(request, None)
    raise _with_cookie(
        web.HTTPSeeOther(f"/preview/{user}/"),
        SESSION_COOKIE,
        sign(user, SESSION_AUDIENCE, SESSION_LIFETIME_S, request.app[PREVIEW_SESSIONS].key),
        f"/preview/{user}/",
        SESSION_LIFETIME_S,
        settings,
    )


async def root_login(request: web.Request) -> web.StreamResponse:
    """GET /_sandbox-gateway/login?ticket=...[&next=/path] on a sandbox's own origin."""
    route = await _root_route(request)
    # Bound to this one origin: a port's origin (`<port>-<label>`) has logins and cookies of its own.
    user = await _ticket_user(request, route.host_label)
    if user != route.user:
        raise Forbidden("this login link is for another preview")
    cookie = sign(
        user, SESSION_AUDIENCE, SESSION_LIFETIME_S, request.app[PREVIEW_SESSIONS].key, host=route.host_label
    )
    redirect = web.HTTPSeeOther(_next_path(request.query.get("next")))
    raise _with_cookie(redirect, SESSION_COOKIE, cookie, "/", SESSION_LIFETIME_S, request.app[SETTINGS])


async def open_share(request: web.Request) -> web.StreamResponse:
    """GET /_sandbox-gateway/share?key=...: a share link, traded for this origin's share cookie."""
    route = await _root_route(request)
    gate = request.app[PREVIEW_GATE]
    share = await gate.shares.by_secret(request.query.get("key", ""))
    if share is None or share.user != route.user or not is_live(share) or route.port is not None:
        # Not on a port's origin: a share link shares the preview, not whatever else the sandbox
        # serves (a database console, a notebook bound to its loopback), which stays its owner's.
        raise PreviewNotFound("this share link is not valid: it may have expired or been revoked")
    assert route.host_label is not None
    lifetime = int(share.expires_at.timestamp() - time.time())
    cookie = sign_share(
        share.id, route.host_label, share.expires_at.timestamp(), request.app[PREVIEW_SESSIONS].key
    )
    redirect = web.HTTPSeeOther("/")
    raise _with_cookie(redirect, SHARE_COOKIE, cookie, "/", lifetime, request.app[SETTINGS])


async def wake(request: web.Request) -> web.StreamResponse:
    """POST /_sandbox-gateway/start on a sandbox's own origin, from its stopped page: starts the
    sandbox for its owner (or a share viewer the owner allowed), then goes back to the page asked for."""
    route = await _root_route(request)
    gate = request.app[PREVIEW_GATE]
    settings = request.app[SETTINGS]
    seen_origin = request.headers.get(hdrs.ORIGIN)
    # A form of another origin of the same site would carry the cookie too.
    if seen_origin != route.origin:
        raise Forbidden("start the sandbox from its own preview page")
    viewer = await gate.viewer(route, PreviewRequest.of(request))
    if settings.preview_wake == "off" or not viewer.may_wake:
        raise SandboxNotRunning("this preview's sandbox is stopped, and may not be started from here")
    assert route.user is not None
    form = await request.post()
    next_path = _next_path(str(form.get("next", "/")))
    await ratelimit.take(request.app[DB], route.user, "start", settings.start_rate)
    await request.app[SANDBOXES].start(route.user)
    raise web.HTTPSeeOther(next_path)


async def _root_route(request: web.Request) -> Route:
    """The sandbox's own origin a request of the gateway's own pages is on, with its owner."""
    gate = request.app[PREVIEW_GATE]
    # The gate's own routing, asked about this origin's root: the same host rules as every preview.
    route = gate.route(request.host, "/", has_bearer=False)
    if route is None or route.label is None:
        raise PreviewNotFound("no preview is served at this host")
    return await gate.resolved(route)


async def _ticket_user(request: web.Request, label: str | None) -> str:
    claims = verified_claims(
        request.query.get("ticket", ""), TICKET_AUDIENCE, request.app[PREVIEW_SESSIONS].key
    )
    if claims is None or claims.host != label:
        raise Unauthorized(
            "the preview login link is invalid or has expired; open the preview from the page again"
        )
    if claims.id is None:
        raise Unauthorized("the preview login link is invalid; open the preview from the page again")
    async with db.connection(request.app[DB]) as conn:
        first_use = await db.use_ticket(conn, claims.id, claims.expires)
    if not first_use:
        # A login link that leaked (history, a referrer, a shoulder) must not open the preview again.
        raise Unauthorized("this preview login link was used already; open the preview from the page again")
    return claims.subject


def _next_path(raw: str | None) -> str:
    """Where a login or a start goes on: a path of this origin only, never another site."""
    if (
        not raw
        or not raw.startswith("/")
        or raw.startswith("//")
        or "\\" in raw
        or raw.startswith(RESERVED_PREFIX)
    ):
        return "/"
    return raw


def _with_cookie(
    response: web.HTTPException, name: str, value: str, path: str, max_age: int, settings: Settings
) -> web.HTTPException:
    # Host-only (no Domain): the cookie goes back to this one origin, never to a sibling preview.
    response.set_cookie(
        name,
        value,
        path=path,
        max_age=max_age,
        httponly=True,
        samesite="Lax",
        secure=settings.preview_scheme == "https",
    )
    # The ticket or share key must not linger in the next page's referrer.
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
