"""The lifecycle of a user's sandbox: start, look up, stop. PostgreSQL rows and Docker agree here."""

from __future__ import annotations

import asyncio
import logging
import secrets
import tarfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import aiodocker
import asyncpg

from . import agent, containers, db
from .agent import AgentAddress
from .db import Session
from .disks import Disks
from .egress import EgressGuard
from .errors import (
    AgentUnavailable,
    GatewayError,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxPaused,
    SandboxStartFailed,
)
from .runtime import Engine, SandboxHost
from .settings import Settings

log = logging.getLogger(__name__)

PORT_CACHE_S = 1.0
# Docker publishes the sandboxes' ports on this host's loopback only (containers.py).
AGENT_HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class PreviewTarget:
    host_port: int  # where 5173 is published on 127.0.0.1
    agent: AgentAddress | None  # None: a sandbox started before the agent


@dataclass(frozen=True)
class StartResult:
    session: Session
    created: bool


async def attach_disk(disks: Disks, docker: aiodocker.Docker, settings: Settings, user: str) -> None:
    """Mounts the user's filesystem (disks.py) as a start does, asking the engine for the image's
    home folder and an old workspace volume when the filesystem is new."""

    def image_home() -> Awaitable[tarfile.TarFile]:
        return containers.image_home(docker, settings)

    def old_workspace() -> Awaitable[str | None]:
        return containers.old_workspace_folder(docker, settings, user)

    await disks.attach(user, image_home, old_workspace)


class Sandboxes:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        docker: aiodocker.Docker,
        egress: EgressGuard | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._docker = docker
        self._disks = Disks(settings)
        # Learnt at the first start: the floor on free disk applies to the engine's data root too.
        self._docker_root: str | None = None
        self._egress = egress or EgressGuard(settings.egress, settings.sandbox_network)
        self._host = SandboxHost(settings, docker)
        # Only spares a request to the engine: a lost network makes creation fail, and the flag drop.
        self._network_ready = False
        # user -> (published port, when looked up): spares the preview proxy a query per request.
        # A second is as stale as it gets, and a stale port only fails to connect.
        self._ports: dict[str, tuple[PreviewTarget, float]] = {}
        # Users whose container is paused, as the engine's events say (container_events.py).
        self._paused: set[str] = set()

    async def start(self, user: str) -> StartResult:
        """Starts the user's sandbox, or returns the one that already runs.

        The user's advisory lock makes concurrent starts for one user take turns: the second finds
        the first one's container running. The capacity check happens in PostgreSQL so that it
        holds across gateway processes.
        """
        async with db.connection(self._pool) as conn, db.user_lock(conn, user):
            session = await db.get_session(conn, user)
            if session and session.state == "running" and session.container_id:
                now = await containers.status(self._docker, session.container_id)
                if now == containers.RUNNING:
                    return StartResult(session, created=False)
                if now == containers.PAUSED:
                    # Paused from outside, on purpose or not: not ours to undo, nor to replace.
                    raise SandboxPaused()
                log.info("sandbox of %s is recorded as running but its container is not; restarting", user)
                await containers.remove_container(self._docker, session.container_id)
            await self._check_free_space()
            # Read from the kernel at every start: rules flushed since (a firewall reload) stop starts.
            await self._egress.require()
            # Before the slot: a host that cannot take the sandbox refuses without touching the row.
            placement = await self._host.placement()
            agent_secret = secrets.token_urlsafe(32)
            await db.reserve_slot(conn, user, self._settings.max_sandboxes, agent_secret)
            try:
                if not self._network_ready:
                    async with db.advisory_lock(conn, db.NETWORK_LOCK):
                        await containers.ensure_network(self._docker, self._settings)
                    self._network_ready = True
                await self._attach_disk(user)
                started = await containers.create_and_start(
                    self._docker, self._settings, user, placement, agent_secret=agent_secret
                )
                await self._wait_for_agent(started, agent_secret)
            except BaseException:
                self._network_ready = False
                # create_and_start removed what it made, so nothing holds the filesystem.
                await self._disks.detach(user)
                await db.mark_stopped(conn, user, "start_failed")
                raise
            session = await db.mark_running(
                conn, user, started.id, started.host_port, started.agent_port, agent_secret
            )
            log.info("started sandbox of %s (container %.12s)", user, started.id)
            return StartResult(session, created=True)

    async def _wait_for_agent(self, started: containers.StartedContainer, secret: str) -> None:
        """A sandbox is running once its agent answers; one whose agent never does is removed."""
        try:
            await agent.wait_ready(AgentAddress(AGENT_HOST, started.agent_port, secret))
        except AgentUnavailable as err:
            await containers.remove_container(self._docker, started.id)
            raise SandboxStartFailed(f"the sandbox's agent did not start: {err.message}") from err

    async def _check_free_space(self) -> None:
        if self._docker_root is None and self._settings.disk.min_free_mb:
            self._docker_root = await containers.docker_root_dir(self._docker)
        await asyncio.to_thread(self._disks.check_free_space, self._docker_root)

    async def _attach_disk(self, user: str) -> None:
        await attach_disk(self._disks, self._docker, self._settings, user)

    async def check_host(self) -> Engine:
        """Whether the host has what sandboxes need (the runtime, lxcfs if required); raises if not."""
        return await self._host.check()

    async def get(self, user: str) -> Session:
        """The user's session; a container that died from outside (OOM, docker kill) is recorded as
        stopped, with why, the moment anyone looks, and a paused one shows as `paused` (which only
        Docker knows: the row stays `running`)."""
        async with db.connection(self._pool) as conn:
            session = await db.get_session(conn, user)
        if session is None:
            raise SandboxNotFound("you have no sandbox; start one with POST /api/sandbox")
        if session.state == "running" and session.container_id:
            now = await containers.status(self._docker, session.container_id)
            # What the engine says now, ahead of its event (container_events.py).
            self.mark_paused(user, now == containers.PAUSED)
            if now == containers.PAUSED:
                return replace(session, state=containers.PAUSED)
            if now != containers.RUNNING:
                await self._record_death(user, session.container_id, now)
                return await self.get(user)
        return session

    async def has_stopped(self, user: str) -> bool:
        """Whether the user's sandbox is not running, as `get` finds it (recording a death from
        outside); False when that cannot be told (the engine or the database away)."""
        try:
            return (await self.get(user)).state not in (containers.RUNNING, containers.PAUSED)
        except SandboxNotFound:
            return True
        except GatewayError:
            return False

    async def _record_death(self, user: str, container_id: str, reason: str) -> None:
        async with db.connection(self._pool) as conn, db.user_lock(conn, user):
            session = await db.get_session(conn, user)
            # Someone else may have restarted or stopped it while we waited for the lock.
            if session is None or session.state != "running" or session.container_id != container_id:
                return
            log.info("sandbox of %s died from outside: %s", user, reason)
            await self._stop_locked(conn, user, session, reason)

    async def stop(self, user: str, reason: str = "user", *, purge: bool = False) -> None:
        """Removes the user's container; the workspace volume stays unless `purge`."""
        async with db.connection(self._pool) as conn, db.user_lock(conn, user):
            session = await db.get_session(conn, user)
            running = session is not None and session.state != "stopped"
            if running:
                assert session is not None
                await self._stop_locked(conn, user, session, reason)
            purged = purge and any(
                [
                    await containers.remove_workspace(self._docker, self._settings, user),
                    await self._disks.remove(user),
                ]
            )
            if not running and not purged:
                raise SandboxNotFound("you have no running sandbox" + (" and no workspace" if purge else ""))

    async def stop_if_idle(self, user: str, idle_timeout_s: float) -> bool:
        """Stops the sandbox if it is still idle once we hold its lock; never waits for the lock, so
        that reapers on several gateways skip what another is already handling."""
        async with db.connection(self._pool) as conn, db.user_lock_if_free(conn, user) as locked:
            if not locked:
                return False
            session = await db.get_session(conn, user)
            idle_since = datetime.now(UTC) - timedelta(seconds=idle_timeout_s)
            if session is None or session.state != "running" or session.last_activity > idle_since:
                return False
            await self._stop_locked(conn, user, session, "idle")
            return True

    async def resolve_unfinished(self, user: str) -> str | None:
        """Finishes a start or a stop that a crash or an outage left half-done: a row in `starting`
        whose container runs is adopted as running, any other is stopped (its container, if any,
        removed); a row in `stopping` is stopped. What it did ("adopted", "stopped"), or None.

        A start or stop genuinely in progress holds the user's lock, so one whose lock is free died
        with its gateway or its database connection; a held lock is left alone."""
        async with db.connection(self._pool) as conn, db.user_lock_if_free(conn, user) as locked:
            session = await db.get_session(conn, user) if locked else None
            if session is None or session.state not in ("starting", "stopping"):
                return None
            if session.state == "starting":
                found = await containers.running_container(self._docker, self._settings, user)
                if found is not None:
                    await db.mark_running(
                        conn, user, found.id, found.host_port, found.agent_port, found.agent_secret
                    )
                    log.info("adopted the sandbox of %s, whose start was interrupted", user)
                    return "adopted"
            reason = "start_interrupted" if session.state == "starting" else session.stop_reason
            await self._stop_locked(conn, user, session, reason or "stop_interrupted")
            return "stopped"

    async def resolve_all_unfinished(self) -> list[str]:
        """One pass of resolve_unfinished over every row half-way through a start or a stop (rare:
        what crashes and outages leave), by reconciliation and by every reaper pass; who and how."""
        async with db.connection(self._pool) as conn:
            candidates = await db.unfinished_users(conn)
        resolved = []
        for user in candidates:
            if done := await self.resolve_unfinished(user):
                resolved.append(f"{user} ({done})")
        if resolved:
            log.info("resolved %d interrupted starts or stops: %s", len(resolved), ", ".join(resolved))
        return resolved

    async def _stop_locked(self, conn: db.Connection, user: str, session: Session, reason: str) -> None:
        await db.mark_stopping(conn, user, reason)
        # A start that died half-way left no id, only the container's deterministic name.
        target = session.container_id or containers.container_name(self._settings, user)
        await containers.remove_container(self._docker, target)
        await db.mark_stopped(conn, user, reason)
        self._ports.pop(user, None)
        # After the record, still under the lock (no start can mount it meanwhile): the sandbox is
        # stopped once its container is gone, and an unmount that fails leaves a mount that the next
        # start reuses or a reconciliation removes, not a row stuck in `stopping`.
        await self._disks.detach(user)
        log.info("stopped sandbox of %s (%s)", user, reason)

    async def reconcile(self) -> None:
        """Makes PostgreSQL and Docker agree after a restart: starts and stops left half-done are
        resolved; a running labelled container with a session is adopted as it is; one without is
        removed; a session whose container is gone is marked stopped. Nothing depends on the memory
        of an earlier process.

        The sessions are read before the containers are listed: another gateway may start a sandbox
        in between, and a session read after the listing would name a container the listing missed,
        which would then pass for gone. Read first, anything started since is simply not looked at,
        and whatever changed since is re-read under the user's lock."""
        await self.resolve_all_unfinished()
        async with db.connection(self._pool) as conn:
            active = {s.user: s for s in await db.active_sessions(conn)}
        found = await containers.labelled(self._docker, self._settings)
        for user, session in active.items():
            container = found.get(user)
            if container is None or container.id != session.container_id or not container.running:
                await self._record_death(user, session.container_id or "", "container_gone")
        for user, container in found.items():
            owner = active.get(user)
            if owner is None or owner.container_id != container.id:
                async with db.connection(self._pool) as conn, db.user_lock(conn, user):
                    current = await db.get_session(conn, user)
                    if current is None or current.container_id != container.id:
                        log.info("removing container %.12s of %s: no session owns it", container.id, user)
                        await containers.remove_container(self._docker, container.id)
                        if current is None or current.state == "stopped":
                            await self._disks.detach(user)
        await self._unmount_leftover_disks()

    async def _unmount_leftover_disks(self) -> None:
        """Unmounts the filesystems of users with no sandbox: left by a gateway that died between a
        container's removal and its unmount. Re-read under the user's lock, which a start holds
        from the mount to its record, so a start in progress is never undone."""
        for user in await self._disks.mounted_users():
            async with db.connection(self._pool) as conn, db.user_lock(conn, user):
                current = await db.get_session(conn, user)
                if current is None or current.state == "stopped":
                    log.info("unmounting the filesystem of %s: no sandbox uses it", user)
                    await self._disks.detach(user)

    async def running_container(self, user: str) -> str:
        """The id of the user's running container, for exec and friends; counts as activity."""
        session = await self._running_session(user)
        assert session.container_id is not None
        return session.container_id

    async def agent(self, user: str) -> AgentAddress:
        """Where the agent of the user's running sandbox answers, with its secret, for runs, processes,
        terminals and ports; counts as activity."""
        if self.is_paused(user):
            # A paused sandbox's network still accepts: its agent would take the request and never answer.
            raise SandboxPaused()
        session = await self._running_session(user)
        if session.agent_port is None or session.agent_secret is None:
            # Started by a gateway from before the agent: its container has none.
            raise SandboxNotRunning("your sandbox was started before this gateway's agent; restart it")
        return AgentAddress(AGENT_HOST, session.agent_port, session.agent_secret)

    async def _running_session(self, user: str) -> Session:
        async with db.connection(self._pool) as conn:
            session = await db.get_session(conn, user)
            if session is None or session.state != "running" or not session.container_id:
                raise SandboxNotRunning()
            if datetime.now(UTC) - session.last_activity > timedelta(
                seconds=self._settings.activity_interval_s
            ):
                await db.touch(conn, user)
        return session

    def set_paused(self, users: set[str]) -> None:
        self._paused = set(users)

    def mark_paused(self, user: str, paused: bool) -> None:
        if paused:
            self._paused.add(user)
        else:
            self._paused.discard(user)

    def is_paused(self, user: str) -> bool:
        """Whether the engine said the user's container is paused: known without asking anyone."""
        return user in self._paused

    def cached_preview_port(self, user: str) -> int | None:
        """preview_port if it is known without asking the database."""
        cached = self.cached_preview_target(user)
        return None if cached is None else cached.host_port

    async def preview_port(self, user: str) -> int:
        """The host port on 127.0.0.1 where the user's container publishes 5173."""
        return (await self.preview_target(user)).host_port

    def cached_preview_target(self, user: str) -> PreviewTarget | None:
        """preview_target if it is known without asking the database."""
        cached = self._ports.get(user)
        if cached and time.monotonic() - cached[1] < PORT_CACHE_S:
            return cached[0]
        return None

    async def preview_target(self, user: str) -> PreviewTarget:
        """Where the previews of the user's running sandbox are reached: the published 5173, and the
        agent, which relays to any port."""
        cached = self.cached_preview_target(user)
        if cached is not None:
            return cached
        now = time.monotonic()
        async with db.connection(self._pool) as conn:
            session = await db.get_session(conn, user)
        if session is None or session.state != "running" or session.host_port is None:
            self._ports.pop(user, None)
            raise SandboxNotRunning()
        agent = None
        if session.agent_port is not None and session.agent_secret is not None:
            agent = AgentAddress(AGENT_HOST, session.agent_port, session.agent_secret)
        target = PreviewTarget(session.host_port, agent)
        self._ports[user] = (target, now)
        return target

    @property
    def activity_interval_s(self) -> float:
        return self._settings.activity_interval_s

    async def record_activity(self, user: str) -> None:
        async with db.connection(self._pool) as conn:
            await db.touch(conn, user)
