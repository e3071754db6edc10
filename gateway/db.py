"""PostgreSQL: the pool, schema migrations, and every query on sessions.

The sessions table is the record of which sandboxes exist; Docker labels are the other half of the
truth. Memory never decides.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .errors import CapacityExhausted, DatabaseUnavailable

log = logging.getLogger(__name__)

ACQUIRE_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 10.0
# Keys of the advisory locks this app takes; the user lock adds the user name to its key.
MIGRATION_LOCK = "sandbox-gateway:migrations"
CAPACITY_LOCK = "sandbox-gateway:capacity"
USER_LOCK_PREFIX = "sandbox-gateway:user:"
# Docker's own duplicate check on network names is best-effort; concurrent creations take turns here.
NETWORK_LOCK = "sandbox-gateway:network"

# What asyncpg raises when the server is down, restarting or unreachable.
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
)


# What a query function accepts: a bare connection or one lent by the pool.
Connection = asyncpg.Connection | PoolConnectionProxy


# The states of a session row, as the sessions table's CHECK constraint lists them.
SESSION_STATES = ("starting", "running", "stopping", "stopped")


@dataclass(frozen=True)
class Session:
    user: str
    state: str
    container_id: str | None
    host_port: int | None
    agent_port: int | None
    # Never in a repr: sessions are logged.
    agent_secret: str | None = field(repr=False)
    created_at: datetime
    last_activity: datetime
    stopped_at: datetime | None
    stop_reason: str | None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Session:
        return cls(
            user=record["user_id"],
            state=record["state"],
            container_id=record["container_id"],
            host_port=record["host_port"],
            agent_port=record["agent_port"],
            agent_secret=record["agent_secret"],
            created_at=record["created_at"],
            last_activity=record["last_activity"],
            stopped_at=record["stopped_at"],
            stop_reason=record["stop_reason"],
        )


async def create_pool(dsn: str) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=20, command_timeout=30)
    except CONNECTION_ERRORS as err:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {err}") from err
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
    except TimeoutError:
        log.warning("PostgreSQL pool did not close within %.0f s; terminating it", CLOSE_TIMEOUT_S)
        pool.terminate()


@asynccontextmanager
async def connection(pool: asyncpg.Pool) -> AsyncIterator[Connection]:
    """A pooled connection; losing PostgreSQL inside the block becomes DatabaseUnavailable.

    Callers translate their own foreign errors before they leave the block, so an OSError here
    is always the database's.
    """
    try:
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            yield conn
    except CONNECTION_ERRORS as err:
        raise DatabaseUnavailable("PostgreSQL does not answer; try again shortly") from err


async def apply_migrations(pool: asyncpg.Pool) -> None:
    """Applies the numbered SQL files in gateway/migrations that the database has not seen.

    The advisory lock makes concurrent gateway starts take turns instead of racing.
    """
    scripts = await asyncio.to_thread(_read_migrations)
    async with connection(pool) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in scripts:
            if version in applied:
                continue
            log.info("applying migration %03d %s", version, name)
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)


def _read_migrations() -> list[tuple[int, str, str]]:
    scripts = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            scripts.append((int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(scripts)


@asynccontextmanager
async def advisory_lock(conn: Connection, key: str) -> AsyncIterator[None]:
    """Holds a named lock across every gateway on this database.

    Session-level rather than in a transaction, so that the Docker work it guards does not keep a
    transaction open; PostgreSQL drops it if the connection dies.
    """
    await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", key)
    try:
        yield
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)


async def try_advisory_lock(conn: Connection, key: str) -> bool:
    locked: bool = await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", key)
    return locked


async def advisory_unlock(conn: Connection, key: str) -> None:
    await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)


def user_lock(conn: Connection, user: str) -> AbstractAsyncContextManager[None]:
    """One start or stop per user at a time."""
    return advisory_lock(conn, USER_LOCK_PREFIX + user)


@asynccontextmanager
async def user_lock_if_free(conn: Connection, user: str) -> AsyncIterator[bool]:
    """The user's lock if nobody holds it, without waiting; yields whether it was taken. For the work
    of reapers: several gateways skip what another is handling, and a start or stop in progress (whose
    gateway holds the lock) is never mistaken for one that died."""
    key = USER_LOCK_PREFIX + user
    locked = await try_advisory_lock(conn, key)
    try:
        yield locked
    finally:
        if locked:
            await advisory_unlock(conn, key)


async def get_session(conn: Connection, user: str) -> Session | None:
    record = await conn.fetchrow("SELECT * FROM sessions WHERE user_id = $1", user)
    return Session.from_record(record) if record else None


async def active_sessions(conn: Connection) -> list[Session]:
    records = await conn.fetch("SELECT * FROM sessions WHERE state IN ('starting', 'running', 'stopping')")
    return [Session.from_record(r) for r in records]


async def list_sessions(conn: Connection, *, state: str | None, after: str, limit: int) -> list[Session]:
    """Sessions in user order after `after` (keyset pagination), optionally in one state."""
    records = await conn.fetch(
        """
        SELECT * FROM sessions WHERE user_id > $1 AND ($2::text IS NULL OR state = $2)
        ORDER BY user_id LIMIT $3
        """,
        after,
        state,
        limit,
    )
    return [Session.from_record(r) for r in records]


async def unfinished_users(conn: Connection) -> list[str]:
    """Users whose session is half-way through a start or a stop, in progress or abandoned."""
    records = await conn.fetch("SELECT user_id FROM sessions WHERE state IN ('starting', 'stopping')")
    return [r["user_id"] for r in records]


async def count_by_state(conn: Connection) -> dict[str, int]:
    records = await conn.fetch("SELECT state, count(*) AS n FROM sessions GROUP BY state")
    return {r["state"]: r["n"] for r in records}


async def idle_users(conn: Connection, idle_timeout_s: float) -> list[str]:
    """Users whose running sandbox has seen no activity for idle_timeout_s, oldest first."""
    records = await conn.fetch(
        """
        SELECT user_id FROM sessions
        WHERE state = 'running' AND last_activity < now() - make_interval(secs => $1)
        ORDER BY last_activity
        """,
        float(idle_timeout_s),
    )
    return [r["user_id"] for r in records]


async def reserve_slot(
    conn: Connection, user: str, max_sandboxes: int, agent_secret: str | None = None
) -> None:
    """Marks the user's session as starting if the global cap allows one more active sandbox.

    The capacity lock serialises only this count-and-insert, a few milliseconds, not the start itself.
    A start counts only while its gateway holds the user's lock: one whose gateway died, or lost its
    connection in a PostgreSQL restart, left its row in `starting` and no lock behind, and must not
    hold a slot until a reaper resolves it (Sandboxes.resolve_unfinished).
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", CAPACITY_LOCK)
        active = await conn.fetchval(
            """
            SELECT count(*) FROM sessions s
            WHERE s.user_id <> $1 AND (s.state = 'running' OR (s.state = 'starting' AND EXISTS (
                -- pg_advisory_lock(bigint) keeps the key's high and low 32 bits in classid and objid.
                SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                  AND ((l.classid::bigint << 32) | l.objid::bigint)
                      = hashtextextended($2 || s.user_id, 0))))
            """,
            user,
            USER_LOCK_PREFIX,
        )
        if active >= max_sandboxes:
            raise CapacityExhausted(
                f"all {max_sandboxes} sandboxes of this gateway are in use; try again later"
            )
        await conn.execute(
            """
            INSERT INTO sessions (user_id, state, agent_secret) VALUES ($1, 'starting', $2)
            ON CONFLICT (user_id) DO UPDATE SET
                state = 'starting', container_id = NULL, host_port = NULL, created_at = now(),
                last_activity = now(), stopped_at = NULL, stop_reason = NULL,
                agent_port = NULL, agent_secret = $2
            """,
            user,
            agent_secret,
        )


async def mark_running(
    conn: Connection, user: str, container_id: str, host_port: int, agent_port: int, agent_secret: str | None
) -> Session:
    record = await conn.fetchrow(
        """
        UPDATE sessions SET state = 'running', container_id = $2, host_port = $3, agent_port = $4,
            agent_secret = COALESCE($5, agent_secret), last_activity = now()
        WHERE user_id = $1 RETURNING *
        """,
        user,
        container_id,
        host_port,
        agent_port,
        agent_secret,
    )
    assert record is not None, "the caller holds the user's lock, so the row it reserved is there"
    return Session.from_record(record)


async def mark_stopping(conn: Connection, user: str, reason: str) -> None:
    await conn.execute(
        "UPDATE sessions SET state = 'stopping', stop_reason = $2 WHERE user_id = $1", user, reason
    )


async def mark_stopped(conn: Connection, user: str, reason: str) -> None:
    await conn.execute(
        """
        UPDATE sessions SET state = 'stopped', container_id = NULL, host_port = NULL,
            agent_port = NULL, agent_secret = NULL, stopped_at = now(), stop_reason = $2
        WHERE user_id = $1
        """,
        user,
        reason,
    )


async def touch(conn: Connection, user: str) -> None:
    await conn.execute(
        "UPDATE sessions SET last_activity = now() WHERE user_id = $1 AND state = 'running'", user
    )


async def take_rate_slot(
    conn: Connection, user: str, action: str, interval_s: float, window_s: float
) -> float | None:
    """One GCRA step (gateway/ratelimit.py): None if the action is allowed, else seconds to wait."""
    allowed = await conn.fetchval(
        """
        INSERT INTO rate_limits AS r (user_id, action, tat)
        VALUES ($1, $2, now() + make_interval(secs => $3))
        ON CONFLICT (user_id, action) DO UPDATE
            SET tat = greatest(r.tat, now()) + make_interval(secs => $3)
            WHERE greatest(r.tat, now()) + make_interval(secs => $3) <= now() + make_interval(secs => $4)
        RETURNING true
        """,
        user,
        action,
        interval_s,
        window_s,
    )
    if allowed:
        return None
    wait: float = await conn.fetchval(
        """
        SELECT extract(epoch FROM greatest(tat, now()) + make_interval(secs => $3)
                                  - now() - make_interval(secs => $4))::float8
        FROM rate_limits WHERE user_id = $1 AND action = $2
        """,
        user,
        action,
        interval_s,
        window_s,
    )
    return max(wait or 0.0, 0.0)


async def forget_rate_limits(conn: Connection) -> int:
    """Deletes the rows of buckets that are full again anyway; how many."""
    status: str = await conn.execute("DELETE FROM rate_limits WHERE tat < now() - interval '1 hour'")
    return int(status.split()[-1])


async def ping(conn: Connection) -> None:
    await conn.fetchval("SELECT 1")


async def gateway_secret(conn: Connection, name: str) -> bytes:
    """The named secret, created with 32 random bytes by whichever gateway asks first."""
    await conn.execute(
        "INSERT INTO gateway_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        name,
        secrets.token_bytes(32),
    )
    value: bytes = await conn.fetchval("SELECT value FROM gateway_secrets WHERE name = $1", name)
    return value


async def preview_label(conn: Connection, user: str, candidate: str) -> str:
    """The user's preview label, made from `candidate` by whichever gateway asks first."""
    await conn.execute(
        "INSERT INTO preview_labels (user_id, label) VALUES ($1, $2) ON CONFLICT DO NOTHING", user, candidate
    )
    label: str | None = await conn.fetchval("SELECT label FROM preview_labels WHERE user_id = $1", user)
    if label is None:
        # The candidate collided with another user's label (2^-80): the caller draws again.
        raise LabelTaken(candidate)
    return label


class LabelTaken(Exception):
    """A freshly drawn preview label already belongs to another user."""


async def label_owner(conn: Connection, label: str) -> str | None:
    owner: str | None = await conn.fetchval("SELECT user_id FROM preview_labels WHERE label = $1", label)
    return owner


@dataclass(frozen=True)
class Share:
    id: str
    user: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    can_wake: bool

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Share:
        return cls(
            id=record["id"],
            user=record["user_id"],
            created_at=record["created_at"],
            expires_at=record["expires_at"],
            revoked_at=record["revoked_at"],
            can_wake=record["can_wake"],
        )


async def create_share(
    conn: Connection, share_id: str, user: str, secret_hash: bytes, expires_in_s: int, can_wake: bool
) -> Share:
    record = await conn.fetchrow(
        "INSERT INTO preview_shares (id, user_id, secret_hash, expires_at, can_wake)"
        " VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5)"
        " RETURNING id, user_id, created_at, expires_at, revoked_at, can_wake",
        share_id,
        user,
        secret_hash,
        float(expires_in_s),
        can_wake,
    )
    assert record is not None  # INSERT ... RETURNING returns the row
    return Share.from_record(record)


async def user_shares(conn: Connection, user: str) -> list[Share]:
    """The user's shares that still open the preview, oldest first."""
    records = await conn.fetch(
        "SELECT id, user_id, created_at, expires_at, revoked_at, can_wake FROM preview_shares"
        " WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now() ORDER BY created_at, id",
        user,
    )
    return [Share.from_record(record) for record in records]


async def count_live_shares(conn: Connection, user: str) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM preview_shares"
        " WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now()",
        user,
    )
    return count


async def share_by_id(conn: Connection, share_id: str) -> Share | None:
    record = await conn.fetchrow(
        "SELECT id, user_id, created_at, expires_at, revoked_at, can_wake FROM preview_shares WHERE id = $1",
        share_id,
    )
    return None if record is None else Share.from_record(record)


async def share_by_secret(conn: Connection, secret_hash: bytes) -> Share | None:
    record = await conn.fetchrow(
        "SELECT id, user_id, created_at, expires_at, revoked_at, can_wake FROM preview_shares"
        " WHERE secret_hash = $1",
        secret_hash,
    )
    return None if record is None else Share.from_record(record)


async def revoke_share(conn: Connection, user: str, share_id: str) -> bool:
    """Revokes one of the user's own shares; False if the user has no such live share."""
    status: str = await conn.execute(
        "UPDATE preview_shares SET revoked_at = now()"
        " WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL AND expires_at > now()",
        share_id,
        user,
    )
    return status.endswith(" 1")


async def use_ticket(conn: Connection, ticket_id: str, expires: float) -> bool:
    """Records a login ticket as used; False if it was already."""
    status: str = await conn.execute(
        "INSERT INTO used_preview_tickets (id, expires_at) VALUES ($1, to_timestamp($2))"
        " ON CONFLICT DO NOTHING",
        ticket_id,
        expires,
    )
    return status.endswith(" 1")


async def forget_used_tickets(conn: Connection) -> int:
    status: str = await conn.execute("DELETE FROM used_preview_tickets WHERE expires_at < now()")
    return int(status.split()[-1])


async def forget_ended_shares(conn: Connection) -> int:
    """Deletes shares that ended (revoked or expired) more than a day ago; how many."""
    status: str = await conn.execute(
        "DELETE FROM preview_shares WHERE coalesce(revoked_at, expires_at) < now() - interval '1 day'"
    )
    return int(status.split()[-1])
