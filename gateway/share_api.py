"""The share-link API: POST, GET and DELETE /api/sandbox/shares (what a link grants: shares.py)."""

from __future__ import annotations

import secrets

import pydantic
from aiohttp import web

from . import db
from .db import Share
from .errors import InvalidRequest, ShareNotFound, TooManyShares
from .keys import PREVIEW_HOSTS, SETTINGS, SHARES, USER
from .schemas import StrictModel, parse_body
from .settings import Settings
from .shares import SHARE_PATH, secret_hash

DEFAULT_LIFETIME_S = 24 * 3600


class ShareBody(StrictModel):
    expires_in_s: int = pydantic.Field(default=DEFAULT_LIFETIME_S, ge=60)
    # Whether a viewer's visit may start the stopped sandbox (it counts against the owner's starts).
    can_wake: bool = False


def share_json(share: Share, settings: Settings, label: str, secret: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {
        "id": share.id,
        "created_at": share.created_at.isoformat(),
        "expires_at": share.expires_at.isoformat(),
        "can_wake": share.can_wake,
        "preview_url": settings.preview_root_origin(label) + "/",
    }
    if secret is not None:
        # Only when made: the secret is not kept, so the link cannot be shown again.
        body["url"] = f"{settings.preview_root_origin(label)}{SHARE_PATH}?key={secret}"
    return body


async def create_share(request: web.Request) -> web.Response:
    """POST /api/sandbox/shares: a new link to view my preview."""
    body = await parse_body(request, ShareBody, optional=True)
    settings = request.app[SETTINGS]
    if body.expires_in_s > settings.share_max_lifetime_s:
        raise InvalidRequest(f"expires_in_s: at most {settings.share_max_lifetime_s} allowed")
    user = request[USER]
    label = await request.app[PREVIEW_HOSTS].label(user)
    secret = secrets.token_urlsafe(24)
    pool = request.app[SHARES].pool
    async with db.connection(pool) as conn, db.user_lock(conn, user):
        if await db.count_live_shares(conn, user) >= settings.max_shares_per_user:
            raise TooManyShares(f"at most {settings.max_shares_per_user} live share links; revoke one first")
        share = await db.create_share(
            conn, secrets.token_hex(8), user, secret_hash(secret), body.expires_in_s, body.can_wake
        )
    return web.json_response(share_json(share, settings, label, secret), status=201)


async def list_shares(request: web.Request) -> web.Response:
    """GET /api/sandbox/shares: my live links (without their secrets)."""
    user = request[USER]
    label = await request.app[PREVIEW_HOSTS].label(user)
    async with db.connection(request.app[SHARES].pool) as conn:
        shares = await db.user_shares(conn, user)
    settings = request.app[SETTINGS]
    return web.json_response({"shares": [share_json(share, settings, label) for share in shares]})


async def revoke_share(request: web.Request) -> web.Response:
    """DELETE /api/sandbox/shares/{id}: the link stops opening the preview, on every gateway within a
    second; viewers who hold its cookie are refused from then on."""
    share_id = request.match_info["id"]
    async with db.connection(request.app[SHARES].pool) as conn:
        revoked = await db.revoke_share(conn, request[USER], share_id)
    if not revoked:
        # Another user's share id is as unknown to me as one that never was.
        raise ShareNotFound("you have no live share link with that id")
    request.app[SHARES].forget(share_id)
    return web.Response(status=204)
