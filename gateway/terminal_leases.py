"""Leases on open terminals, so that the shells of a gateway that died are hung up by another.

Docker does not end an exec when its client goes away: the shell of a terminal whose gateway was
killed with -9 lives on, with its jobs, until the sandbox stops. So each open terminal has a row in
PostgreSQL that its gateway renews every RENEW_S; a row not renewed for EXPIRE_S belongs to a gateway
that is gone, and the next reaper pass, on whichever gateway, hangs that shell up and drops the row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg

from . import db
from .errors import GatewayError

log = logging.getLogger(__name__)

RENEW_S = 10.0
# Three renewals missed: a gateway that is merely slow, or PostgreSQL restarting, does not lose its
# terminals.
EXPIRE_S = 3 * RENEW_S


class TerminalLeases:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._held: set[str] = set()

    @asynccontextmanager
    async def held(self, run_id: str, user: str) -> AsyncIterator[None]:
        """A lease on the terminal `run_id` for as long as the block runs. Without the database the
        terminal opens all the same (unleased: only a crash of this gateway would orphan it)."""
        await self._quietly(db.lease_terminal, run_id, user)
        self._held.add(run_id)
        try:
            yield
        finally:
            self._held.discard(run_id)
            await self._quietly(db.end_terminal_lease, run_id)

    async def renew(self) -> None:
        if self._held:
            await self._quietly(db.renew_terminal_leases, list(self._held))

    async def _quietly(self, query: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            async with db.connection(self._pool) as conn:
                await query(conn, *args)
        except (GatewayError, *db.CONNECTION_ERRORS) as err:
            log.warning("terminal lease not recorded: %r", err)

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            await self.renew()
