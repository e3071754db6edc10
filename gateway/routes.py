"""The HTTP API: thin handlers that parse, call the lifecycle or the runner, and shape JSON."""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from pathlib import Path

from aiohttp import web

from . import db, files_api, ratelimit
from .admin import get_any_sandbox, list_sandboxes, stop_any_sandbox
from .errors import GatewayError, ServiceUnavailable
from .execute import ExecResult
from .files_watch import watch as watch_files
from .keys import (
    DB,
    EGRESS,
    EXEC_RUNNER,
    METRICS,
    OPENAPI_DOCUMENT,
    PREVIEW_GATE,
    PUBLIC_ROUTES,
    SANDBOXES,
    SETTINGS,
    USER,
)
from .metrics import Metrics
from .metrics_http import metrics_endpoint
from .ports_api import list_ports
from .preview import START_PATH, preview, preview_redirect_slash
from .preview_auth import (
    LOGIN_PATH,
    ROOT_LOGIN_PATH,
    open_share,
    preview_login,
    preview_session,
    root_login,
    wake,
)
from .process_api import (
    get_process,
    kill_process,
    list_processes,
    process_output,
    signal_process,
    start_process,
    write_stdin,
)
from .projects import create_project
from .schemas import ExecBody, StartBody, exec_json, parse_body, parse_purge, session_json
from .share_api import create_share, list_shares, revoke_share
from .shares import SHARE_PATH
from .terminal import terminal
from .terminal_api import close_terminal, list_terminals

# The page as Vite built it (scripts/build-page.sh); the sources are in static/ beside it.
PAGE_DIR = Path(__file__).resolve().parent.parent / "static" / "dist"
HEALTH_TIMEOUT_S = 3.0


async def start_sandbox(request: web.Request) -> web.Response:
    await parse_body(request, StartBody, optional=True)
    sandboxes = request.app[SANDBOXES]
    user = request[USER]
    await ratelimit.take(request.app[DB], user, "start", request.app[SETTINGS].start_rate)
    metrics = request.app[METRICS]
    started = time.perf_counter()
    try:
        result = await sandboxes.start(user)
    except GatewayError:
        metrics.starts.labels("failed").inc()
        raise
    if result.created:
        metrics.start_seconds.observe(time.perf_counter() - started)
    metrics.starts.labels("created" if result.created else "existing").inc()
    body = session_json(result.session, request.app[SETTINGS], await request.app[PREVIEW_GATE].urls(user))
    return web.json_response(body, status=201 if result.created else 200)


async def get_sandbox(request: web.Request) -> web.Response:
    user = request[USER]
    session = await request.app[SANDBOXES].get(user)
    urls = await request.app[PREVIEW_GATE].urls(user)
    return web.json_response(session_json(session, request.app[SETTINGS], urls))


async def stop_sandbox(request: web.Request) -> web.Response:
    """DELETE /api/sandbox[?purge=true]: stop; with purge, also delete the workspace for good."""
    await request.app[SANDBOXES].stop(request[USER], purge=parse_purge(request))
    return web.Response(status=204)


async def exec_snippet(request: web.Request) -> web.Response:
    body = await parse_body(request, ExecBody)
    exec_request = body.to_request(request.app[SETTINGS])
    user = request[USER]
    await ratelimit.take(request.app[DB], user, "exec", request.app[SETTINGS].exec_rate)
    runner = request.app[EXEC_RUNNER]
    async with runner.slot(user):
        address = await request.app[SANDBOXES].agent(user)
        result = await runner.run(address, exec_request)
    _count_exec(request.app[METRICS], body.language, result)
    return web.json_response(exec_json(result))


def _count_exec(metrics: Metrics, language: str, result: ExecResult) -> None:
    outcome = "timeout" if result.timed_out else "ok" if result.exit_code == 0 else "error"
    metrics.execs.labels(language, outcome).inc()
    metrics.exec_seconds.labels(language).observe(result.duration_ms / 1000)


async def healthz(request: web.Request) -> web.Response:
    """Liveness, plus whether Docker and PostgreSQL answer and the egress rules hold; 503 when one
    does not (no sandbox could start)."""
    docker_ok, database_ok, egress_ok = await asyncio.gather(
        _answers(request.app[SANDBOXES].engine_answers()),
        _answers(_ping_database(request)),
        request.app[EGRESS].holds_recently(),
    )
    ok = docker_ok and database_ok and egress_ok
    body = {
        "status": "ok" if ok else "degraded",
        "docker": docker_ok,
        "database": database_ok,
        "egress": egress_ok,
    }
    return web.json_response(body, status=200 if ok else 503)


async def _ping_database(request: web.Request) -> None:
    async with db.connection(request.app[DB]) as conn:
        await db.ping(conn)


async def _answers(check: object) -> bool:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            await check  # type: ignore[misc]
    except (GatewayError, TimeoutError):
        return False
    return True


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_DOCUMENT], content_type="application/json")


async def index(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if request.host != settings.public_host:
        # The page must run on its public origin: previews are isolated from it by origin, and the
        # browser's fragment (a development token) survives the redirect.
        raise web.HTTPTemporaryRedirect(f"{settings.public_origin}/")
    page = PAGE_DIR / "index.html"
    if not await asyncio.to_thread(page.is_file):
        raise ServiceUnavailable("the page is not built: run scripts/build-page.sh")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


def _load_openapi() -> bytes:
    document = resources.files(__package__).joinpath("openapi.json").read_bytes()
    json.loads(document)  # fail at start-up, not on the first request, if it is broken
    return document


def setup_routes(app: web.Application) -> None:
    app[OPENAPI_DOCUMENT] = _load_openapi()
    router = app.router
    router.add_post("/api/sandbox", start_sandbox)
    router.add_get("/api/sandbox", get_sandbox, allow_head=False)
    router.add_delete("/api/sandbox", stop_sandbox)
    router.add_post("/api/sandbox/exec", exec_snippet)
    router.add_get("/api/sandbox/terminal", terminal, allow_head=False)
    router.add_get("/api/sandbox/terminals", list_terminals, allow_head=False)
    router.add_delete("/api/sandbox/terminals/{id}", close_terminal)
    router.add_post("/api/sandbox/preview-session", preview_session)
    router.add_post("/api/sandbox/shares", create_share)
    router.add_get("/api/sandbox/shares", list_shares, allow_head=False)
    router.add_delete("/api/sandbox/shares/{id}", revoke_share)
    router.add_post("/api/sandbox/projects", create_project)
    router.add_post("/api/sandbox/processes", start_process)
    router.add_get("/api/sandbox/processes", list_processes, allow_head=False)
    router.add_get("/api/sandbox/processes/{id}", get_process, allow_head=False)
    router.add_delete("/api/sandbox/processes/{id}", kill_process)
    router.add_get("/api/sandbox/processes/{id}/output", process_output, allow_head=False)
    router.add_post("/api/sandbox/processes/{id}/stdin", write_stdin)
    router.add_post("/api/sandbox/processes/{id}/signal", signal_process)
    router.add_get("/api/sandbox/ports", list_ports, allow_head=False)
    router.add_get("/api/sandbox/files", files_api.list_folder, allow_head=False)
    router.add_delete("/api/sandbox/files", files_api.delete)
    router.add_get("/api/sandbox/files/stat", files_api.stat, allow_head=False)
    router.add_get("/api/sandbox/files/content", files_api.read, allow_head=False)
    router.add_put("/api/sandbox/files/content", files_api.write)
    router.add_post("/api/sandbox/files/folders", files_api.make_folder)
    router.add_post("/api/sandbox/files/move", files_api.move)
    router.add_post("/api/sandbox/files/upload", files_api.upload)
    router.add_get("/api/sandbox/files/archive", files_api.archive, allow_head=False)
    router.add_get("/api/sandbox/files/watch", watch_files, allow_head=False)
    router.add_post("/api/sandbox/files/download-link", files_api.download_link)
    router.add_get("/api/admin/sandboxes", list_sandboxes, allow_head=False)
    router.add_get("/api/admin/sandboxes/{user}", get_any_sandbox, allow_head=False)
    router.add_delete("/api/admin/sandboxes/{user}", stop_any_sandbox)
    public = [
        router.add_get("/healthz", healthz, allow_head=False),
        router.add_get("/api/openapi.json", openapi, allow_head=False),
        # Its own token (GATEWAY_METRICS_TOKEN), not a user's: metrics_http.py.
        router.add_get("/metrics", metrics_endpoint, allow_head=False),
        router.add_get("/", index, allow_head=False),
        # Previews authenticate their own way (bearer token or preview cookie): preview_auth.py.
        router.add_route("*", "/preview/{user}/{tail:.*}", preview),
        router.add_get("/preview/{user}", preview_redirect_slash, allow_head=False),
        router.add_get(LOGIN_PATH, preview_login, allow_head=False),
        # Each sandbox's own origin: preview_host_middleware lets only these reach the router there.
        router.add_get(ROOT_LOGIN_PATH, root_login, allow_head=False),
        router.add_get(SHARE_PATH, open_share, allow_head=False),
        router.add_post(START_PATH, wake),
        # A download link's ticket is its own authentication: file_links.py.
        router.add_get(files_api.DOWNLOAD_PATH, files_api.download, allow_head=False),
    ]
    # The page's own files hold no secrets; the API calls they make carry the token.
    if PAGE_DIR.is_dir():
        public.extend(router.add_static("/static/", PAGE_DIR))
    app[PUBLIC_ROUTES] = frozenset(public)
