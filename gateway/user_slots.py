"""A bound on how many of one thing a user holds at once in this gateway process: runs in flight
(execute.py), open process output streams (process_api.py).

A known limit: with several gateway processes the bound applies per process; a PostgreSQL counter
would make it global.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import TooManyRequests


class UserSlots:
    def __init__(self, limit: int, refusal: str) -> None:
        self._limit = limit
        # What a user past the limit is told (429).
        self._refusal = refusal
        self._held: Counter[str] = Counter()

    @asynccontextmanager
    async def slot(self, user: str) -> AsyncIterator[None]:
        if self._held[user] >= self._limit:
            raise TooManyRequests(self._refusal)
        self._held[user] += 1
        try:
            yield
        finally:
            self._held[user] -= 1
            if not self._held[user]:
                del self._held[user]
