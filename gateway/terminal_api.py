"""The terminals API: GET /api/sandbox/terminals and DELETE /api/sandbox/terminals/{id}, answered by
the agent of the caller's own sandbox, which keeps the terminals (the WebSocket: terminal.py).

Ids are looked up only in the caller's sandbox: another user's id is simply not there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from . import agent
from .errors import AgentUnavailable
from .keys import SANDBOXES, USER
from .terminal import valid_terminal_id


def _time(value: object) -> str | None:
    if not isinstance(value, int | float):
        return None
    return datetime.fromtimestamp(value, UTC).isoformat()


def terminal_json(described: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": described.get("id"),
        "created_at": _time(described.get("created")),
        "viewers": described.get("viewers"),
        "detached_since": _time(described.get("detached_since")),
        "cols": described.get("cols"),
        "rows": described.get("rows"),
    }


async def list_terminals(request: web.Request) -> web.Response:
    address = await request.app[SANDBOXES].agent(request[USER])
    async with agent.operation(address, "terminal.list") as stream:
        terminals = stream.answer.get("terminals")
    if not isinstance(terminals, list):
        raise AgentUnavailable("the sandbox's agent answered terminal.list without a list")
    return web.json_response({"terminals": [terminal_json(t) for t in terminals if isinstance(t, dict)]})


async def close_terminal(request: web.Request) -> web.Response:
    """Ends the terminal (its shell is hung up) and closes every socket on it; 404 if there is none."""
    terminal_id = valid_terminal_id(request.match_info["id"])
    address = await request.app[SANDBOXES].agent(request[USER])
    async with agent.operation(address, "terminal.close", id=terminal_id):
        pass
    return web.Response(status=204)
