"""Ready-made projects: POST /api/sandbox/projects creates one from a template in the caller's
/workspace, set up to serve under its preview base, and can start its dev server."""

from __future__ import annotations

import logging

from aiohttp import web

from . import processes
from .errors import ProjectExists, ProjectFailed
from .keys import EXEC_RUNNER, PREVIEW_GATE, SANDBOXES, SETTINGS, USER
from .schemas import ProjectBody, parse_body

log = logging.getLogger(__name__)

# npm create and npm install fetch from the registry: minutes on a slow network, not seconds.
CREATE_TIMEOUT_MS = 300_000
EXISTS_EXIT_CODE = 17
LOG_TAIL = 4000


async def create_project(request: web.Request) -> web.Response:
    body = await parse_body(request, ProjectBody)
    user = request[USER]
    sandboxes = request.app[SANDBOXES]
    runner = request.app[EXEC_RUNNER]
    async with runner.slot(user):
        address = await sandboxes.agent(user)
        result = await runner.run_program(
            address,
            ["sandbox-new-project", body.template, body.name],
            b"",
            CREATE_TIMEOUT_MS,
        )
    if result.exit_code == EXISTS_EXIT_CODE:
        raise ProjectExists(f"/workspace/{body.name} exists already; choose another name")
    if result.exit_code != 0 or result.timed_out:
        log.info("creating a %s project for %s failed with %s", body.template, user, result.exit_code)
        raise ProjectFailed(f"creating the project failed: {(result.stderr or result.stdout)[-LOG_TAIL:]}")
    if body.start:
        # A background process of the agent's: it outlives this request, until killed or the sandbox stops.
        await processes.start_background(
            address, request.app[SETTINGS].processes, ["sandbox-start-dev", body.name]
        )
    payload = {
        "name": body.name,
        "path": f"/workspace/{body.name}",
        "template": body.template,
        "started": body.start,
        "dev_server_log": f"/workspace/{body.name}/.dev-server.log" if body.start else None,
        **await request.app[PREVIEW_GATE].urls(user),
    }
    return web.json_response(payload, status=201)
