"""Administration: every sandbox, for tokens that carry the admin claim (settings.admin_claim)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import db
from .auth import require_admin
from .errors import InvalidRequest, SandboxNotFound
from .keys import PREVIEW_GATE, SANDBOXES, SETTINGS
from .schemas import parse_purge, session_json
from .tokens import USER_PATTERN

DEFAULT_PAGE = 100
MAX_PAGE = 1000


async def list_sandboxes(request: web.Request) -> web.Response:
    """GET /api/admin/sandboxes[?state=running&limit=100&after=<user>]: a page of sessions in user
    order; `next` is the `after` of the following page, null on the last one."""
    require_admin(request)
    state = request.query.get("state")
    if state is not None and state not in db.SESSION_STATES:
        raise InvalidRequest(f"state: must be one of {', '.join(db.SESSION_STATES)}")
    limit = _page_size(request.query.get("limit"))
    after = request.query.get("after", "")
    # A user name, as `next` gives: anything else (a NUL, which PostgreSQL refuses in text) is a 400.
    if after and not USER_PATTERN.fullmatch(after):
        raise InvalidRequest("after: not a user name; pass the `next` of the previous page")
    sessions, next_after = await request.app[SANDBOXES].page(state=state, after=after, limit=limit)
    items = [await _admin_json(request, session) for session in sessions]
    return web.json_response({"sandboxes": items, "next": next_after})


async def get_any_sandbox(request: web.Request) -> web.Response:
    require_admin(request)
    user = _user(request)
    try:
        # As its owner sees it: a container that died from outside shows stopped, with why.
        session = await request.app[SANDBOXES].get(user)
    except SandboxNotFound:
        raise SandboxNotFound(f"{user} has no sandbox") from None
    return web.json_response(await _admin_json(request, session))


async def stop_any_sandbox(request: web.Request) -> web.Response:
    """DELETE /api/admin/sandboxes/<user>[?purge=true]: what the user's own DELETE does, for anyone."""
    require_admin(request)
    user, purge = _user(request), parse_purge(request)
    try:
        await request.app[SANDBOXES].stop(user, reason="admin", purge=purge)
    except SandboxNotFound:
        missing = "no running sandbox" + (" and no workspace" if purge else "")
        raise SandboxNotFound(f"{user} has {missing}") from None
    return web.Response(status=204)


def _user(request: web.Request) -> str:
    user = request.match_info["user"]
    if not USER_PATTERN.fullmatch(user):
        raise InvalidRequest("user: not a valid user name")
    return user


def _page_size(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequest(f"limit: must be a whole number from 1 to {MAX_PAGE}")
    return int(raw)


async def _admin_json(request: web.Request, session: db.Session) -> dict[str, Any]:
    urls = await request.app[PREVIEW_GATE].urls(session.user)
    body = session_json(session, request.app[SETTINGS], urls)
    body["container_id"] = session.container_id
    return body
