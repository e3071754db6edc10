"""The processes API (README "Processes"): start, list, look at, feed, signal a process of one's own
sandbox, and follow its output as server-sent events.

The output stream: each event's id is the offset just past what it carries (a running byte count
over stdout and stderr together), so EventSource's Last-Event-ID, or ?from=, resumes exactly after a
reconnect, through any gateway (the agent keeps the log). Events: `stdout` and `stderr`
({"offset", "text"}, plus "base64" of the raw bytes when they are not UTF-8, "text" then being a lossy
decoding), `gap` ({"from", "to", "dropped"}: bytes the bounded log no longer had), `exit`
({"exit_code", "signal", "timed_out"}), after which the stream ends. A reconnect (Last-Event-ID)
past the end of an ended process gets 204, which tells EventSource to stop reconnecting.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

from aiohttp import web

from . import agent, agent_protocol, processes
from .errors import AgentUnavailable, InvalidRequest
from .keys import PROCESS_STREAMS, SANDBOXES, SETTINGS, USER
from .processes import ProcessBody, SignalBody
from .schemas import check_identity_coding, parse_body

log = logging.getLogger(__name__)

STDIN_READ_TIMEOUT_S = 30.0
# How often an idle stream looks whether its client is still there.
DISCONNECT_CHECK_S = 1.0
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    # nginx and the like: pass each event on as it comes.
    "X-Accel-Buffering": "no",
}


async def start_process(request: web.Request) -> web.Response:
    body = await parse_body(request, ProcessBody)
    settings = request.app[SETTINGS]
    start = processes.to_start(body, settings.processes, settings.exec)
    address = await request.app[SANDBOXES].agent(request[USER])
    described = await processes.start(address, settings.processes, start)
    return web.json_response(described, status=201)


async def list_processes(request: web.Request) -> web.Response:
    address = await request.app[SANDBOXES].agent(request[USER])
    return web.json_response({"processes": await processes.list_all(address)})


async def get_process(request: web.Request) -> web.Response:
    process_id = processes.check_id(request.match_info["id"])
    address = await request.app[SANDBOXES].agent(request[USER])
    return web.json_response(await processes.get(address, process_id))


async def signal_process(request: web.Request) -> web.Response:
    process_id = processes.check_id(request.match_info["id"])
    body = await parse_body(request, SignalBody)
    address = await request.app[SANDBOXES].agent(request[USER])
    signalled = await processes.send_signal(address, process_id, body.signal)
    return web.json_response({"signal": body.signal, "signalled": signalled})


async def kill_process(request: web.Request) -> web.Response:
    """DELETE: SIGKILL to all of it. The process stays listed, ended, for its retention."""
    process_id = processes.check_id(request.match_info["id"])
    address = await request.app[SANDBOXES].agent(request[USER])
    await processes.send_signal(address, process_id, "SIGKILL")
    return web.Response(status=204)


async def write_stdin(request: web.Request) -> web.Response:
    """The raw body to the process's stdin; ?eof=true closes it after."""
    process_id = processes.check_id(request.match_info["id"])
    eof = request.query.get("eof", "false")
    if eof not in ("true", "false"):
        raise InvalidRequest("eof: must be true or false")
    check_identity_coding(request)
    async with asyncio.timeout(STDIN_READ_TIMEOUT_S):
        data = await request.read()
    limit = request.app[SETTINGS].exec.max_stdin_bytes
    if len(data) > limit:
        raise InvalidRequest(f"body: at most {limit} bytes of input at a time")
    address = await request.app[SANDBOXES].agent(request[USER])
    await processes.write_stdin(address, process_id, data, close=eof == "true")
    return web.Response(status=204)


def _resume_offset(request: web.Request) -> tuple[int, bool]:
    """Where to start (?from= wins over Last-Event-ID), and whether this is an EventSource reconnect."""
    raw, reconnect = request.query.get("from"), False
    if raw is None and (last := request.headers.get("Last-Event-ID")):
        raw, reconnect = last, True
    if raw is None:
        return 0, False
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidRequest("from: must be an offset, a non-negative integer")
    return int(raw), reconnect


def event(name: str, offset: int, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\nid: {offset}\ndata: {payload}\n\n".encode()


def output_event(kind: bytes, start: int, data: bytes) -> bytes:
    name = "stdout" if kind == agent_protocol.STDOUT else "stderr"
    body: dict[str, Any] = {"offset": start}
    try:
        body["text"] = data.decode()
    except UnicodeDecodeError:
        body["text"] = data.decode(errors="replace")
        body["base64"] = base64.b64encode(data).decode()
    return event(name, start + len(data), body)


async def process_output(request: web.Request) -> web.StreamResponse:
    process_id = processes.check_id(request.match_info["id"])
    offset, reconnect = _resume_offset(request)
    user, settings = request[USER], request.app[SETTINGS]
    async with request.app[PROCESS_STREAMS].slot(user):
        address = await request.app[SANDBOXES].agent(user)
        async with processes.operation(
            address, "process.attach", id=process_id, **{"from": offset}
        ) as stream:
            described, offset = stream.answer["process"], int(stream.answer["offset"])
            if reconnect and described["state"] == "exited" and offset >= described["output"]["end"]:
                return web.Response(status=204)
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            try:
                await _relay(request, stream, response, offset, settings.processes.heartbeat_s)
            except (ConnectionError, AgentUnavailable, agent_protocol.ProtocolError) as err:
                # The client went, or the agent did: either way the stream ends; a client resumes.
                log.debug("process output stream ended: %r", err)
            return response


async def _relay(
    request: web.Request,
    stream: agent.AgentStream,
    response: web.StreamResponse,
    offset: int,
    heartbeat_s: float,
) -> None:
    # Tell the client early that the stream is live (and how soon to come back when it breaks).
    await response.write(b"retry: 1000\n\n")
    reading = asyncio.ensure_future(stream.read_frame())
    last_write = time.monotonic()
    try:
        while True:
            # The read stays pending across ticks: cancelling it could cut a frame in half. Each tick
            # also notices a client that went away, so that its slot is free before a heartbeat fails.
            done, _ = await asyncio.wait({reading}, timeout=min(heartbeat_s, DISCONNECT_CHECK_S))
            if not done:
                if request.transport is None or request.transport.is_closing():
                    return
                if time.monotonic() - last_write >= heartbeat_s:
                    await response.write(b": keep-alive\n\n")
                    last_write = time.monotonic()
                continue
            last_write = time.monotonic()
            message = reading.result()
            if message is None:
                return  # the agent ended it (it stopped): the client reconnects and learns
            kind, payload = message
            if kind != agent_protocol.JSON:
                await response.write(output_event(kind, offset, payload))
                offset += len(payload)
            else:
                update = agent_protocol.parse_json(payload)
                if gap := update.get("gap"):
                    offset = int(gap["to"])
                    dropped = {"from": gap["from"], "to": gap["to"], "dropped": gap["to"] - gap["from"]}
                    await response.write(event("gap", offset, dropped))
                elif ending := update.get("exit"):
                    body = {k: ending.get(k) for k in ("exit_code", "signal", "timed_out")}
                    await response.write(event("exit", offset, body))
                    return
            reading = asyncio.ensure_future(stream.read_frame())
    finally:
        reading.cancel()
