"""`python -m gateway`: runs the gateway with settings from the environment."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys

import uvloop
from aiohttp import web

from .access_log import AccessLogger
from .app import SERVER_OPTIONS, create_app
from .logs import configure_logging
from .server import GatewayRunner
from .settings import Settings, SettingsError

log = logging.getLogger("gateway")
# What the soft limit is raised to where the hard limit is unlimited (Linux's own nr_open default).
NOFILE_WITHOUT_HARD_LIMIT = 1 << 20


async def serve(settings: Settings) -> None:
    """Serves until SIGINT or SIGTERM, then shuts down as web.run_app would. Not web.run_app itself:
    it would make its own runner, and the gateway's (frontdoor.py) puts the preview's fast path first."""
    runner = GatewayRunner(create_app(settings), access_log_class=AccessLogger, **SERVER_OPTIONS)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info("listening on http://%s:%d", settings.host, settings.port)
        await stop.wait()
    finally:
        await runner.cleanup()


def raise_open_file_limit() -> tuple[int, int]:
    """Raises the soft limit on open files to the hard one; (before, after). Services start with a
    soft limit of 1,024, which a thousand idle client connections fill, and then the gateway can no
    longer reach Docker or PostgreSQL either."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else NOFILE_WITHOUT_HARD_LIMIT
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        sys.exit(f"configuration error: {err}")
    configure_logging(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"), settings.log_format)
    before, after = raise_open_file_limit()
    log.info("open files: soft limit %d (was %d)", after, before)
    # uvloop: the preview proxy's work per request is a few dozen Python calls, and asyncio's own
    # loop spends as much again around them (bench/proxy.py).
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
