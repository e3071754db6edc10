"""Who is calling: a JWT in `Authorization: Bearer`, verified with the configured key and algorithm."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import Forbidden
from .keys import IS_ADMIN, PUBLIC_ROUTES, TOKENS, USER
from .settings import Settings
from .tokens import parse_bearer

BEARER_SUBPROTOCOL_PREFIX = "bearer."


def bearer_token(request: web.Request) -> str:
    """The token from `Authorization: Bearer`, or for a WebSocket upgrade, which a browser cannot give
    headers, from an offered subprotocol `bearer.<token>` (as Kubernetes does). Never from the query
    string, which ends up in logs and browser history."""
    header = request.headers.get("Authorization", "")
    if not header and request.headers.get("Upgrade", "").lower() == "websocket":
        for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
            if protocol.strip().startswith(BEARER_SUBPROTOCOL_PREFIX):
                return protocol.strip().removeprefix(BEARER_SUBPROTOCOL_PREFIX)
    return parse_bearer(header)


def require_admin(request: web.Request) -> None:
    if not request[IS_ADMIN]:
        raise Forbidden("this needs an administrator's token")


def check_origin(request: web.Request, settings: Settings) -> None:
    """Refuses a browser's WebSocket upgrade from another site: without this, any page a signed-in
    user visits could open their terminal with their credentials. Clients that send no Origin are
    not browsers, and must present a token themselves."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    allowed = {settings.public_origin, f"{request.scheme}://{request.host}", *settings.allowed_origins}
    if origin.rstrip("/") not in allowed:
        raise Forbidden(f"WebSocket connections from origin {origin} are not allowed")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticates every route that is not listed as public; unknown paths fall through to 404."""
    match_info = request.match_info
    if match_info.http_exception is None and match_info.route not in request.app[PUBLIC_ROUTES]:
        identity = request.app[TOKENS].verify(bearer_token(request))
        request[USER] = identity.user
        request[IS_ADMIN] = identity.is_admin
    return await handler(request)
