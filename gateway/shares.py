"""Share links of a preview: anyone with the link may view the owner's preview (its HTTP and its HMR
WebSocket), without a token, until the link expires or the owner revokes it.

What a link grants, and nothing more: the preview, on that sandbox's own origin. Never the API (it
takes bearer tokens only), never the terminal, never another preview. The link's secret is kept only
as a hash; opening the link trades it for a cookie of that preview origin naming the share. Each
gateway re-reads a share at most `SHARE_CACHE_S` after it last did, so a revocation holds everywhere
within a second.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime

import asyncpg

from . import db
from .db import Share

SHARE_CACHE_S = 1.0
SHARE_PATH = "/_sandbox-gateway/share"


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def is_live(share: Share) -> bool:
    return share.revoked_at is None and share.expires_at > datetime.now(UTC)


class ShareStore:
    """Shares by id, each re-read from PostgreSQL at most a second after the last look."""

    def __init__(self, pool: asyncpg.Pool, size: int = 10_000) -> None:
        self.pool = pool
        self._seen: dict[str, tuple[Share | None, float]] = {}
        self._size = size

    def cached(self, share_id: str) -> tuple[Share | None] | None:
        """(the share or None if there is none) when looked at within the last second; else None."""
        hit = self._seen.get(share_id)
        if hit is not None and time.monotonic() - hit[1] < SHARE_CACHE_S:
            return (hit[0],)
        return None

    async def get(self, share_id: str) -> Share | None:
        cached = self.cached(share_id)
        if cached is not None:
            return cached[0]
        async with db.connection(self.pool) as conn:
            share = await db.share_by_id(conn, share_id)
        if len(self._seen) >= self._size:
            self._seen.clear()
        self._seen[share_id] = (share, time.monotonic())
        return share

    async def by_secret(self, secret: str) -> Share | None:
        async with db.connection(self.pool) as conn:
            return await db.share_by_secret(conn, secret_hash(secret))

    def forget(self, share_id: str) -> None:
        self._seen.pop(share_id, None)
