"""What the engine says about this deployment's containers as it happens: pause, unpause, die.

A paused sandbox still accepts TCP connections (its kernel side answers for frozen processes) and
then says nothing, so without being told a preview of it would wait for its whole response timeout.
Docker's event stream tells at once: a pause or an unpause changes what the preview gate lets
through within milliseconds, and a container that dies from outside (docker kill, the OOM killer) is
recorded as stopped when it happens rather than when someone next looks.

The stream is a long-lived engine connection (the runtime keeps it off the calls' pool). When it breaks
(the engine restarts) the watcher reconnects, and first re-reads which containers are paused, so
nothing said meanwhile is missed for long.
"""

from __future__ import annotations

import asyncio
import logging

from .errors import GatewayError
from .sandbox_runtime import SandboxEvent, SandboxRuntime
from .sandboxes import Sandboxes

log = logging.getLogger(__name__)

RETRY_S = 1.0


class ContainerEvents:
    def __init__(self, engine: SandboxRuntime, sandboxes: Sandboxes) -> None:
        self._engine = engine
        self._sandboxes = sandboxes

    async def watch_forever(self) -> None:
        while True:
            try:
                await self._watch()
            except (GatewayError, OSError, TimeoutError) as err:
                log.info("the engine's event stream broke (%r); reconnecting", err)
            await asyncio.sleep(RETRY_S)

    async def _watch(self) -> None:
        # Subscribed first, listed second: a pause between the two is in the stream.
        async for event in self._engine.events(self._list_paused):
            await self._on(event)

    async def _list_paused(self) -> None:
        found = await self._engine.listed()
        self._sandboxes.set_paused({user for user, listed in found.items() if listed.paused})

    async def _on(self, event: SandboxEvent) -> None:
        if event.action in ("pause", "unpause"):
            self._sandboxes.mark_paused(event.user, event.action == "pause")
        elif event.action == "die":
            self._sandboxes.mark_paused(event.user, False)
            # Looks, as GET does, and so records the death with its reason (or finds it restarted).
            await self._sandboxes.has_stopped(event.user)
