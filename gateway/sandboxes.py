"""The lifecycle of a user's sandbox: start, look up, stop. PostgreSQL rows and the engine agree here;
the engine is a SandboxRuntime (sandbox_runtime.py), Docker's in docker_runtime.py."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import asyncpg

from . import agent, db
from .agent import AgentAddress
from .db import Session
from .egress import EgressGuard
from .errors import (
    AgentUnavailable,
    GatewayError,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxPaused,
    SandboxStartFailed,
)
from .runtime import Engine
from .sandbox_runtime import PAUSED, RUNNING, ListedSandbox, SandboxRuntime, StartedSandbox
from .settings import Settings

log = logging.getLogger(__name__)

PORT_CACHE_S = 1.0


@dataclass(frozen=True, slots=True)
class PreviewTarget:
    host_port: int  # where 5173 is published on 127.0.0.1
    agent: AgentAddress | None  # None: a sandbox started before the agent


@dataclass(frozen=True)
class StartResult:
    session: Session
    created: bool


class Sandboxes:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        engine: SandboxRuntime,
        egress: EgressGuard | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._engine = engine
        self._egress = egress or EgressGuard(settings.egress, settings.sandbox_network)
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
                now = await self._engine.status(session.container_id)
                if now == RUNNING:
                    return StartResult(session, created=False)
                if now == PAUSED:
                    # Paused from outside, on purpose or not: not ours to undo, nor to replace.
                    raise SandboxPaused()
                log.info("sandbox of %s is recorded as running but its container is not; restarting", user)
                await self._engine.remove(user, session.container_id)
            await self._engine.check_free_space()
            # Read from the kernel at every start: rules flushed since (a firewall reload) stop starts.
            await self._egress.require()
            # Before the slot: a host that cannot take the sandbox refuses without touching the row.
            await self._engine.check_host()
            agent_secret = secrets.token_urlsafe(32)
            await db.reserve_slot(conn, user, self._settings.max_sandboxes, agent_secret)
            try:
                if not self._network_ready:
                    async with db.advisory_lock(conn, db.NETWORK_LOCK):
                        await self._engine.prepare_network()
                    self._network_ready = True
                await self._engine.attach_workspace(user)
                started = await self._engine.create_and_start(user, agent_secret)
                await self._wait_for_agent(user, started, agent_secret)
            except BaseException:
                self._network_ready = False
                # create_and_start removed what it made, so nothing holds the workspace.
                await self._engine.detach_workspace(user)
                await db.mark_stopped(conn, user, "start_failed")
                raise
            session = await db.mark_running(
                conn, user, started.id, started.host_port, started.agent_port, agent_secret
            )
            log.info("started sandbox of %s (container %.12s)", user, started.id)
            return StartResult(session, created=True)

    async def _wait_for_agent(self, user: str, started: StartedSandbox, secret: str) -> None:
        """A sandbox is running once its agent answers; one whose agent never does is removed."""
        try:
            await agent.wait_ready(self._engine.agent_address(started.id, started.agent_port, secret))
        except AgentUnavailable as err:
            await self._engine.remove(user, started.id)
            raise SandboxStartFailed(f"the sandbox's agent did not start: {err.message}") from err

    async def check_host(self) -> Engine:
        """Whether the host has what sandboxes need (the runtime, lxcfs if required); raises if not."""
        return await self._engine.check_host()

    async def engine_answers(self) -> None:
        """Returns when the engine answers (healthz); raises DockerUnavailable when it does not."""
        await self._engine.ping()

    async def get(self, user: str) -> Session:
        """The user's session; a container that died from outside (OOM, docker kill) is recorded as
        stopped, with why, the moment anyone looks, and a paused one shows as `paused` (which only
        Docker knows: the row stays `running`)."""
        async with db.connection(self._pool) as conn:
            session = await db.get_session(conn, user)
        if session is None:
            raise SandboxNotFound("you have no sandbox; start one with POST /api/sandbox")
        if session.state == "running" and session.container_id:
            now = await self._engine.status(session.container_id)
            # What the engine says now, ahead of its event (container_events.py).
            self.mark_paused(user, now == PAUSED)
            if now == PAUSED:
                return replace(session, state=PAUSED)
            if now != RUNNING:
                await self._record_death(user, session.container_id, now)
                return await self.get(user)
        return session

    async def page(self, *, state: str | None, after: str, limit: int) -> tuple[list[Session], str | None]:
        """A page of every user's sessions in user order, as each owner's GET sees it (a container
        that died from outside is recorded as stopped, a paused one shows `paused`), and the `after`
        of the next page. With one listing of the engine for the page, not one inspection per row."""
        async with db.connection(self._pool) as conn:
            sessions = await db.list_sessions(conn, state=state, after=after, limit=limit)
        next_after = sessions[-1].user if len(sessions) == limit else None
        if any(session.state == "running" for session in sessions):
            found = await self._engine.listed()
            sessions = [await self._as_engine_sees(session, found) for session in sessions]
        if state is not None:
            # Death seen just now moves a row out of what was asked; paused is a kind of running.
            sessions = [s for s in sessions if s.state == state or (state, s.state) == (RUNNING, PAUSED)]
        return sessions, next_after

    async def _as_engine_sees(self, session: Session, found: dict[str, ListedSandbox]) -> Session:
        if session.state != RUNNING or not session.container_id:
            return session
        listed = found.get(session.user)
        if listed is not None and listed.id == session.container_id and listed.running:
            return replace(session, state=PAUSED) if listed.paused else session
        # Gone or dead: one look as its owner's GET takes, which records why.
        try:
            return await self.get(session.user)
        except SandboxNotFound:
            return session

    async def has_stopped(self, user: str) -> bool:
        """Whether the user's sandbox is not running, as `get` finds it (recording a death from
        outside); False when that cannot be told (the engine or the database away)."""
        try:
            return (await self.get(user)).state not in (RUNNING, PAUSED)
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
            purged = purge and await self._engine.remove_workspace(user)
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
                found = await self._engine.running(user)
                if found is not None:
                    # The secret the start reserved: the container carries only its digest.
                    await db.mark_running(conn, user, found.id, found.host_port, found.agent_port, None)
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
        await self._engine.remove(user, session.container_id)
        await db.mark_stopped(conn, user, reason)
        self._ports.pop(user, None)
        # After the record, still under the lock (no start can mount it meanwhile): the sandbox is
        # stopped once its container is gone, and an unmount that fails leaves a mount that the next
        # start reuses or a reconciliation removes, not a row stuck in `stopping`.
        await self._engine.detach_workspace(user)
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
        found = await self._engine.listed()
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
                        await self._engine.remove(user, container.id)
                        if current is None or current.state == "stopped":
                            await self._engine.detach_workspace(user)
        await self._unmount_leftover_disks()

    async def _unmount_leftover_disks(self) -> None:
        """Unmounts the filesystems of users with no sandbox: left by a gateway that died between a
        container's removal and its unmount. Re-read under the user's lock, which a start holds
        from the mount to its record, so a start in progress is never undone."""
        for user in await self._engine.attached_workspaces():
            async with db.connection(self._pool) as conn, db.user_lock(conn, user):
                current = await db.get_session(conn, user)
                if current is None or current.state == "stopped":
                    log.info("unmounting the filesystem of %s: no sandbox uses it", user)
                    await self._engine.detach_workspace(user)

    async def agent(self, user: str) -> AgentAddress:
        """Where the agent of the user's running sandbox answers, with its secret, for runs, processes,
        terminals and ports; counts as activity."""
        session = await self._running_session(user)
        if self.is_paused(user):
            # Its agent is frozen with it: a connection would wait for its whole timeout.
            raise SandboxPaused()
        if session.container_id is None or session.agent_port is None or session.agent_secret is None:
            # Started by a gateway from before the agent: its container has none.
            raise SandboxNotRunning("your sandbox was started before this gateway's agent; restart it")
        return self._engine.agent_address(session.container_id, session.agent_port, session.agent_secret)

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
        if session.container_id and session.agent_port is not None and session.agent_secret is not None:
            agent = self._engine.agent_address(session.container_id, session.agent_port, session.agent_secret)
        target = PreviewTarget(session.host_port, agent)
        self._ports[user] = (target, now)
        return target

    @property
    def activity_interval_s(self) -> float:
        return self._settings.activity_interval_s

    async def record_activity(self, user: str) -> None:
        async with db.connection(self._pool) as conn:
            await db.touch(conn, user)
