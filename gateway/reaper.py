"""The idle reaper: stops sandboxes whose last_activity is older than the idle timeout.

Every gateway runs one. They cooperate through PostgreSQL: a reaper skips a user whose lock another
holds, and re-reads the row under the lock, so no sandbox is stopped twice and none is stopped while
someone starts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from . import db
from .errors import GatewayError
from .keys import DB, METRICS, SANDBOXES, SETTINGS
from .sandboxes import Sandboxes

log = logging.getLogger(__name__)

PARALLEL_STOPS = 8


async def reap_once(sandboxes: Sandboxes, pool: asyncpg.Pool, idle_timeout_s: float) -> list[str]:
    """One pass: the users whose sandboxes this pass stopped."""
    async with db.connection(pool) as conn:
        candidates = await db.idle_users(conn, idle_timeout_s)
    # A few stops at a time: each waits on Docker, and the pool must keep room for requests.
    room = asyncio.Semaphore(PARALLEL_STOPS)

    async def stop(user: str) -> bool:
        async with room:
            return await sandboxes.stop_if_idle(user, idle_timeout_s)

    stopped = await asyncio.gather(*(stop(user) for user in candidates))
    reaped = [user for user, done in zip(candidates, stopped, strict=True) if done]
    if reaped:
        log.info("reaped %d idle sandboxes: %s", len(reaped), ", ".join(reaped))
    return reaped


async def _reap_forever(app: web.Application) -> None:
    settings = app[SETTINGS]
    while True:
        await asyncio.sleep(settings.reaper_interval_s)
        metrics = app[METRICS]
        started = time.perf_counter()
        try:
            reaped = await reap_once(app[SANDBOXES], app[DB], settings.idle_timeout_s)
            await app[SANDBOXES].resolve_all_unfinished()
            async with db.connection(app[DB]) as conn:
                await db.forget_rate_limits(conn)
                await db.forget_ended_shares(conn)
                await db.forget_used_tickets(conn)
        except GatewayError as err:
            # Docker or PostgreSQL away: the next pass tries again.
            log.warning("reaper pass failed: %s", err.message)
            metrics.count_error(err)
            metrics.reaper_passes.labels("failed").inc()
        except Exception:
            log.exception("reaper pass failed")
            metrics.reaper_passes.labels("failed").inc()
        else:
            metrics.reaper_passes.labels("ok").inc()
            metrics.reaped.inc(len(reaped))
        metrics.reaper_seconds.observe(time.perf_counter() - started)


async def reaper_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_reap_forever(app), name="reaper")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
