"""The web terminal: a WebSocket onto a terminal that the sandbox's agent keeps
(sandbox-image/agent/sandbox_agent/terminals.py): a shell on a pty, `bash -l` as `sandbox` in /workspace.

Protocol (README, "The web terminal"), subprotocol `sandbox-terminal.v2` or `sandbox-terminal.v1`:
  client -> gateway  binary frame: bytes for the TTY (keystrokes, pastes; any bytes, UTF-8 or not)
                     text frame:   JSON control message, {"type": "resize", "cols": C, "rows": R}
  gateway -> client  binary frame: bytes the TTY wrote (after an attach, the replay first)
                     text frame (v2 only): {"type": "attached", "id", "replayed": N, "new": bool} first,
                     {"type": "ended", "reason", "exit"} when the terminal ends
  query:             ?cols=C&rows=R (optional), ?id=<terminal id> attaches to an existing terminal
Close codes: 1000 the shell exited or the terminal was closed, 1001 the gateway is shutting down,
1003 a malformed control message, 1011 the sandbox's agent went away, 4000 the sandbox stopped (the
reason follows), 4004 no such terminal, 4008 this socket fell behind the output (reattach),
4009 the sandbox is not running, 4029 too many terminals for this user or this sandbox.

A v1 socket that opens a terminal owns it, as before: closing the socket hangs the shell up (a grace
period of 0). A v2 terminal is detached when its last socket goes and lives for the grace period
(settings.terminal.grace_s); any gateway process can reattach it, since it lives in the agent.

Both directions honour backpressure: output is read from the agent only as fast as the client takes it
(aiohttp's send waits for the socket to drain), and the agent holds the shell's output while a socket
lags, up to its bound (terminals.py), so a flood toward a stalled client costs a few buffers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from contextlib import suppress
from enum import IntEnum
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from . import agent, agent_protocol, containers
from .activity import Seen
from .auth import check_origin
from .errors import (
    AgentFailed,
    AgentUnavailable,
    GatewayError,
    InvalidRequest,
    SandboxNotFound,
    SandboxNotRunning,
)
from .keys import ACTIVITY, SANDBOXES, SETTINGS, TERMINALS, USER
from .sandboxes import Sandboxes
from .settings import TerminalSettings
from .websockets import serve_registered

log = logging.getLogger(__name__)

PROTOCOL_V1 = "sandbox-terminal.v1"
PROTOCOL_V2 = "sandbox-terminal.v2"
HEARTBEAT_S = 30.0
MAX_CONTROL_MESSAGE = 1024
# The agent's terminal ids: 24 hex digits.
TERMINAL_ID = re.compile(r"[0-9a-f]{24}")
# A shell's exit status from this up: it was killed by a signal (128 + the signal's number).
SIGNAL_EXIT = 128


class CloseCode(IntEnum):
    SHELL_EXITED = 1000
    GOING_AWAY = 1001
    BAD_MESSAGE = 1003
    AGENT_LOST = 1011
    SANDBOX_STOPPED = 4000
    NO_SUCH_TERMINAL = 4004
    FELL_BEHIND = 4008
    SANDBOX_NOT_RUNNING = 4009
    TOO_MANY_TERMINALS = 4029


async def close_terminals_on_shutdown(app: web.Application) -> None:
    await app[TERMINALS].close_all(WSCloseCode.GOING_AWAY, "gateway shutting down")


def valid_terminal_id(value: str) -> str:
    if not TERMINAL_ID.fullmatch(value):
        raise InvalidRequest("a terminal id is 24 hexadecimal digits")
    return value


async def terminal(request: web.Request) -> web.StreamResponse:
    check_origin(request, request.app[SETTINGS])
    size = _initial_size(request)
    terminal_id = request.query.get("id")
    if terminal_id is not None:
        valid_terminal_id(terminal_id)
    user = request[USER]
    # The client's order decides when it offers both (aiohttp takes the first of its list we speak).
    ws = web.WebSocketResponse(
        protocols=[PROTOCOL_V2, PROTOCOL_V1], heartbeat=HEARTBEAT_S, max_msg_size=1024 * 1024
    )
    await ws.prepare(request)
    await serve_registered(
        ws,
        request.app[TERMINALS],
        user,
        lambda: _serve(request, ws, user, size, terminal_id),
        too_many=(CloseCode.TOO_MANY_TERMINALS, "terminals"),
    )
    return ws


def _operation(
    settings: TerminalSettings, v2: bool, size: tuple[int, int] | None, terminal_id: str | None
) -> tuple[str, dict[str, Any]]:
    dimensions = {"cols": size[0], "rows": size[1]} if size else {}
    if terminal_id is not None:
        return "terminal.attach", {"id": terminal_id, **dimensions}
    return "terminal.open", {
        **dimensions,
        # A v1 client cannot learn the id, so cannot come back: its terminal ends with its socket.
        "grace_s": settings.grace_s if v2 else 0,
        "ring_bytes": settings.replay_bytes,
        "max_terminals": settings.max_per_sandbox,
        "viewer_buffer_bytes": settings.viewer_buffer_bytes,
        "viewer_stall_s": settings.viewer_stall_s,
    }


async def _serve(
    request: web.Request,
    ws: web.WebSocketResponse,
    user: str,
    size: tuple[int, int] | None,
    terminal_id: str | None,
) -> tuple[int, str]:
    """Attaches the socket to a terminal until either ends; the close code and reason."""
    sandboxes = request.app[SANDBOXES]
    v2 = ws.ws_protocol == PROTOCOL_V2
    try:
        address = await sandboxes.agent(user)
    except SandboxNotRunning as err:
        return CloseCode.SANDBOX_NOT_RUNNING, err.message
    op, params = _operation(request.app[SETTINGS].terminal, v2, size, terminal_id)
    end: dict[str, Any] | None = None
    try:
        async with agent.operation(address, op, **params) as stream:
            if v2:
                answer = stream.answer
                attached = {"type": "attached", "id": answer.get("id"), "replayed": answer.get("replayed")}
                await ws.send_str(json.dumps({**attached, "new": terminal_id is None}))
            outcome = await _bridge(ws, stream, Seen(request.app[ACTIVITY], user))
            if isinstance(outcome, tuple):
                return outcome  # the client's end: it closed, or broke the protocol
            end = outcome
    except AgentFailed as err:
        if err.code == "not_found":
            return CloseCode.NO_SUCH_TERMINAL, err.message
        if err.code == "too_many":
            return CloseCode.TOO_MANY_TERMINALS, err.message
        return CloseCode.AGENT_LOST, err.message
    except AgentUnavailable:
        end = None
    except GatewayError as err:
        return CloseCode.SANDBOX_NOT_RUNNING, err.message
    if v2 and end is not None and not ws.closed:
        with suppress(ConnectionError):  # the client went at the same moment
            ended = {"type": "ended", "reason": end.get("reason"), "exit": end.get("exit")}
            await ws.send_str(json.dumps(ended))
    return await _close_for(sandboxes, user, end)


async def _close_for(sandboxes: Sandboxes, user: str, end: dict[str, Any] | None) -> tuple[int, str]:
    """The close code for a terminal's end as the agent told it, or for an agent that went silent."""
    reason = end.get("reason") if end else None
    status = end.get("exit") if end else None
    if reason == "lagging":
        return CloseCode.FELL_BEHIND, "this connection fell behind the terminal's output: reattach"
    if reason in ("closed", "expired"):
        return CloseCode.SHELL_EXITED, "the terminal was closed"
    # The shell may have died with its sandbox (docker kill): the sandbox's state says.
    died = reason != "exited" or not isinstance(status, int) or status >= SIGNAL_EXIT
    if stopped := await _why_stopped(sandboxes, user, died):
        return CloseCode.SANDBOX_STOPPED, stopped
    if reason == "exited":
        return CloseCode.SHELL_EXITED, "the shell exited"
    if reason == "stopping":
        return CloseCode.SANDBOX_STOPPED, "the sandbox stopped"
    return CloseCode.AGENT_LOST, "the sandbox's agent went away"


async def _bridge(
    ws: web.WebSocketResponse, stream: agent.AgentStream, activity: Seen
) -> tuple[int, str] | dict[str, Any] | None:
    """Relays both ways until either side ends: the client's close code and reason, or the agent's
    end message (None if the agent's connection ended without one)."""
    output = asyncio.ensure_future(_relay_output(stream, ws, activity))
    keyboard = asyncio.ensure_future(_relay_input(ws, stream, activity))
    try:
        done, _ = await asyncio.wait({output, keyboard}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (output, keyboard):
            task.cancel()
        await asyncio.gather(output, keyboard, return_exceptions=True)
    if keyboard in done and not keyboard.cancelled() and keyboard.exception() is None:
        return keyboard.result()
    if output in done and not output.cancelled() and output.exception() is None:
        return output.result()
    return None


async def _relay_output(
    stream: agent.AgentStream, ws: web.WebSocketResponse, activity: Seen
) -> dict[str, Any] | None:
    while (message := await stream.read_frame()) is not None:
        kind, payload = message
        if kind == agent_protocol.JSON:
            end = agent_protocol.parse_json(payload)
            if end.get("type") == "end":
                return end
            continue
        # Awaiting the send is the backpressure: no reading from the agent while the client lags.
        await ws.send_bytes(payload)
        await activity()
    return None


async def _relay_input(
    ws: web.WebSocketResponse, stream: agent.AgentStream, activity: Seen
) -> tuple[int, str]:
    async for message in ws:
        if message.type == WSMsgType.BINARY:
            for start in range(0, len(message.data), agent_protocol.MAX_FRAME):
                await stream.send(
                    agent_protocol.STDIN, message.data[start : start + agent_protocol.MAX_FRAME]
                )
            await activity()
        elif message.type == WSMsgType.TEXT:
            size = _parse_resize(message.data)
            if size is None:
                return CloseCode.BAD_MESSAGE, 'expected {"type": "resize", "cols": C, "rows": R}'
            await stream.send_json({"type": "resize", "cols": size[0], "rows": size[1]})
    return WSCloseCode.OK, "closed by the client"


def _parse_resize(data: str) -> tuple[int, int] | None:
    if len(data) > MAX_CONTROL_MESSAGE:
        return None
    try:
        message = json.loads(data)
    except ValueError:
        return None
    if (
        not isinstance(message, dict)
        or message.get("type") != "resize"
        or set(message) != {"type", "cols", "rows"}
    ):
        return None
    return _valid_size(message["cols"], message["rows"])


def _initial_size(request: web.Request) -> tuple[int, int] | None:
    cols, rows = request.query.get("cols"), request.query.get("rows")
    if cols is None and rows is None:
        return None
    if cols is None or rows is None or not cols.isdigit() or not rows.isdigit():
        raise web.HTTPBadRequest(text="cols and rows must both be positive integers")
    size = _valid_size(int(cols), int(rows))
    if size is None:
        raise web.HTTPBadRequest(text="cols and rows must be between 1 and 1000")
    return size


def _valid_size(cols: object, rows: object) -> tuple[int, int] | None:
    valid = all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000 for v in (cols, rows))
    return (cols, rows) if valid else None  # type: ignore[return-value]


# After `docker kill`, the agent's connection ends a moment before the engine shows the container as
# exited: a shell that died with its sandbox gives the engine this long to tell.
DEATH_NOTICE_S = 2.0


async def _why_stopped(sandboxes: Sandboxes, user: str, died: bool) -> str | None:
    """Why the sandbox stopped under the terminal that just ended, or None if it still runs."""
    deadline = asyncio.get_running_loop().time() + (DEATH_NOTICE_S if died else 0)
    while True:
        try:
            session = await sandboxes.get(user)  # records a death from outside, as has_stopped does
        except SandboxNotFound:
            return "the sandbox stopped"
        except GatewayError:
            session = None  # the engine or the database away: cannot tell, so as if it still ran
        if session is not None and session.state not in (containers.RUNNING, containers.PAUSED):
            why = session.stop_reason
            return f"the sandbox stopped ({why})" if why else "the sandbox stopped"
        if asyncio.get_running_loop().time() >= deadline:
            return None
        await asyncio.sleep(0.05)
