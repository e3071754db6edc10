"""The Docker side of a sandbox: its container's configuration, creation, inspection and removal.

Every DockerError leaves this module translated: 404 means gone, a transport failure means the
engine is unavailable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

import aiodocker

from . import disks, egress_rules
from .errors import (
    DiskQuotaUnavailable,
    DockerFailed,
    DockerUnavailable,
    EgressNotEnforced,
    GatewayError,
    SandboxNotRunning,
    SandboxPaused,
    SandboxStartFailed,
)

# RUNNING and PAUSED are also this module's names for them (terminal.py reads them here).
from .sandbox_runtime import PAUSED as PAUSED
from .sandbox_runtime import RUNNING as RUNNING
from .sandbox_runtime import ListedSandbox, StartedSandbox
from .settings import DiskSettings, Settings

if TYPE_CHECKING:
    from .runtime import Placement

log = logging.getLogger(__name__)

LABEL_USER = "sandbox-gateway.user"
LABEL_GATEWAY = "sandbox-gateway.gateway"
PREVIEW_PORT = "5173/tcp"
# The agent's port (sandbox-image/agent): the only other one published, and on 127.0.0.1 only.
AGENT_PORT = "49983/tcp"
AGENT_COMMAND = ["/usr/local/bin/sandbox-agent"]
AGENT_SECRET_DIGEST_ENV = "SANDBOX_AGENT_SECRET_SHA256"  # noqa: S105 (a variable's name)
# The agent's, as root: starting the user's programs as `sandbox` with a tag group (SETUID, SETGID),
# ending them (KILL), and giving a terminal to its shell's user (CHOWN). Nothing the user runs has any:
# no-new-privileges, and they run as uid 1000.
AGENT_CAPABILITIES = ["SETUID", "SETGID", "KILL", "CHOWN"]
CA_BUNDLE_IN_SANDBOX = "/etc/ssl/certs/ca-certificates.crt"
HOME_IN_SANDBOX = "/home/sandbox"
# PID 1's output is all that reaches the engine's log, and nothing of the gateway's reads it: enough
# for an operator's `docker logs`, never a way to fill the engine's disk.
LOG_CONFIG = {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}}
# aiodocker reports a failed connection to the engine as status 900.
DOCKER_TRANSPORT_ERROR = 900


def container_name(settings: Settings, user: str) -> str:
    return f"{settings.gateway_name}-{user}"


def workspace_volume(settings: Settings, user: str) -> str:
    return f"{settings.gateway_name}-workspace-{user}"


def labels(settings: Settings, user: str) -> dict[str, str]:
    return {LABEL_USER: user, LABEL_GATEWAY: settings.gateway_name}


def agent_secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def container_config(
    settings: Settings, user: str, placement: Placement | None = None, *, agent_secret: str | None = None
) -> dict[str, Any]:
    """The container of the user's sandbox. Without `agent_secret`, its agent gets one nobody knows:
    a container made by hand (tests, benchmarks) runs, but nothing can talk to its agent."""
    agent_secret = agent_secret or secrets.token_urlsafe(32)
    limits = settings.limits
    memory = limits.memory_mb * 1024 * 1024
    mounts = _storage_mounts(settings, user)
    if settings.ca_bundle:
        mounts.append(
            {"Type": "bind", "Source": settings.ca_bundle, "Target": CA_BUNDLE_IN_SANDBOX, "ReadOnly": True}
        )
    if placement:
        mounts.extend(placement.mounts)
    return {
        "Image": settings.sandbox_image,
        # The agent's user; it starts everything else as `sandbox`.
        "User": "root",
        "Cmd": AGENT_COMMAND,
        "WorkingDir": "/workspace",
        "Hostname": "sandbox",
        # Every terminal and run inherits the first two: a dev server started with --base
        # "$PREVIEW_BASE" serves correctly behind /preview/<user>/. The agent gets only the secret's
        # digest: PID 1's environment is root's and unreadable to uid 1000 under runc, but gVisor
        # shows any process's environment to every user in the sandbox, and a digest of 32 random
        # bytes tells nothing that would pass the agent's check (which hashes what it is shown).
        "Env": [
            f"SANDBOX_USER={user}",
            f"PREVIEW_BASE=/preview/{user}/",
            f"{AGENT_SECRET_DIGEST_ENV}={agent_secret_digest(agent_secret)}",
        ],
        "Labels": labels(settings, user) | (placement.labels if placement else {}),
        "ExposedPorts": {PREVIEW_PORT: {}, AGENT_PORT: {}},
        "HostConfig": {
            "Runtime": settings.sandbox_runtime,
            "Memory": memory,
            # Equal to Memory: no swap on top of the memory limit.
            "MemorySwap": memory,
            "NanoCpus": int(limits.cpus * 1e9),
            "PidsLimit": limits.pids,
            "CapDrop": ["ALL"],
            "CapAdd": AGENT_CAPABILITIES,
            "SecurityOpt": ["no-new-privileges"],
            # Only this host may reach the dev server port and the agent; the gateway proxies both.
            "PortBindings": {
                port: [{"HostIp": "127.0.0.1", "HostPort": ""}] for port in (PREVIEW_PORT, AGENT_PORT)
            },
            "Mounts": mounts,
            **_writable_places(settings),
            "LogConfig": LOG_CONFIG,
            "NetworkMode": settings.sandbox_network,
            "RestartPolicy": {"Name": "no"},
            **(placement.host_config if placement else {}),
        },
    }


def _storage_mounts(settings: Settings, user: str) -> list[dict[str, Any]]:
    if not settings.disk.quota:
        # No quota (SANDBOX_DISK_MB=0): a Docker volume, as big as the engine's disk.
        volume = {
            "Type": "volume",
            "Source": workspace_volume(settings, user),
            "Target": "/workspace",
            # Applied when the mount creates the volume on first start.
            "VolumeOptions": {"Labels": labels(settings, user)},
        }
        return [volume]
    # The user's own filesystem (disks.py), mounted by the gateway before the container is created.
    paths = disks.disk_paths(settings, user)
    return [
        {"Type": "bind", "Source": str(paths.workspace), "Target": "/workspace"},
        {"Type": "bind", "Source": str(paths.home), "Target": HOME_IN_SANDBOX},
    ]


def _writable_places(settings: Settings) -> dict[str, Any]:
    """With quotas, nothing but the user's filesystem and bounded tmpfs can be written: the
    container's own layer, on the engine's disk, is read-only."""
    if not settings.disk.quota:
        return {}
    # tmpfs is memory: the size makes a full /tmp an ENOSPC before it is an OOM kill. exec because
    # tools run what they unpack there (pip's builds, npx).
    tmpfs = f"rw,exec,nosuid,nodev,size={settings.disk.tmp_mb}m,mode=1777"
    # Paths inside the sandbox, not the gateway's own temporary files.
    folders = ("/tmp", "/var/tmp")  # noqa: S108
    return {"ReadonlyRootfs": True, "Tmpfs": dict.fromkeys(folders, tmpfs)}


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
    # The egress rules name the bridge (egress_rules.py), so the network gets a name for it, fixed.
    bridge = egress_rules.bridge_name(settings.sandbox_network)
    with docker_errors("preparing the sandbox network"):
        try:
            network = await docker.networks.get(settings.sandbox_network)
            _check_bridge(await network.show(), bridge, settings)
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
                    "Options": {
                        "com.docker.network.bridge.enable_icc": "false",
                        egress_rules.BRIDGE_OPTION: bridge,
                    },
                    "Labels": {LABEL_GATEWAY: settings.gateway_name},
                }
            )
        except aiodocker.DockerError as err:
            # Another gateway created it at the same moment.
            if err.status != 409:
                raise


def _check_bridge(info: dict[str, Any], bridge: str, settings: Settings) -> None:
    named = (info.get("Options") or {}).get(egress_rules.BRIDGE_OPTION)
    if settings.egress.mode != "open" and named != bridge:
        # Made by a gateway older than the egress policy: the rules would guard another bridge.
        raise EgressNotEnforced(
            f"the network {settings.sandbox_network} has no bridge named {bridge}, which the egress"
            " rules guard: stop its sandboxes and remove it (docker network rm), the next start makes it"
        )


async def create_and_start(
    docker: aiodocker.Docker,
    settings: Settings,
    user: str,
    placement: Placement | None = None,
    *,
    agent_secret: str | None = None,
) -> StartedSandbox:
    """Creates and starts the user's container; on any failure, removes what it made."""
    config = container_config(settings, user, placement, agent_secret=agent_secret)
    name = container_name(settings, user)
    try:
        with docker_errors("creating the sandbox container", SandboxStartFailed):
            container = await _create_replacing_leftover(docker, config, name)
    except SandboxStartFailed as err:
        # The folders exist only inside the user's mounted filesystem (disks.py): the engine does not
        # see what the gateway mounted.
        if settings.disk.quota and "bind source path does not exist" in err.message:
            raise DiskQuotaUnavailable(
                "the Docker engine does not see the filesystems the gateway mounts: run the gateway on"
                " the engine's host, in its mount namespace (README, Disk quotas)"
            ) from err
        raise
    try:
        with docker_errors("starting the sandbox container", SandboxStartFailed):
            await container.start()
            info = await container.show()
        return _started(info)
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


async def running_container(docker: aiodocker.Docker, settings: Settings, user: str) -> StartedSandbox | None:
    """The user's container by its name, if it runs: what a start that died half-way may have left."""
    info = await _inspect(docker, container_name(settings, user))
    if info is None or _status_of(info["State"]) != RUNNING:
        return None
    return _started(info)


def _started(info: dict[str, Any]) -> StartedSandbox:
    return StartedSandbox(
        id=info["Id"],
        host_port=_published_port(info, PREVIEW_PORT),
        agent_port=_published_port(info, AGENT_PORT),
    )


def _published_port(info: dict[str, Any], port: str) -> int:
    bindings = info["NetworkSettings"]["Ports"].get(port) or []
    for binding in bindings:
        if binding["HostIp"] == "127.0.0.1":
            return int(binding["HostPort"])
    raise SandboxStartFailed(f"the sandbox container published no port for {port}")


async def labelled(docker: aiodocker.Docker, settings: Settings) -> dict[str, ListedSandbox]:
    """This deployment's sandbox containers, running or not, by user."""
    filters = json.dumps({"label": [f"{LABEL_GATEWAY}={settings.gateway_name}", LABEL_USER]})
    with docker_errors("listing sandbox containers"):
        listed = await docker.containers.list(all="1", filters=filters)
    found = {}
    for container in listed:
        info = container._container  # the list entry aiodocker keeps; no extra request
        found[info["Labels"][LABEL_USER]] = ListedSandbox(id=info["Id"], state=info["State"])
    return found


async def status(docker: aiodocker.Docker, container_id: str) -> str:
    """ "running", "paused", or why the container no longer runs (oom_killed, exited_137, container_gone)."""
    info = await _inspect(docker, container_id)
    return "container_gone" if info is None else _status_of(info["State"])


async def _inspect(docker: aiodocker.Docker, container: str) -> dict[str, Any] | None:
    """The engine's view of a container (by id or name); None if there is none."""
    with docker_errors("inspecting the sandbox container"):
        try:
            info: dict[str, Any] = await docker.containers.container(container).show()
        except aiodocker.DockerError as err:
            if err.status == 404:
                return None
            raise
    return info


def _status_of(state: dict[str, Any]) -> str:
    if state["Running"]:
        return PAUSED if state.get("Paused") else RUNNING
    if state.get("OOMKilled"):
        return "oom_killed"
    return f"exited_{state.get('ExitCode')}"


@contextmanager
def exec_errors(doing: str) -> Iterator[None]:
    """docker_errors for an exec in the sandbox: a container gone or stopped is SandboxNotRunning,
    a paused one SandboxPaused."""
    with docker_errors(doing):
        try:
            yield
        except aiodocker.DockerError as err:
            # 404: the container is gone; 409: it exists but is not running, or is paused.
            if err.status == 409 and "paused" in str(err.message).lower():
                raise SandboxPaused() from err
            if err.status in (404, 409):
                raise SandboxNotRunning() from err
            raise


# How long an exec's exit code may take to show once its output has ended.
EXIT_CODE_WAIT_S = 5.0


async def exit_code(execution: Any) -> int | None:
    """The exit code once Docker has noticed the process is gone (a moment after its output ends)."""
    deadline = time.monotonic() + EXIT_CODE_WAIT_S
    while True:
        info = await execution.inspect()
        if not info["Running"] or time.monotonic() > deadline:
            return info["ExitCode"] if not info["Running"] else None
        await asyncio.sleep(0.01)


async def remove_workspace(docker: aiodocker.Docker, settings: Settings, user: str) -> bool:
    """Deletes the user's workspace volume; whether there was one."""
    with docker_errors("removing the workspace"):
        volume = await _workspace_volume(docker, settings, user)
        if volume is None:
            return False
        await volume.delete()
    return True


async def old_workspace_folder(docker: aiodocker.Docker, settings: Settings, user: str) -> str | None:
    """Where the engine keeps the user's workspace volume from before quotas, if there is one."""
    with docker_errors("looking for an old workspace volume"):
        volume = await _workspace_volume(docker, settings, user)
        if volume is None:
            return None
        info = await volume.show()
    return str(info["Mountpoint"])


async def _workspace_volume(docker: aiodocker.Docker, settings: Settings, user: str) -> Any:
    """The user's workspace volume (aiodocker's DockerVolume, untyped there), or None if there is none.
    Inside the caller's docker_errors."""
    try:
        return await docker.volumes.get(workspace_volume(settings, user))  # type: ignore[no-untyped-call]
    except aiodocker.DockerError as err:
        if err.status == 404:
            return None
        raise


async def image_home(docker: aiodocker.Docker, settings: Settings) -> tarfile.TarFile:
    """The sandbox image's /home/sandbox as a tar archive, from a container that never runs."""
    with docker_errors("reading the image's home folder", SandboxStartFailed):
        container = await docker.containers.create(
            {"Image": settings.sandbox_image, "Labels": {LABEL_GATEWAY: settings.gateway_name}}
        )
        try:
            return await container.get_archive(HOME_IN_SANDBOX)
        finally:
            await container.delete(force=True)


async def docker_root_dir(docker: aiodocker.Docker) -> str:
    """The engine's data root (DockerRootDir), whose filesystem holds images and container layers."""
    with docker_errors("asking the engine for its data root"):
        info = await docker.system.info()
    return str(info["DockerRootDir"])


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


async def remove_deployment(
    docker: aiodocker.Docker, gateway_name: str, disk_dir: str = DiskSettings().directory
) -> None:
    """Removes every container, workspace volume, filesystem and network of this deployment's name:
    what the tests and benchmarks leave, or an operator's uninstall. Workspaces go too."""
    label = {"label": [f"{LABEL_GATEWAY}={gateway_name}"]}
    for container in await docker.containers.list(all="1", filters=json.dumps(label)):
        await container.delete(force=True)
    # The containers are gone, so nothing holds the filesystems any more.
    await disks.remove_deployment_disks(disk_dir, gateway_name)
    volumes = await docker.volumes.list(filters=label)  # type: ignore[no-untyped-call]
    for volume in volumes.get("Volumes") or []:
        await (await docker.volumes.get(volume["Name"])).delete()  # type: ignore[no-untyped-call]
    for network in await docker.networks.list(filters=label):
        await (await docker.networks.get(network["Id"])).delete()
