"""The open WebSockets of one gateway process, per user: bounded, and closed together at shutdown."""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter

from aiohttp import web


class SocketRegistry:
    def __init__(self, max_per_user: int) -> None:
        self.max_per_user = max_per_user
        self._per_user: Counter[str] = Counter()
        # Weak, so that a handler that died without discarding its socket cannot pin it.
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    def add(self, user: str, ws: web.WebSocketResponse) -> bool:
        """Registers `ws` unless `user` already has max_per_user sockets open here."""
        if self._per_user[user] >= self.max_per_user:
            return False
        self._per_user[user] += 1
        self._sockets.add(ws)
        return True

    def discard(self, user: str, ws: web.WebSocketResponse) -> None:
        self._per_user[user] -= 1
        if not self._per_user[user]:
            del self._per_user[user]
        self._sockets.discard(ws)

    def count(self) -> int:
        return len(self._sockets)

    async def close_all(self, code: int, reason: str) -> None:
        await asyncio.gather(
            *(ws.close(code=code, message=reason.encode()) for ws in list(self._sockets)),
            return_exceptions=True,
        )
