"""GET /api/sandbox/files/watch?path=DIR: a WebSocket that reports what changes under a folder of the
caller's sandbox, recursively, in coalesced batches (the agent's files.watch, files_watch.py there).

Subprotocol `sandbox-files.v1` (the token may come as `bearer.<token>`, as for the terminal).
  gateway -> client  {"type": "ready", "path", "folders"} once watching, then
                     {"type": "changes", "changes": [{"event", "path", "kind", "from"?}, ...]}
                     events: created, modified, deleted, moved (with "from"), changed (re-list the
                     folder: a burst was coalesced, or the watch's folder bound was reached)
Close codes: 1000 the watch ended, 1001 the gateway is shutting down, 1011 the sandbox's agent went
away (or the sandbox stopped), 4003 not permitted, 4004 no such folder (or not a folder),
4009 the sandbox is not running, 4029 too many watches.
"""

from __future__ import annotations

import asyncio
import logging
from enum import IntEnum
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from . import agent, agent_protocol
from .auth import check_origin
from .errors import AgentFailed, AgentUnavailable, GatewayError
from .files import sandbox_path
from .keys import FILE_WATCHES, SANDBOXES, SETTINGS, USER
from .websockets import serve_registered

log = logging.getLogger(__name__)

PROTOCOL = "sandbox-files.v1"
HEARTBEAT_S = 30.0


class CloseCode(IntEnum):
    ENDED = 1000
    AGENT_LOST = 1011
    FORBIDDEN = 4003
    NO_SUCH_FOLDER = 4004
    SANDBOX_NOT_RUNNING = 4009
    TOO_MANY_WATCHES = 4029


CLOSE_OF_AGENT_CODE = {
    "not_found": CloseCode.NO_SUCH_FOLDER,
    "not_a_folder": CloseCode.NO_SUCH_FOLDER,
    "forbidden": CloseCode.FORBIDDEN,
    "too_many": CloseCode.TOO_MANY_WATCHES,
}


async def close_watches_on_shutdown(app: web.Application) -> None:
    await app[FILE_WATCHES].close_all(WSCloseCode.GOING_AWAY, "gateway shutting down")


async def watch(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    check_origin(request, settings)
    path = sandbox_path(request.query.get("path"), default="/workspace")
    user = request[USER]
    ws = web.WebSocketResponse(protocols=[PROTOCOL], heartbeat=HEARTBEAT_S, max_msg_size=4096)
    await ws.prepare(request)
    await serve_registered(
        ws,
        request.app[FILE_WATCHES],
        user,
        lambda: _serve(request, ws, user, path),
        too_many=(CloseCode.TOO_MANY_WATCHES, "watches"),
    )
    return ws


async def _serve(request: web.Request, ws: web.WebSocketResponse, user: str, path: str) -> tuple[int, str]:
    limits = request.app[SETTINGS].files
    try:
        address = await request.app[SANDBOXES].agent(user)
        async with agent.operation(
            address,
            "files.watch",
            path=path,
            max_watches=limits.max_watches_per_sandbox,
            max_folders=limits.max_watch_folders,
        ) as stream:
            await ws.send_json({"type": "ready", "path": path, "folders": stream.answer.get("folders")})
            return await _relay(ws, stream)
    except AgentFailed as err:
        return CLOSE_OF_AGENT_CODE.get(err.code, CloseCode.AGENT_LOST), err.message
    except AgentUnavailable as err:
        return CloseCode.AGENT_LOST, err.message
    except GatewayError as err:
        return CloseCode.SANDBOX_NOT_RUNNING, err.message


async def _relay(ws: web.WebSocketResponse, stream: agent.AgentStream) -> tuple[int, str]:
    # The client sends nothing: its receive only notices the close (and answers pings).
    client = asyncio.ensure_future(ws.receive())
    reading = asyncio.ensure_future(stream.read_frame())
    try:
        while True:
            await asyncio.wait({client, reading}, return_when=asyncio.FIRST_COMPLETED)
            if client.done():
                message = client.result()
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    return CloseCode.ENDED, "closed"
                client = asyncio.ensure_future(ws.receive())
                continue
            frame = reading.result()
            if frame is None or frame[0] != agent_protocol.JSON:
                return CloseCode.AGENT_LOST, "the sandbox's agent ended the watch"
            update: dict[str, Any] = agent_protocol.parse_json(frame[1])
            if "changes" not in update:
                return CloseCode.ENDED, str(update.get("reason") or "the watch ended")
            await ws.send_json({"type": "changes", "changes": update["changes"]})
            reading = asyncio.ensure_future(stream.read_frame())
    finally:
        client.cancel()
        reading.cancel()
