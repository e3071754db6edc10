"""Who may see a preview: its owner only, with the API's bearer token (scripts, curl) or, in a
browser, a preview-session cookie.

Browsers send no Authorization header on navigations, iframes or module scripts, so the page trades
its token for a one-minute login ticket (POST /api/sandbox/preview-session), and the preview origin
trades the ticket for a cookie: HttpOnly, SameSite=Lax, Path=/preview/<user>/, signed by a key the
gateways keep in PostgreSQL. The cookie is only ever sent to that user's preview path on the preview
origin, only opens that preview, and is stripped before the request reaches the dev server. The API
never accepts it.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlencode

from aiohttp import web

from .auth import parse_bearer
from .errors import Forbidden, InvalidRequest, Unauthorized
from .keys import PREVIEW_SESSIONS, SANDBOXES, SETTINGS, TOKENS, USER
from .preview_sessions import (
    SESSION_AUDIENCE,
    SESSION_LIFETIME_S,
    TICKET_AUDIENCE,
    TICKET_LIFETIME_S,
    PreviewSessions,
    sign,
    verified_user,
)
from .tokens import TokenVerifier

COOKIE = "sandbox_preview"
LOGIN_PATH = "/_preview/login"


async def preview_session(request: web.Request) -> web.Response:
    """POST /api/sandbox/preview-session: a login URL that gives this browser the preview cookie."""
    user = request[USER]
    settings = request.app[SETTINGS]
    ticket = sign(user, TICKET_AUDIENCE, TICKET_LIFETIME_S, request.app[PREVIEW_SESSIONS].key)
    login_url = f"{settings.preview_origin}{LOGIN_PATH}?{urlencode({'ticket': ticket})}"
    body = {
        "login_url": login_url,
        "preview_url": request.app[SANDBOXES].preview_url(user),
        "expires_in": TICKET_LIFETIME_S,
    }
    return web.json_response(body)


async def preview_login(request: web.Request) -> web.StreamResponse:
    """GET /_preview/login?ticket=...: sets the preview cookie and goes on to the preview."""
    settings = request.app[SETTINGS]
    if request.host != settings.preview_host:
        raise InvalidRequest("preview logins happen on the preview origin")
    user = verified_user(request.query.get("ticket", ""), TICKET_AUDIENCE, request.app[PREVIEW_SESSIONS].key)
    if user is None:
        raise Unauthorized(
            "the preview login link is invalid or has expired; open the preview from the page again"
        )
    response = web.HTTPSeeOther(f"/preview/{user}/")
    response.set_cookie(
        COOKIE,
        sign(user, SESSION_AUDIENCE, SESSION_LIFETIME_S, request.app[PREVIEW_SESSIONS].key),
        path=f"/preview/{user}/",
        max_age=SESSION_LIFETIME_S,
        httponly=True,
        samesite="Lax",
        secure=settings.preview_origin.startswith("https:"),
    )
    # The ticket must not linger in the history entry's referrer.
    response.headers["Referrer-Policy"] = "no-referrer"
    raise response


def authorize_viewer(request: web.Request, owner: str) -> None:
    """Lets the request through only if it comes from the preview's owner."""
    headers = request.headers
    check_viewer(
        owner,
        headers.get("Authorization"),
        headers.get("Cookie"),
        request.app[TOKENS],
        request.app[PREVIEW_SESSIONS],
    )


def check_viewer(
    owner: str,
    authorization: str | None,
    cookie_header: str | None,
    tokens: TokenVerifier,
    sessions: PreviewSessions,
) -> None:
    """The preview's owner, by bearer token or preview cookie, passes; anyone else gets the error
    to answer with. Takes header values, not a request: the front door (frontdoor.py) asks it too."""
    viewer: str | None
    if authorization is not None:
        viewer = tokens.verify(parse_bearer(authorization)).user
    else:
        cookie = preview_cookie(cookie_header or "")
        viewer = sessions.user(cookie) if cookie else None
        if viewer is None:
            raise Unauthorized("sign in to see this preview: open it from the page, or send a bearer token")
    if viewer != owner:
        raise Forbidden("this preview belongs to another user")


def preview_cookie(cookie_header: str) -> str | None:
    """Our cookie's value in a Cookie header. The first of the name wins: browsers send the cookie of
    the longest matching path first, and ours has the preview's own path."""
    for part in cookie_header.split(";"):
        name, sign, value = part.strip().partition("=")
        if sign and name == COOKIE:
            return value.strip('" ')
    return None


def strip_preview_cookie(cookie_header: str) -> str:
    """The Cookie header without ours, for the dev server, which must never see the credential."""
    kept = [part for part in cookie_header.split(";") if part.strip().partition("=")[0] != COOKIE]
    return ";".join(kept).strip()


def rewrite_set_cookie(value: str, prefix: str) -> str:
    """Keeps a dev server's cookie inside its preview: its Path under the prefix, no Domain."""
    cookie = SimpleCookie()
    try:
        cookie.load(value)
    except CookieError:
        # A cookie we cannot parse is dropped, never passed on unchecked.
        return ""
    for morsel in cookie.values():
        path = morsel["path"] or "/"
        if not path.startswith(prefix):
            morsel["path"] = prefix + path.lstrip("/")
        morsel["domain"] = ""
    return cookie.output(header="").strip()
