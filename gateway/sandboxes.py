"""The lifecycle of a user's sandbox: start, look up, stop. PostgreSQL rows and Docker agree here."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiodocker
import asyncpg

from . import containers, db
from .db import Session
from .errors import SandboxNotFound, SandboxNotRunning
from .runtime import Engine, SandboxHost
from .settings import Settings

log = logging.getLogger(__name__)

PORT_CACHE_S = 1.0


@dataclass(frozen=True)
class StartResult:
    session: Session
    created: bool


class Sandboxes:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, docker: aiodocker.Docker) -> None:
        self._settings = settings
        self._pool = pool
        self._docker = docker
        self._host = SandboxHost(settings, docker)
        # Only spares a request to the engine: a lost network makes creation fail, and the flag drop.
        self._network_ready = False
        # user -> (published port, when looked up): spares the preview proxy a query per request.
        # A second is as stale as it gets, and a stale port only fails to connect.
        self._ports: dict[str, tuple[int, float]] = {}

    async def start(self, user: str) -> StartResult:
        """Starts the user's sandbox, or returns the one that already runs.

        The user's advisory lock makes concurrent starts for one user take turns: the second finds
        the first one's container running. The capacity check happens in PostgreSQL so that it
        holds across gateway processes.
        """
        async with db.connection(self._pool) as conn, db.user_lock(conn, user):
            session = await db.get_session(conn, user)
            if session and session.state == "running" and session.container_id:
                if await containers.death_reason(self._docker, session.container_id) is None:
                    return StartResult(session, created=False)
                log.info("sandbox of %s is recorded as running but its container is not; restarting", user)
                await containers.remove_container(self._docker, session.container_id)
            # Before the slot: a host that cannot take the sandbox refuses without touching the row.
            placement = await self._host.placement()
            await db.reserve_slot(conn, user, self._settings.max_sandboxes)
            try:
                if not self._network_ready:
                    async with db.advisory_lock(conn, db.NETWORK_LOCK):
                        await containers.ensure_network(self._docker, self._settings)
                    self._network_ready = True
                started = await containers.create_and_start(self._docker, self._settings, user, placement)
            except BaseException:
                self._network_ready = False
                await db.mark_stopped(conn, user, "start_failed")
                raise
            session = await db.mark_running(conn, user, started.id, started.host_port)
            log.info("started sandbox of %s (container %.12s)", user, started.id)
            return StartResult(session, created=True)

    async def check_host(self) -> Engine:
        """Whether the host has what sandboxes need (the runtime, lxcfs if required); raises if not."""
        return await self._host.check()

    async def get(self, user: str) -> Session:
        """The user's session; a container that died from outside (OOM, docker kill) is recorded as
        stopped, with why, the moment anyone looks."""
        async with db.connection(self._pool) as conn:
            session = await db.get_session(conn, user)
        if session is None:
            raise SandboxNotFound("you have no sandbox; start one with POST /api/sandbox")
        if session.state == "running" and session.container_id:
            death = await containers.death_reason(self._docker, session.container_id)
            if death is not None:
                await self._record_death(user, session.container_id, death)
                return await self.get(user)
        return session

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
            purged = purge and await containers.remove_workspace(self._docker, self._settings, user)
            if not running and not purged:
                raise SandboxNotFound("you have no running sandbox" + (" and no workspace" if purge else ""))

    async def stop_if_idle(self, user: str, idle_timeout_s: float) -> bool:
        """Stops the sandbox if it is still idle once we hold its lock; never waits for the lock, so
        that reapers on several gateways skip what another is already handling."""
        async with db.connection(self._pool) as conn:
            if not await db.try_advisory_lock(conn, db.USER_LOCK_PREFIX + user):
                return False
            try:
                session = await db.get_session(conn, user)
                idle_since = datetime.now(UTC) - timedelta(seconds=idle_timeout_s)
                if session is None or session.state != "running" or session.last_activity > idle_since:
                    return False
                await self._stop_locked(conn, user, session, "idle")
                return True
            finally:
                await db.advisory_unlock(conn, db.USER_LOCK_PREFIX + user)

    async def _stop_locked(self, conn: db.Connection, user: str, session: Session, reason: str) -> None:
        await db.mark_stopping(conn, user, reason)
        # A start that died half-way left no id, only the container's deterministic name.
        target = session.container_id or containers.container_name(self._settings, user)
        await containers.remove_container(self._docker, target)
        await db.mark_stopped(conn, user, reason)
        self._ports.pop(user, None)
        log.info("stopped sandbox of %s (%s)", user, reason)

    async def reconcile(self) -> None:
        """Makes PostgreSQL and Docker agree after a restart: a running labelled container with a
        session is adopted as it is; one without is removed; a session whose container is gone is
        marked stopped. Nothing depends on the memory of an earlier process.

        The sessions are read before the containers are listed: another gateway may start a sandbox
        in between, and a session read after the listing would name a container the listing missed,
        which would then pass for gone. Read first, anything started since is simply not looked at,
        and whatever changed since is re-read under the user's lock."""
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

    async def running_container(self, user: str) -> str:
        """The id of the user's running container, for exec and friends; counts as activity."""
        async with db.connection(self._pool) as conn:
            session = await db.get_session(conn, user)
            if session is None or session.state != "running" or not session.container_id:
                raise SandboxNotRunning()
            if datetime.now(UTC) - session.last_activity > timedelta(
                seconds=self._settings.activity_interval_s
            ):
                await db.touch(conn, user)
        return session.container_id

    def cached_preview_port(self, user: str) -> int | None:
        """preview_port if it is known without asking the database."""
        cached = self._ports.get(user)
        if cached and time.monotonic() - cached[1] < PORT_CACHE_S:
            return cached[0]
        return None

    async def preview_port(self, user: str) -> int:
        """The host port on 127.0.0.1 where the user's container publishes 5173."""
        cached = self.cached_preview_port(user)
        if cached is not None:
            return cached
        now = time.monotonic()
        async with db.connection(self._pool) as conn:
            session = await db.get_session(conn, user)
        if session is None or session.state != "running" or session.host_port is None:
            self._ports.pop(user, None)
            raise SandboxNotRunning()
        self._ports[user] = (session.host_port, now)
        return session.host_port

    @property
    def activity_interval_s(self) -> float:
        return self._settings.activity_interval_s

    async def record_activity(self, user: str) -> None:
        async with db.connection(self._pool) as conn:
            await db.touch(conn, user)
