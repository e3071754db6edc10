"""aiohttp's protocol for the connections the front door hands over, with what it lacks: a bound on
the time a request head may take to arrive, and the connection's Slot (connections.py) released when
the connection ends.

aiohttp times only idleness: its keep-alive timeout runs from the last answer, whatever arrives in
the meantime, so a head trickled one byte a second lives that long (an hour at aiohttp's default, 75 s
at ours). Here a head must be in within GATEWAY_HEADER_TIMEOUT_S of its first byte, or of the accept
for a connection's first request, as at the front door. Bodies are not heads: a slow upload is
legitimate, and the handlers that read bodies bound them themselves (schemas.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .connections import Slot
from .http1 import HeadWatch

log = logging.getLogger(__name__)


class GatewayRequestHandler(RequestHandler):
    __slots__ = ("_head_deadline", "_head_timeout_s", "_head_timer", "_heads", "_on_head_timeout", "_slot")

    def __init__(
        self,
        manager: web.Server,
        *,
        slot: Slot | None,
        head_timeout_s: float,
        head_started: float,
        on_head_timeout: Callable[[], None],
        **options: Any,
    ) -> None:
        super().__init__(manager, **options)
        self._slot = slot
        self._heads = HeadWatch()
        self._head_timeout_s = head_timeout_s
        # The head the door was reading when it handed over (the bytes it replays) is timed from its
        # own start; a head that turns out complete cancels the timer as the replay is parsed.
        self._head_deadline = head_started + head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._on_head_timeout = on_head_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer = asyncio.get_running_loop().call_at(self._head_deadline, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        heads = self._heads
        heads.feed(data)
        if heads.in_head:
            if self._head_timer is None:
                self._head_timer = asyncio.get_running_loop().call_later(
                    self._head_timeout_s, self._head_timed_out
                )
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        # Closed without an answer, as nginx does: whoever sends a head this slowly is not waiting
        # for one, and a request being answered ahead of it on the connection (pipelined) goes too:
        # no client of ours pipelines a head it takes seconds to write.
        self._head_timer = None
        self._on_head_timeout()
        log.debug("closing a connection whose request head took over %g s", self._head_timeout_s)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._slot is not None:
            self._slot.release()
            self._slot = None
