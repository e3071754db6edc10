"""aiohttp's server and runner with the front door (frontdoor.py) as every connection's first
protocol, and with what bounds connections: the per-client and total ceilings (connections.py) and
the request-head timeout, handed to aiohttp's protocol when the door hands a connection over
(request_handler.py)."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from aiohttp import web

from .connections import REFUSALS, ClientConnections, Slot, connection_ceiling, open_file_limit
from .frontdoor import Deps, FrontDoor
from .keys import METRICS, SETTINGS
from .request_handler import GatewayRequestHandler
from .splice import Splice

log = logging.getLogger(__name__)

SHUTDOWN_S = 10.0


class GatewayServer(web.Server):
    """aiohttp's server, with the front door as each connection's first protocol."""

    def __init__(
        self,
        app: web.Application,
        handler: Any,
        *,
        request_factory: Any = None,
        handler_cancellation: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            handler, request_factory=request_factory, handler_cancellation=handler_cancellation, **options
        )
        self.app = app
        # What aiohttp's own protocol is made with (keep-alive, access log, ...), for hand-overs.
        self._handler_options = options
        self._handler_options.setdefault("loop", asyncio.get_running_loop())
        settings, metrics = app[SETTINGS], app[METRICS]
        self.head_timeout_s = settings.header_timeout_s
        self.client_connections = ClientConnections(
            connection_ceiling(settings.max_connections, open_file_limit()),
            settings.max_connections_per_client,
        )
        log.info(
            "client connections: at most %d, %s per client address; request heads within %g s",
            self.client_connections.ceiling,
            settings.max_connections_per_client or "no bound",
            self.head_timeout_s,
        )
        metrics.client_connections.set_function(self.client_connections.count)
        metrics.connection_limit.labels("total").set(self.client_connections.ceiling)
        metrics.connection_limit.labels("per_client").set(settings.max_connections_per_client)
        self.refused = {reason: metrics.connections_refused.labels(reason) for reason in REFUSALS}
        self.door_head_timeouts = metrics.head_timeouts.labels("door")
        self._aiohttp_head_timeouts = metrics.head_timeouts.labels("aiohttp")
        self.doors: set[FrontDoor] = set()
        self.splices: set[Splice] = set()
        # Requests the front door answered, and connections it handed to aiohttp (tests read them).
        self.answered = 0
        self.handed_over = 0

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        return FrontDoor(self)

    @functools.cached_property
    def deps(self) -> Deps:
        # On the first request, not at construction: by then the app has started and set them all.
        return Deps.of(self.app)

    def aiohttp_protocol(self, slot: Slot | None, head_started: float) -> GatewayRequestHandler:
        """aiohttp's own protocol, for a connection the front door hands over: it takes the
        connection's slot, and times the head the door was reading from `head_started`."""
        return GatewayRequestHandler(
            self,
            slot=slot,
            head_timeout_s=self.head_timeout_s,
            head_started=head_started,
            on_head_timeout=self._aiohttp_head_timeouts.inc,
            **self._handler_options,
        )

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for door in list(self.doors):
            door.close_when_idle()
        for splice in list(self.splices):
            splice.close()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        # Answers that need no task of their own are a loop pass from done; those with one get time.
        busy = [door.task for door in self.doors if door.task is not None]
        await super().shutdown(timeout)
        if busy:
            _, pending = await asyncio.wait(busy, timeout=timeout or SHUTDOWN_S)
            for task in pending:
                task.cancel()
        for door in list(self.doors):
            door.close()


class GatewayRunner(web.AppRunner):
    """An AppRunner whose server is the GatewayServer; for web sites and TestServer alike."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The same handler, request factory and options aiohttp's own server was made with.
        return GatewayServer(
            self.app, server.request_handler, request_factory=server.request_factory, **self._kwargs
        )
