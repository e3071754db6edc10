"""The Docker side of a sandbox: its container's configuration, creation, inspection and removal.

Every DockerError leaves this module translated: 404 means gone, a transport failure means the
engine is unavailable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiodocker

from .errors import DockerFailed, DockerUnavailable, GatewayError, SandboxStartFailed
from .settings import Settings

if TYPE_CHECKING:
    from .runtime import Placement

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


def container_config(settings: Settings, user: str, placement: Placement | None = None) -> dict[str, Any]:
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
    if placement:
        mounts.extend(placement.mounts)
    return {
        "Image": settings.sandbox_image,
        "User": "sandbox",
        "WorkingDir": "/workspace",
        "Hostname": "sandbox",
        # Every terminal and run inherits these: a dev server started with --base "$PREVIEW_BASE"
        # serves correctly behind /preview/<user>/.
        "Env": [f"SANDBOX_USER={user}", f"PREVIEW_BASE=/preview/{user}/"],
        "Labels": labels(settings, user) | (placement.labels if placement else {}),
        "ExposedPorts": {PREVIEW_PORT: {}},
        "HostConfig": {
            "Runtime": settings.sandbox_runtime,
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
            **(placement.host_config if placement else {}),
        },
    }


@contextmanager
def docker_errors(doing: str, refused: type[DockerFailed] = DockerFailed) -> Iterator[None]:
    """Translates what the engine raises while `doing` something into the gateway's errors."""
    try:
        yield
    except aiodocker.DockerError as err:
        if err.status == DOCKER_TRANSPORT_ERROR:
            raise DockerUnavailable(f"the Docker engine does not answer ({doing})") from err
        raise refused(f"Docker refused {doing}: {err.message}") from err
    except TimeoutError as err:
        raise DockerUnavailable(f"the Docker engine did not answer in time ({doing})") from err


async def ensure_network(docker: aiodocker.Docker, settings: Settings) -> None:
    """Creates the sandboxes' bridge network, on which containers cannot talk to each other."""
    with docker_errors("preparing the sandbox network"):
        try:
            await docker.networks.get(settings.sandbox_network)
            return
        except aiodocker.DockerError as err:
            if err.status != 404:
                raise
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
                raise


async def create_and_start(
    docker: aiodocker.Docker, settings: Settings, user: str, placement: Placement | None = None
) -> StartedContainer:
    """Creates and starts the user's container; on any failure, removes what it made."""
    config = container_config(settings, user, placement)
    name = container_name(settings, user)
    with docker_errors("creating the sandbox container", SandboxStartFailed):
        container = await _create_replacing_leftover(docker, config, name)
    try:
        with docker_errors("starting the sandbox container", SandboxStartFailed):
            await container.start()
            info = await container.show()
        return StartedContainer(id=container.id, host_port=_published_port(info))
    except BaseException:
        # Best effort: the original failure is the one worth reporting.
        with suppress(GatewayError):
            await remove_container(docker, container.id)
        raise


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
    bindings = info["NetworkSettings"]["Ports"].get(PREVIEW_PORT) or []
    for binding in bindings:
        if binding["HostIp"] == "127.0.0.1":
            return int(binding["HostPort"])
    raise SandboxStartFailed(f"the sandbox container published no port for {PREVIEW_PORT}")


@dataclass(frozen=True)
class LabelledContainer:
    id: str
    running: bool


async def labelled(docker: aiodocker.Docker, settings: Settings) -> dict[str, LabelledContainer]:
    """This deployment's sandbox containers, running or not, by user."""
    filters = json.dumps({"label": [f"{LABEL_GATEWAY}={settings.gateway_name}", LABEL_USER]})
    with docker_errors("listing sandbox containers"):
        listed = await docker.containers.list(all="1", filters=filters)
    found = {}
    for container in listed:
        info = container._container  # the list entry aiodocker keeps; no extra request
        found[info["Labels"][LABEL_USER]] = LabelledContainer(
            id=info["Id"], running=info["State"] == "running"
        )
    return found


async def death_reason(docker: aiodocker.Docker, container_id: str) -> str | None:
    """None while the container runs; otherwise why it does not (oom_killed, exited_137, gone)."""
    with docker_errors("inspecting the sandbox container"):
        try:
            state = (await docker.containers.container(container_id).show())["State"]
        except aiodocker.DockerError as err:
            if err.status == 404:
                return "container_gone"
            raise
    if state["Running"]:
        return None
    if state.get("OOMKilled"):
        return "oom_killed"
    return f"exited_{state.get('ExitCode')}"


async def remove_workspace(docker: aiodocker.Docker, settings: Settings, user: str) -> bool:
    """Deletes the user's workspace volume; whether there was one."""
    with docker_errors("removing the workspace"):
        try:
            volume = await docker.volumes.get(workspace_volume(settings, user))  # type: ignore[no-untyped-call]
        except aiodocker.DockerError as err:
            if err.status == 404:
                return False
            raise
        await volume.delete()
    return True


async def remove_container(docker: aiodocker.Docker, container_id: str) -> None:
    """Stops and removes the container at once (the workspace volume stays); gone already is fine."""
    with docker_errors("removing the sandbox container"):
        try:
            await docker.containers.container(container_id).delete(force=True)
        except aiodocker.DockerError as err:
            if err.status != 404:
                raise


async def ping(docker: aiodocker.Docker) -> None:
    with docker_errors("asking the engine for its version"):
        await docker.version()


async def remove_deployment(docker: aiodocker.Docker, gateway_name: str) -> None:
    """Removes every container, workspace volume and network labelled with this deployment's name:
    what the tests and benchmarks leave, or an operator's uninstall. Workspaces go too."""
    label = {"label": [f"{LABEL_GATEWAY}={gateway_name}"]}
    for container in await docker.containers.list(all="1", filters=json.dumps(label)):
        await container.delete(force=True)
    volumes = await docker.volumes.list(filters=label)  # type: ignore[no-untyped-call]
    for volume in volumes.get("Volumes") or []:
        await (await docker.volumes.get(volume["Name"])).delete()  # type: ignore[no-untyped-call]
    for network in await docker.networks.list(filters=label):
        await (await docker.networks.get(network["Id"])).delete()
