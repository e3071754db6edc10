"""Coalesced last_activity: busy traffic (terminal keystrokes, preview requests) writes at most one
row update per user per interval, not one per request."""

from __future__ import annotations

import logging
import time

from .errors import GatewayError
from .sandboxes import Sandboxes

log = logging.getLogger(__name__)


class ActivityRecorder:
    def __init__(self, sandboxes: Sandboxes, interval_s: float) -> None:
        self._sandboxes = sandboxes
        self._interval_s = interval_s
        # Per process: with several gateways each writes at most once per interval, still a handful.
        self._last_write: dict[str, float] = {}
        self.writes = 0

    @property
    def interval_s(self) -> float:
        return self._interval_s

    def due(self, user: str) -> bool:
        """Whether `seen(user)` would write now."""
        return time.monotonic() - self._last_write.get(user, float("-inf")) >= self._interval_s

    async def seen(self, user: str) -> None:
        if not self.due(user):
            return
        self._last_write[user] = time.monotonic()
        try:
            await self._sandboxes.record_activity(user)
            self.writes += 1
        except GatewayError as err:
            # Activity is best effort: losing one write costs the reaper a few seconds of precision.
            log.warning("could not record activity of %s: %s", user, err.message)


class Seen:
    """`await seen()`: records activity of one user, for relay loops that should not know who."""

    def __init__(self, recorder: ActivityRecorder, user: str) -> None:
        self._recorder = recorder
        self._user = user

    async def __call__(self) -> None:
        await self._recorder.seen(self._user)
