"""The application factory: settings in, a wired web.Application out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from . import db, engine
from .activity import ActivityRecorder
from .auth import auth_middleware
from .container_events import ContainerEvents
from .docker_runtime import DockerRuntime
from .egress import EgressGuard, install_at_start
from .errors import GatewayError
from .execute import ExecRunner
from .files_watch import close_watches_on_shutdown
from .keys import (
    ACTIVITY,
    DB,
    DOCKER,
    DOCKER_STREAMS,
    EGRESS,
    EXEC_RUNNER,
    FILE_STREAMS,
    FILE_WATCHES,
    METRICS,
    PREVIEW_GATE,
    PREVIEW_HOSTS,
    PREVIEW_SESSIONS,
    PROCESS_STREAMS,
    SANDBOXES,
    SETTINGS,
    SHARES,
    TERMINALS,
    TOKENS,
    UPSTREAM,
)
from .logs import add_request_id_header, request_id_middleware
from .metrics import Metrics
from .metrics_http import metrics_listener_ctx, metrics_middleware
from .middlewares import error_middleware
from .preview import preview_host_middleware, preview_origin_connections_middleware
from .preview_access import PreviewGate
from .preview_hosts import PreviewHosts
from .preview_sessions import PreviewSessions
from .processes import stream_slots
from .reaper import reaper_ctx
from .routes import setup_routes
from .sandboxes import Sandboxes
from .settings import Settings
from .shares import ShareStore
from .terminal import close_terminals_on_shutdown
from .tokens import TokenVerifier
from .upstream import UpstreamPool
from .user_slots import UserSlots
from .websockets import SocketRegistry

log = logging.getLogger(__name__)

# The largest body: an exec with the largest code and stdin, JSON-escaped, with room to spare.
CLIENT_MAX_SIZE_FLOOR = 1024 * 1024
# How the application is to be served (web.run_app, AppRunner, TestServer): request bodies stay as the
# client sent them. The gateway takes no compressed body (schemas.check_identity_coding), and aiohttp's
# decoding, on by default, answers a broken coding itself, outside the app, or leaves the connection
# hanging when the coding breaks at the body's end.
# Idle keep-alive connections end after KEEPALIVE_S, as at the front door (aiohttp's own default is
# 3,630 s: an hour of a descriptor for every connection a client leaves open).
KEEPALIVE_S = 75.0
# A request line may carry a file's path in its query (the files API): 4,096 bytes of path, each
# byte percent-encoded as three, and then some; aiohttp's default (8,190) would answer 400 in text.
MAX_LINE_BYTES = 64 * 1024
SERVER_OPTIONS: dict[str, Any] = {
    "auto_decompress": False,
    "keepalive_timeout": KEEPALIVE_S,
    "max_line_size": MAX_LINE_BYTES,
}


def create_app(settings: Settings) -> web.Application:
    limits = settings.exec
    client_max_size = max(CLIENT_MAX_SIZE_FLOOR, 2 * (limits.max_code_bytes + limits.max_stdin_bytes))
    # Order: the request id first, so that every log line below carries it; then metrics, which see
    # every failure as the response the error middleware made of it; then the preview origin's
    # connections are closed after aiohttp's answers (preview.py); then errors, so that everything
    # below becomes a JSON envelope; then the preview origin refuses what is not a preview before auth
    # runs; auth last, next to the handlers.
    app = web.Application(
        middlewares=[
            request_id_middleware,
            metrics_middleware,
            preview_origin_connections_middleware,
            error_middleware,
            preview_host_middleware,
            auth_middleware,
        ],
        client_max_size=client_max_size,
    )
    app.on_response_prepare.append(add_request_id_header)
    app[SETTINGS] = settings
    app[TOKENS] = TokenVerifier(settings)
    app[METRICS] = Metrics()
    # Cleanup contexts unwind in reverse: the services go before the clients they use.
    app.cleanup_ctx.append(database_ctx)
    app.cleanup_ctx.append(metrics_listener_ctx)
    app.cleanup_ctx.append(docker_ctx)
    app.cleanup_ctx.append(upstream_ctx)
    app.cleanup_ctx.append(services_ctx)
    app.cleanup_ctx.append(reaper_ctx)
    # WebSockets must close before aiohttp waits for handlers to finish, hence on_shutdown.
    app.on_shutdown.append(close_terminals_on_shutdown)
    app.on_shutdown.append(close_watches_on_shutdown)
    setup_routes(app)
    return app


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await db.create_pool(app[SETTINGS].database_url)
    try:
        await db.apply_migrations(pool)
        async with db.connection(pool) as conn:
            app[PREVIEW_SESSIONS] = PreviewSessions(await db.gateway_secret(conn, "preview-session"))
        app[DB] = pool
        yield
    finally:
        await db.close_pool(pool)


async def docker_ctx(app: web.Application) -> AsyncIterator[None]:
    docker = engine.connect(app[SETTINGS].docker_host)
    try:
        # Not ensure_network here: the gateway starts, and says 503, while the engine is down.
        app[DOCKER] = docker.calls
        app[DOCKER_STREAMS] = docker.streams
        yield
    finally:
        await docker.close()


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = UpstreamPool(app[SETTINGS].preview_response_timeout_s)
    try:
        app[UPSTREAM] = pool
        yield
    finally:
        pool.close()


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[EGRESS] = EgressGuard(settings.egress, settings.sandbox_network)
    # Before anything can start a sandbox; a failure is logged, and every start refused, not fatal.
    await install_at_start(app[EGRESS])
    # The one place that picks the engine (sandbox_runtime.py): everything else goes through Sandboxes.
    sandbox_engine = DockerRuntime(settings, app[DOCKER], app[DOCKER_STREAMS])
    app[SANDBOXES] = Sandboxes(settings, app[DB], sandbox_engine, app[EGRESS])
    app[EXEC_RUNNER] = ExecRunner(settings.exec)
    app[PROCESS_STREAMS] = stream_slots(settings.processes.max_streams_per_user)
    app[TERMINALS] = SocketRegistry(settings.max_terminals_per_user)
    files = settings.files
    app[FILE_STREAMS] = UserSlots(
        files.max_streams_per_user,
        f"at most {files.max_streams_per_user} uploads and downloads at a time per user",
    )
    # Watches per user: a few pages, each with its own; the sandbox's agent bounds them per sandbox too.
    app[FILE_WATCHES] = SocketRegistry(files.max_watches_per_sandbox)
    app[METRICS].open_websockets.labels("files_watch").set_function(app[FILE_WATCHES].count)
    app[METRICS].open_websockets.labels("terminal").set_function(app[TERMINALS].count)
    app[ACTIVITY] = ActivityRecorder(app[SANDBOXES], settings.activity_interval_s)
    app[PREVIEW_HOSTS] = PreviewHosts(app[DB])
    app[SHARES] = ShareStore(app[DB])
    app[PREVIEW_GATE] = PreviewGate(
        settings,
        app[TOKENS],
        app[PREVIEW_SESSIONS],
        app[PREVIEW_HOSTS],
        app[SHARES],
        app[SANDBOXES],
        app[ACTIVITY],
    )
    try:
        await app[SANDBOXES].check_host()
    except GatewayError as err:
        # The gateway still serves what exists; each start checks again and is refused with this
        # message until the host is fixed (or the engine answers).
        log.warning("sandboxes cannot start on this host yet: %s", err.message)
    try:
        await app[SANDBOXES].reconcile()
    except GatewayError as err:
        # The gateway serves what it can without Docker; the next start reconciles that user anyway.
        log.warning("could not reconcile sessions with Docker at start: %s", err.message)
    events = ContainerEvents(sandbox_engine, app[SANDBOXES])
    tasks = [
        asyncio.create_task(events.watch_forever(), name="container-events"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
