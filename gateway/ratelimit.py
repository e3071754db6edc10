"""Per-user rate limits on costly actions (start, exec), held in PostgreSQL so that they hold across
every gateway behind a load balancer.

The algorithm is GCRA, the "generic cell rate algorithm" of ATM networks that redis-cell and most API
gateways use: one timestamp per user and action (the theoretical arrival time, TAT) instead of a
counter and a refill time. Each action pushes the TAT one emission interval (60 s / per_minute) into
the future; an action is refused while that would put the TAT more than a minute ahead. So a user may
burst `per_minute` actions, then one every interval. One UPSERT decides, atomically across gateways.
"""

from __future__ import annotations

import math

import asyncpg

from . import db
from .errors import TooManyRequests
from .settings import RateLimit

WINDOW_S = 60.0


async def take(pool: asyncpg.Pool, user: str, action: str, limit: RateLimit) -> None:
    """Counts one `action` by `user`, or raises TooManyRequests with how long to wait."""
    if not limit.enabled:
        return
    interval_s = WINDOW_S / limit.per_minute
    async with db.connection(pool) as conn:
        wait_s = await db.take_rate_slot(conn, user, action, interval_s, WINDOW_S)
    if wait_s is not None:
        retry_after_s = max(1, math.ceil(wait_s))
        raise TooManyRequests(
            f"too many {action} requests: at most {limit.per_minute} a minute; retry in {retry_after_s} s",
            retry_after_s=retry_after_s,
        )
