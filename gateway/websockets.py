"""The open WebSockets of one gateway process, per user: bounded, and closed together at shutdown."""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable

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


# A close frame's reason is at most 123 bytes.
MAX_REASON_BYTES = 120


async def serve_registered(
    ws: web.WebSocketResponse,
    registry: SocketRegistry,
    user: str,
    serve: Callable[[], Awaitable[tuple[int, str]]],
    *,
    too_many: tuple[int, str],
) -> None:
    """Serves a prepared socket while it is registered for `user`: `serve` says how it ends (a close
    code and reason); past the registry's bound it is closed at once with `too_many` (a code, and
    what the user holds too many of)."""
    if not registry.add(user, ws):
        code, what = too_many
        await ws.close(code=code, message=f"at most {registry.max_per_user} {what} per user".encode())
        return
    try:
        code, reason = await serve()
        await ws.close(code=code, message=reason.encode()[:MAX_REASON_BYTES])
    finally:
        registry.discard(user, ws)
