"""The SandboxRuntime of one Docker engine on this host (sandbox_runtime.py): a container per user
(containers.py), the user's filesystem mounted by the gateway (disks.py) or a Docker volume, the
engine's OCI runtime and this host's placement (runtime.py), and every port published on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiodocker

from . import containers
from .agent import AgentAddress
from .disks import Disks
from .runtime import Engine, SandboxHost
from .sandbox_runtime import ListedSandbox, SandboxEvent, StartedSandbox
from .settings import Settings

# Docker publishes a sandbox's ports on this host's loopback only (containers.py): every address a
# gateway uses to reach a sandbox is this host and a published port.
PUBLISHED_HOST = "127.0.0.1"
WATCHED_EVENTS = ("pause", "unpause", "die")


async def attach_disk(disks: Disks, docker: aiodocker.Docker, settings: Settings, user: str) -> None:
    """Mounts the user's filesystem (disks.py) as a start does, asking the engine for the image's
    home folder and an old workspace volume when the filesystem is new."""

    def image_home() -> Awaitable[tarfile.TarFile]:
        return containers.image_home(docker, settings)

    def old_workspace() -> Awaitable[str | None]:
        return containers.old_workspace_folder(docker, settings, user)

    await disks.attach(user, image_home, old_workspace)


class DockerRuntime:
    def __init__(self, settings: Settings, docker: aiodocker.Docker, streams: aiodocker.Docker) -> None:
        self._settings = settings
        self._docker = docker
        # Long-lived engine connections (the event stream) go through a client of their own, so
        # that they never hold a slot of the calls' pool.
        self._streams = streams
        self._disks = Disks(settings)
        self._host = SandboxHost(settings, docker)
        # Learnt at the first start: the floor on free disk applies to the engine's data root too.
        self._docker_root: str | None = None

    async def ping(self) -> None:
        await containers.ping(self._docker)

    async def check_host(self) -> Engine:
        return await self._host.check()

    async def prepare_network(self) -> None:
        await containers.ensure_network(self._docker, self._settings)

    async def check_free_space(self) -> None:
        if self._docker_root is None and self._settings.disk.min_free_mb:
            self._docker_root = await containers.docker_root_dir(self._docker)
        await asyncio.to_thread(self._disks.check_free_space, self._docker_root)

    async def attach_workspace(self, user: str) -> None:
        await attach_disk(self._disks, self._docker, self._settings, user)

    async def detach_workspace(self, user: str) -> None:
        await self._disks.detach(user)

    async def remove_workspace(self, user: str) -> bool:
        # Both kinds: a volume from before quotas may sit beside the filesystem.
        removed = [
            await containers.remove_workspace(self._docker, self._settings, user),
            await self._disks.remove(user),
        ]
        return any(removed)

    async def attached_workspaces(self) -> list[str]:
        return await self._disks.mounted_users()

    async def create_and_start(self, user: str, agent_secret: str) -> StartedSandbox:
        # Before the container: a host that cannot take the sandbox refuses here.
        placement = await self._host.placement()
        return await containers.create_and_start(
            self._docker, self._settings, user, placement, agent_secret=agent_secret
        )

    async def running(self, user: str) -> StartedSandbox | None:
        return await containers.running_container(self._docker, self._settings, user)

    async def status(self, sandbox_id: str) -> str:
        return await containers.status(self._docker, sandbox_id)

    async def remove(self, user: str, sandbox_id: str | None) -> None:
        # A start that died half-way left no id, only the container's deterministic name.
        target = sandbox_id or containers.container_name(self._settings, user)
        await containers.remove_container(self._docker, target)

    async def listed(self) -> dict[str, ListedSandbox]:
        return await containers.labelled(self._docker, self._settings)

    def agent_address(self, sandbox_id: str, agent_port: int, secret: str) -> AgentAddress:
        return AgentAddress(PUBLISHED_HOST, agent_port, secret)

    def preview_address(self, sandbox_id: str, host_port: int) -> tuple[str, int]:
        return (PUBLISHED_HOST, host_port)

    async def events(self, subscribed: Callable[[], Awaitable[None]]) -> AsyncIterator[SandboxEvent]:
        events = self._streams.events
        filters = {
            "type": ["container"],
            "event": list(WATCHED_EVENTS),
            "label": [f"{containers.LABEL_GATEWAY}={self._settings.gateway_name}"],
        }
        with containers.docker_errors("watching the engine's events"):
            subscriber = events.subscribe(filters=json.dumps(filters))  # type: ignore[no-untyped-call]
            try:
                await subscribed()
                while (event := await subscriber.get()) is not None:
                    if found := _sandbox_event(event):
                        yield found
            finally:
                await events.stop()  # type: ignore[no-untyped-call]


def _sandbox_event(event: dict[str, Any]) -> SandboxEvent | None:
    user = event.get("Actor", {}).get("Attributes", {}).get(containers.LABEL_USER)
    action = event.get("Action")
    if not user or action not in WATCHED_EVENTS:
        return None
    return SandboxEvent(user=user, action=action)
