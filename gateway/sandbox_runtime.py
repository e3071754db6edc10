"""The seam between a sandbox's lifecycle (sandboxes.py) and the engine that runs it.

Sandboxes decides (locks, rows in PostgreSQL, capacity, reasons); a SandboxRuntime does what an
engine does for one user's sandbox: make its workspace, create and start it with its agent's secret,
tell its state, remove it, list what this deployment has, and say where its agent and its ports
answer. docker_runtime.py implements it with the Docker engine of this host; docs/kubernetes.md
describes a Kubernetes implementation. Nothing but Sandboxes and container_events.py holds one, and
no handler imports an engine's client.

(Not to be confused with runtime.py: the OCI runtime, runc or runsc, and the host's placement, which
are details of the Docker implementation.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from .agent import AgentAddress
    from .runtime import Engine

# A sandbox's state as the engine tells it: these two, or why it no longer runs (oom_killed,
# exited_<code>, container_gone).
RUNNING, PAUSED = "running", "paused"
GONE = "container_gone"


@dataclass(frozen=True)
class StartedSandbox:
    """What a start records: the engine's id and the published ports (host_port is the dev
    server's, 5173 inside)."""

    id: str
    host_port: int
    agent_port: int


@dataclass(frozen=True)
class ListedSandbox:
    id: str
    state: str  # the engine's: running, paused, exited, created, ...

    @property
    def running(self) -> bool:
        """Alive: a paused sandbox is frozen, not gone."""
        return self.state in (RUNNING, PAUSED)

    @property
    def paused(self) -> bool:
        return self.state == PAUSED


@dataclass(frozen=True)
class SandboxEvent:
    user: str
    action: Literal["pause", "unpause", "die"]


class SandboxRuntime(Protocol):
    async def ping(self) -> None:
        """Returns when the engine answers; raises DockerUnavailable (or its kin) when it does not."""

    async def check_host(self) -> Engine:
        """The engine's facts; HostMisconfigured when it lacks what the settings ask for."""

    async def prepare_network(self) -> None:
        """Makes the network sandboxes join, on which they cannot reach each other. Sandboxes calls it
        under a lock shared by every gateway."""

    async def check_free_space(self) -> None:
        """Raises DiskFull when the host's storage is under the operator's floor."""

    async def attach_workspace(self, user: str) -> None:
        """Makes the user's workspace ready to mount (creating it, with the image's home, if new)."""

    async def detach_workspace(self, user: str) -> None:
        """Releases what attach_workspace holds on this host; the workspace itself stays."""

    async def remove_workspace(self, user: str) -> bool:
        """Deletes the user's workspace for good; whether there was one."""

    async def attached_workspaces(self) -> list[str]:
        """The users whose workspace this host holds attached, for the reconciliation."""

    async def create_and_start(self, user: str, agent_secret: str) -> StartedSandbox:
        """Creates and starts the user's sandbox with its agent's secret; on failure, leaves nothing."""

    async def running(self, user: str) -> StartedSandbox | None:
        """The user's sandbox found by its name, if it runs: what a start that died half-way left."""

    async def status(self, sandbox_id: str) -> str:
        """RUNNING, PAUSED, or why the sandbox no longer runs."""

    async def remove(self, user: str, sandbox_id: str | None) -> None:
        """Stops and removes the sandbox at once (by its name when its id was never recorded); the
        workspace stays; gone already is fine."""

    async def listed(self) -> dict[str, ListedSandbox]:
        """This deployment's sandboxes, running or not, by user."""

    def agent_address(self, sandbox_id: str, agent_port: int, secret: str) -> AgentAddress:
        """Where the agent of the sandbox answers a gateway, from what its start recorded."""

    def preview_address(self, sandbox_id: str, host_port: int) -> tuple[str, int]:
        """Where the sandbox's dev server port (5173) answers a gateway, from what its start recorded."""

    def events(self, subscribed: Callable[[], Awaitable[None]]) -> AsyncIterator[SandboxEvent]:
        """Pause, unpause and die as they happen, until the stream breaks (a GatewayError); calls
        `subscribed` once it listens, so that what the caller reads then misses nothing."""
