"""GET /api/sandbox/ports: what listens in my sandbox (the agent's "ports"), each port with the
origin where its preview is served (`<port>-<label>`; 5173 also at the sandbox's own origin)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import agent
from .keys import PREVIEW_GATE, PREVIEW_HOSTS, SANDBOXES, USER
from .preview_access import DEV_SERVER_PORT


async def list_ports(request: web.Request) -> web.Response:
    user = request[USER]
    address = await request.app[SANDBOXES].agent(user)
    async with agent.operation(address, "ports") as stream:
        sockets = stream.answer.get("ports") or []
    label = await request.app[PREVIEW_HOSTS].label(user)
    gate = request.app[PREVIEW_GATE]
    by_port: dict[int, dict[str, Any]] = {}
    for found in sockets:
        port = int(found["port"])
        entry = by_port.get(port)
        if entry is None:
            entry = by_port[port] = {
                "port": port,
                "addresses": [],
                "process": None,
                "preview_url": gate.port_url(label, port),
            }
            if port == DEV_SERVER_PORT:
                entry["default_preview_url"] = (await gate.urls(user))["preview_url"]
        entry["addresses"].append(found["address"])
        if entry["process"] is None and found.get("pid") is not None:
            entry["process"] = {"pid": found["pid"], "command": found.get("command") or ""}
    return web.json_response({"ports": [by_port[port] for port in sorted(by_port)]})
