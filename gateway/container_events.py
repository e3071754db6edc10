"""What the engine says about this deployment's containers as it happens: pause, unpause, die.

A paused sandbox still accepts TCP connections (its kernel side answers for frozen processes) and
then says nothing, so without being told a preview of it would wait for its whole response timeout.
Docker's event stream tells at once: a pause or an unpause changes what the preview gate lets
through within milliseconds, and a container that dies from outside (docker kill, the OOM killer) is
recorded as stopped when it happens rather than when someone next looks.

The stream is a long-lived engine connection, so it goes through the streams client. When it breaks
(the engine restarts) the watcher reconnects, and first re-reads which containers are paused, so
nothing said meanwhile is missed for long.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiodocker

from . import containers
from .errors import GatewayError
from .sandboxes import Sandboxes
from .settings import Settings

log = logging.getLogger(__name__)

WATCHED = ("pause", "unpause", "die")
RETRY_S = 1.0


class ContainerEvents:
    def __init__(self, docker: aiodocker.Docker, settings: Settings, sandboxes: Sandboxes) -> None:
        self._docker = docker
        self._settings = settings
        self._sandboxes = sandboxes

    async def watch_forever(self) -> None:
        while True:
            try:
                await self._watch()
            except (GatewayError, aiodocker.DockerError, OSError, TimeoutError) as err:
                log.info("Docker's event stream broke (%r); reconnecting", err)
            await asyncio.sleep(RETRY_S)

    async def _watch(self) -> None:
        events = self._docker.events
        subscriber = events.subscribe(filters=json.dumps(self._filters()))  # type: ignore[no-untyped-call]
        try:
            # Subscribed first, listed second: a pause between the two is in the stream.
            found = await containers.labelled(self._docker, self._settings)
            self._sandboxes.set_paused({user for user, c in found.items() if c.paused})
            while (event := await subscriber.get()) is not None:
                await self._on(event)
        finally:
            await events.stop()  # type: ignore[no-untyped-call]

    def _filters(self) -> dict[str, list[str]]:
        return {
            "type": ["container"],
            "event": list(WATCHED),
            "label": [f"{containers.LABEL_GATEWAY}={self._settings.gateway_name}"],
        }

    async def _on(self, event: dict[str, Any]) -> None:
        user = event.get("Actor", {}).get("Attributes", {}).get(containers.LABEL_USER)
        if not user:
            return
        action = event.get("Action")
        if action in ("pause", "unpause"):
            self._sandboxes.mark_paused(user, action == "pause")
        elif action == "die":
            self._sandboxes.mark_paused(user, False)
            # Looks, as GET does, and so records the death with its reason (or finds it restarted).
            await self._sandboxes.has_stopped(user)
