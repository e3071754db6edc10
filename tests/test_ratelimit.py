"""Per-user rate limits on start and exec: 429 with Retry-After, shared by every gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway import db, ratelimit
from gateway.errors import TooManyRequests
from gateway.settings import RateLimit

from .helpers import MakeClient, auth

pytestmark = [pytest.mark.postgres]

NODE_HELLO = {"language": "node", "code": "console.log(1)"}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database_url)
    await db.apply_migrations(pool)
    yield pool
    await db.close_pool(pool)


async def test_a_burst_of_per_minute_then_refused_with_the_wait(pool: asyncpg.Pool) -> None:
    limit = RateLimit(per_minute=3)
    for _ in range(3):
        await ratelimit.take(pool, "alice", "exec", limit)
    with pytest.raises(TooManyRequests) as refused:
        await ratelimit.take(pool, "alice", "exec", limit)
    # One slot frees every 20 s; the first of the burst used it just now.
    assert 15 <= refused.value.retry_after_s <= 20
    assert refused.value.headers == {"Retry-After": str(refused.value.retry_after_s)}
    # Other users and other actions have buckets of their own.
    await ratelimit.take(pool, "bob", "exec", limit)
    await ratelimit.take(pool, "alice", "start", limit)


async def test_refused_attempts_do_not_push_the_wait_further(pool: asyncpg.Pool) -> None:
    limit = RateLimit(per_minute=60)
    for _ in range(60):
        await ratelimit.take(pool, "alice", "exec", limit)
    waits = []
    for _ in range(20):
        with pytest.raises(TooManyRequests) as refused:
            await ratelimit.take(pool, "alice", "exec", limit)
        waits.append(refused.value.retry_after_s)
    assert max(waits) == 1


async def test_the_bucket_refills_at_the_configured_rate(pool: asyncpg.Pool) -> None:
    """60 a minute: a burst of 60, then one slot a second. Time is moved in the database (the bucket's
    clock), not waited for, so a slow machine cannot change what the test sees."""
    limit = RateLimit(per_minute=60)
    for _ in range(60):
        await ratelimit.take(pool, "alice", "exec", limit)
    with pytest.raises(TooManyRequests):
        await ratelimit.take(pool, "alice", "exec", limit)
    async with pool.acquire() as conn:
        # As if 3.5 s had passed: three slots, half a second short of a fourth.
        await conn.execute("UPDATE rate_limits SET tat = tat - interval '3.5 seconds'")
    for _ in range(3):
        await ratelimit.take(pool, "alice", "exec", limit)
    with pytest.raises(TooManyRequests) as refused:
        await ratelimit.take(pool, "alice", "exec", limit)
    assert refused.value.retry_after_s == 1


async def test_zero_means_no_limit(pool: asyncpg.Pool) -> None:
    for _ in range(50):
        await ratelimit.take(pool, "alice", "exec", RateLimit(per_minute=0))


@pytest.mark.docker
async def test_exec_over_the_limit_is_429_with_retry_after_on_every_gateway(make_client: MakeClient) -> None:
    limit = RateLimit(per_minute=3)
    first = await make_client(exec_rate=limit)
    second = await make_client(exec_rate=limit)
    assert (await first.post("/api/sandbox", headers=auth("alice"))).status == 201
    for client in (first, second, first):
        response = await client.post("/api/sandbox/exec", json=NODE_HELLO, headers=auth("alice"))
        assert response.status == 200
    for client in (first, second):
        refused = await client.post("/api/sandbox/exec", json=NODE_HELLO, headers=auth("alice"))
        assert refused.status == 429
        assert int(refused.headers["Retry-After"]) >= 1
        error = (await refused.json())["error"]
        assert error["code"] == "too_many_requests"
        assert "3 a minute" in error["message"]
    # Bob is not slowed down by Alice.
    assert (await first.post("/api/sandbox", headers=auth("bob"))).status == 201
    assert (await second.post("/api/sandbox/exec", json=NODE_HELLO, headers=auth("bob"))).status == 200


@pytest.mark.docker
async def test_start_over_the_limit_is_429(make_client: MakeClient) -> None:
    client: TestClient = await make_client(start_rate=RateLimit(per_minute=2))
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 200
    refused = await client.post("/api/sandbox", headers=auth("alice"))
    assert refused.status == 429
    assert refused.headers["Retry-After"].isdigit()
