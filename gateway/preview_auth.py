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

import time
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlencode

import jwt
from aiohttp import web

from .auth import parse_bearer
from .errors import Forbidden, InvalidRequest, Unauthorized
from .keys import PREVIEW_KEY, SANDBOXES, SETTINGS, TOKENS, USER
from .tokens import USER_PATTERN, TokenVerifier

COOKIE = "sandbox_preview"
LOGIN_PATH = "/_preview/login"
TICKET_AUDIENCE = "sandbox-gateway:preview-login"
SESSION_AUDIENCE = "sandbox-gateway:preview-session"
TICKET_LIFETIME_S = 60
SESSION_LIFETIME_S = 12 * 3600
ALGORITHM = "HS256"


def _sign(user: str, audience: str, lifetime_s: int, key: bytes) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": user, "aud": audience, "iat": now, "exp": now + lifetime_s}, key, algorithm=ALGORITHM
    )


def _verified_user(token: str, audience: str, key: bytes) -> str | None:
    try:
        claims = jwt.decode(
            token, key, algorithms=[ALGORITHM], audience=audience, options={"require": ["exp", "sub", "aud"]}
        )
    except jwt.InvalidTokenError:
        return None
    user = claims["sub"]
    return user if isinstance(user, str) and USER_PATTERN.fullmatch(user) else None


async def preview_session(request: web.Request) -> web.Response:
    """POST /api/sandbox/preview-session: a login URL that gives this browser the preview cookie."""
    user = request[USER]
    settings = request.app[SETTINGS]
    ticket = _sign(user, TICKET_AUDIENCE, TICKET_LIFETIME_S, request.app[PREVIEW_KEY])
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
    user = _verified_user(request.query.get("ticket", ""), TICKET_AUDIENCE, request.app[PREVIEW_KEY])
    if user is None:
        raise Unauthorized(
            "the preview login link is invalid or has expired; open the preview from the page again"
        )
    response = web.HTTPSeeOther(f"/preview/{user}/")
    response.set_cookie(
        COOKIE,
        _sign(user, SESSION_AUDIENCE, SESSION_LIFETIME_S, request.app[PREVIEW_KEY]),
        path=f"/preview/{user}/",
        max_age=SESSION_LIFETIME_S,
        httponly=True,
        samesite="Lax",
        secure=settings.preview_origin.startswith("https:"),
    )
    # The ticket must not linger in the history entry's referrer.
    response.headers["Referrer-Policy"] = "no-referrer"
    raise response


def authorize_viewer(request: web.Request, owner: str, key: bytes) -> None:
    """Lets the request through only if it comes from the preview's owner."""
    headers = request.headers
    check_viewer(owner, headers.get("Authorization"), headers.get("Cookie"), request.app[TOKENS], key)


def check_viewer(
    owner: str, authorization: str | None, cookie_header: str | None, tokens: TokenVerifier, key: bytes
) -> None:
    """The preview's owner, by bearer token or preview cookie, passes; anyone else gets the error
    to answer with. Takes header values, not a request: the front door (frontdoor.py) asks it too."""
    viewer: str | None
    if authorization is not None:
        viewer = tokens.verify(parse_bearer(authorization)).user
    else:
        cookie = preview_cookie(cookie_header or "")
        viewer = _verified_user(cookie, SESSION_AUDIENCE, key) if cookie else None
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
