"""The web terminal: a real TTY (bash as `sandbox` in /workspace) bridged to a WebSocket.

Protocol (subprotocol `sandbox-terminal.v1`):
  client -> gateway  binary frame: bytes for the TTY (keystrokes, pastes; any bytes, UTF-8 or not)
                     text frame:   JSON control message, {"type": "resize", "cols": C, "rows": R}
  gateway -> client  binary frame: bytes the TTY wrote
  initial size:      query parameters ?cols=C&rows=R (optional)
Close codes: 1000 the shell exited, 1001 the gateway is shutting down, 1003 a malformed control
message, 4000 the sandbox stopped (the reason follows), 4009 the sandbox is not running,
4029 too many terminals for this user.

Both directions honour backpressure: output is read from Docker only as fast as the client takes it
(aiohttp's send waits for the socket to drain, and aiodocker pauses its socket when its queue is full),
so a flood toward a stalled client holds memory at a few buffers, not the whole flood.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import suppress
from enum import IntEnum
from typing import Any

import aiodocker
import asyncpg
from aiodocker.stream import Stream
from aiohttp import WSCloseCode, WSMsgType, web

from . import containers, db, terminal_leases
from .activity import Seen
from .auth import check_origin
from .containers import exec_errors, exit_code
from .errors import GatewayError, SandboxNotFound, SandboxNotRunning
from .keys import ACTIVITY, DOCKER_STREAMS, SANDBOXES, SETTINGS, TERMINAL_LEASES, TERMINALS, USER
from .sandboxes import Sandboxes

log = logging.getLogger(__name__)

PROTOCOL = "sandbox-terminal.v1"
HEARTBEAT_S = 30.0
HANGUP_TIMEOUT_S = 10.0
MAX_CONTROL_MESSAGE = 1024
SHELL = ["bash", "-l"]
# A shell's exit status from this up: it was killed by a signal (128 + the signal's number).
SIGNAL_EXIT = 128


class CloseCode(IntEnum):
    SHELL_EXITED = 1000
    GOING_AWAY = 1001
    BAD_MESSAGE = 1003
    SANDBOX_STOPPED = 4000
    SANDBOX_NOT_RUNNING = 4009
    TOO_MANY_TERMINALS = 4029


async def close_terminals_on_shutdown(app: web.Application) -> None:
    await app[TERMINALS].close_all(WSCloseCode.GOING_AWAY, "gateway shutting down")


async def terminal(request: web.Request) -> web.StreamResponse:
    check_origin(request, request.app[SETTINGS])
    size = _initial_size(request)
    user = request[USER]
    terminals = request.app[TERMINALS]
    ws = web.WebSocketResponse(protocols=[PROTOCOL], heartbeat=HEARTBEAT_S, max_msg_size=1024 * 1024)
    await ws.prepare(request)
    if not terminals.add(user, ws):
        await ws.close(
            code=CloseCode.TOO_MANY_TERMINALS,
            message=f"at most {terminals.max_per_user} terminals per user".encode(),
        )
        return ws
    try:
        await _serve(request, ws, user, size)
    finally:
        terminals.discard(user, ws)
    return ws


async def _serve(
    request: web.Request, ws: web.WebSocketResponse, user: str, size: tuple[int, int] | None
) -> None:
    sandboxes = request.app[SANDBOXES]
    docker = request.app[DOCKER_STREAMS]
    try:
        container_id = await sandboxes.running_container(user)
    except SandboxNotRunning as err:
        await ws.close(code=CloseCode.SANDBOX_NOT_RUNNING, message=err.message.encode())
        return
    run_id = secrets.token_hex(16)
    container = docker.containers.container(container_id)
    leases = request.app[TERMINAL_LEASES]
    shell_status: int | None = None
    try:
        with exec_errors("opening a terminal"):
            execution = await container.exec(
                SHELL,
                stdin=True,
                tty=True,
                user="sandbox",
                workdir="/workspace",
                environment={"TERM": "xterm-256color", "SANDBOX_RUN_ID": run_id},
            )
            async with leases.held(run_id, user), execution.start(detach=False) as stream:
                if size:
                    await execution.resize(w=size[0], h=size[1])
                code, reason = await _bridge(ws, stream, execution, Seen(request.app[ACTIVITY], user))
            if code == CloseCode.SHELL_EXITED:
                shell_status = await exit_code(execution)
    except GatewayError as err:
        code, reason = CloseCode.SANDBOX_NOT_RUNNING, err.message
    finally:
        await _hang_up(container, run_id)
    if code == CloseCode.SHELL_EXITED and (stopped := await _why_stopped(sandboxes, user, shell_status)):
        code, reason = CloseCode.SANDBOX_STOPPED, stopped
    await ws.close(code=code, message=reason.encode()[:120])


async def _bridge(
    ws: web.WebSocketResponse, stream: Stream, execution: Any, activity: Seen
) -> tuple[int, str]:
    """Relays both ways until either side ends; returns the close code and reason for the client."""
    output = asyncio.ensure_future(_relay_output(stream, ws, activity))
    keyboard = asyncio.ensure_future(_relay_input(ws, stream, execution, activity))
    try:
        done, _ = await asyncio.wait({output, keyboard}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (output, keyboard):
            task.cancel()
        await asyncio.gather(output, keyboard, return_exceptions=True)
    if keyboard in done and not keyboard.cancelled() and keyboard.exception() is None:
        return keyboard.result()
    return CloseCode.SHELL_EXITED, "the shell exited"


async def _relay_output(stream: Stream, ws: web.WebSocketResponse, activity: Seen) -> None:
    while (message := await stream.read_out()) is not None:
        # Awaiting the send is the backpressure: no reading from Docker while the client lags.
        await ws.send_bytes(message.data)
        await activity()


async def _relay_input(
    ws: web.WebSocketResponse, stream: Stream, execution: Any, activity: Seen
) -> tuple[int, str]:
    async for message in ws:
        if message.type == WSMsgType.BINARY:
            await stream.write_in(message.data)
            await activity()
        elif message.type == WSMsgType.TEXT:
            size = _parse_resize(message.data)
            if size is None:
                return CloseCode.BAD_MESSAGE, 'expected {"type": "resize", "cols": C, "rows": R}'
            await execution.resize(w=size[0], h=size[1])
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


async def hang_up_orphans(pool: asyncpg.Pool, sandboxes: Sandboxes, docker: aiodocker.Docker) -> int:
    """Hangs up the shells whose gateway stopped renewing their leases (it died); how many."""
    async with db.connection(pool) as conn:
        expired = await db.expired_terminal_leases(conn, terminal_leases.EXPIRE_S)
    for run_id, user in expired:
        try:
            container_id = await sandboxes.running_container(user)
        except SandboxNotRunning:
            pass  # stopped since: nothing of the shell is left
        else:
            await _hang_up(docker.containers.container(container_id), run_id)
        async with db.connection(pool) as conn:
            await db.end_terminal_lease(conn, run_id)
    if expired:
        log.info("hung up %d terminals whose gateway is gone", len(expired))
    return len(expired)


async def _hang_up(container: Any, run_id: str) -> None:
    """Ends the shell and its jobs the way a closed terminal does (SIGHUP); nohup'd work survives."""
    with suppress(aiodocker.DockerError, TimeoutError):
        hangup = await container.exec(["sandbox-hangup", run_id], user="sandbox")
        async with asyncio.timeout(HANGUP_TIMEOUT_S), hangup.start(detach=False) as stream:
            while await stream.read_out() is not None:
                pass


# After `docker kill`, the shell's stream ends a moment before the engine shows the container as
# exited: a shell that died of a signal gives the engine this long to tell.
DEATH_NOTICE_S = 2.0


async def _why_stopped(sandboxes: Sandboxes, user: str, shell_status: int | None) -> str | None:
    """Why the sandbox stopped under the shell that just ended, or None if it still runs."""
    deadline = asyncio.get_running_loop().time() + (
        DEATH_NOTICE_S if shell_status is None or shell_status >= SIGNAL_EXIT else 0
    )
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
