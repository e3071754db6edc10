"""The Docker side of a sandbox: its container's configuration, creation, inspection and removal.

Every DockerError leaves this module translated: 404 means gone, a transport failure means the
engine is unavailable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aiodocker

from .errors import DockerFailed, DockerUnavailable, SandboxStartFailed
from .settings import Settings

log = logging.getLogger(__name__)

LABEL_USER = "sandbox-gateway.user"
LABEL_GATEWAY = "sandbox-gateway.gateway"
PREVIEW_PORT = "5173/tcp"
CA_BUNDLE_IN_SANDBOX = "/etc/ssl/certs/ca-certificates.crt"
# aiodocker reports a failed connection to the engine as status 900.
DOCKER_TRANSPORT_ERROR = 900


@dataclass(frozen=True)
class StartedContainer:
    id: str
    host_port: int


def container_name(settings: Settings, user: str) -> str:
    return f"{settings.gateway_name}-{user}"


def workspace_volume(settings: Settings, user: str) -> str:
    return f"{settings.gateway_name}-workspace-{user}"


def labels(settings: Settings, user: str) -> dict[str, str]:
    return {LABEL_USER: user, LABEL_GATEWAY: settings.gateway_name}


def container_config(settings: Settings, user: str) -> dict[str, Any]:
    limits = settings.limits
    memory = limits.memory_mb * 1024 * 1024
    mounts: list[dict[str, Any]] = [
        {
            "Type": "volume",
            "Source": workspace_volume(settings, user),
            "Target": "/workspace",
            # Applied when the mount creates the volume on first start.
            "VolumeOptions": {"Labels": labels(settings, user)},
        }
    ]
    if settings.ca_bundle:
        mounts.append(
            {"Type": "bind", "Source": settings.ca_bundle, "Target": CA_BUNDLE_IN_SANDBOX, "ReadOnly": True}
        )
    return {
        "Image": settings.sandbox_image,
        "User": "sandbox",
        "WorkingDir": "/workspace",
        "Hostname": "sandbox",
        "Env": [f"SANDBOX_USER={user}"],
        "Labels": labels(settings, user),
        "ExposedPorts": {PREVIEW_PORT: {}},
        "HostConfig": {
            "Memory": memory,
            # Equal to Memory: no swap on top of the memory limit.
            "MemorySwap": memory,
            "NanoCpus": int(limits.cpus * 1e9),
            "PidsLimit": limits.pids,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            # Only this host may reach the dev server port; the gateway proxies it.
            "PortBindings": {PREVIEW_PORT: [{"HostIp": "127.0.0.1", "HostPort": ""}]},
            "Mounts": mounts,
            "NetworkMode": settings.sandbox_network,
            "RestartPolicy": {"Name": "no"},
        },
    }


async def ensure_network(docker: aiodocker.Docker, settings: Settings) -> None:
    """Creates the sandboxes' bridge network, on which containers cannot talk to each other."""
    try:
        await docker.networks.get(settings.sandbox_network)
        return
    except aiodocker.DockerError as err:
        if err.status != 404:
            raise translate(err, "inspecting the sandbox network") from err
    try:
        await docker.networks.create(
            {
                "Name": settings.sandbox_network,
                "Driver": "bridge",
                "CheckDuplicate": True,
                "Options": {"com.docker.network.bridge.enable_icc": "false"},
                "Labels": {LABEL_GATEWAY: settings.gateway_name},
            }
        )
    except aiodocker.DockerError as err:
        # Another gateway created it at the same moment.
        if err.status != 409:
            raise translate(err, "creating the sandbox network") from err


async def create_and_start(docker: aiodocker.Docker, settings: Settings, user: str) -> StartedContainer:
    config = container_config(settings, user)
    name = container_name(settings, user)
    try:
        container = await _create_replacing_leftover(docker, config, name)
    except aiodocker.DockerError as err:
        raise translate(err, "creating the sandbox container", SandboxStartFailed) from err
    try:
        await container.start()
        info = await container.show()
        return StartedContainer(id=container.id, host_port=_published_port(info))
    except (aiodocker.DockerError, LookupError, ValueError) as err:
        await remove_container(docker, container.id)
        if isinstance(err, aiodocker.DockerError):
            raise translate(err, "starting the sandbox container", SandboxStartFailed) from err
        raise SandboxStartFailed(f"the sandbox container published no port for {PREVIEW_PORT}") from err


async def _create_replacing_leftover(
    docker: aiodocker.Docker, config: dict[str, Any], name: str
) -> aiodocker.containers.DockerContainer:
    try:
        return await docker.containers.create(config, name=name)
    except aiodocker.DockerError as err:
        if err.status != 409:
            raise
    # A container by this name survived a crash between its creation and our record of it. The
    # caller holds the user's lock, so nothing else is using it.
    log.warning("removing leftover container %s", name)
    await docker.containers.container(name).delete(force=True)
    return await docker.containers.create(config, name=name)


def _published_port(info: dict[str, Any]) -> int:
    bindings = info["NetworkSettings"]["Ports"][PREVIEW_PORT]
    return int(next(b["HostPort"] for b in bindings if b["HostIp"] == "127.0.0.1"))


async def is_running(docker: aiodocker.Docker, container_id: str) -> bool:
    try:
        info = await docker.containers.container(container_id).show()
    except aiodocker.DockerError as err:
        if err.status == 404:
            return False
        raise translate(err, "inspecting the sandbox container") from err
    return bool(info["State"]["Running"])


async def remove_container(docker: aiodocker.Docker, container_id: str) -> None:
    """Stops and removes the container at once (the workspace volume stays); gone already is fine."""
    try:
        await docker.containers.container(container_id).delete(force=True)
    except aiodocker.DockerError as err:
        if err.status != 404:
            raise translate(err, "removing the sandbox container") from err


async def ping(docker: aiodocker.Docker) -> None:
    try:
        await docker.version()
    except aiodocker.DockerError as err:
        raise translate(err, "asking the engine for its status") from err


def translate(
    err: aiodocker.DockerError, doing: str, refused: type[DockerFailed] = DockerFailed
) -> DockerUnavailable | DockerFailed:
    """The gateway's error for a DockerError met while `doing` something."""
    if err.status == DOCKER_TRANSPORT_ERROR:
        return DockerUnavailable(f"the Docker engine does not answer ({doing})")
    return refused(f"Docker refused {doing}: {err.message}")
