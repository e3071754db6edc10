"""Fault drills: PostgreSQL restarted under starts, a gateway killed with -9 mid-run, a container
killed or paused from outside, output floods. Each ends with nothing lost, no slot leaked, and every
user able to carry on."""

from __future__ import annotations

import asyncio
import secrets
import signal
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway import containers, db
from gateway.disks import Disks
from gateway.docker_runtime import attach_disk
from gateway.keys import DB, SANDBOXES
from gateway.settings import Settings

from .conftest import PostgresCluster
from .gateway_processes import StartGateways, call
from .gateway_processes import open_terminal as open_terminal_via
from .helpers import MakeClient, auth, docker_shell_ok, poll, running_container_id
from .test_terminal import open_terminal

pytestmark = [pytest.mark.docker, pytest.mark.postgres]


async def bash(client: TestClient, code: str, user: str = "alice", **body: Any) -> tuple[int, Any]:
    response = await client.post(
        "/api/sandbox/exec", headers=auth(user), json={"language": "bash", "code": code, **body}
    )
    return response.status, await response.json()


async def state_of(client: TestClient, user: str) -> str:
    response = await client.get("/api/sandbox", headers=auth(user))
    assert response.status == 200, await response.text()
    state: str = (await response.json())["state"]
    return state


async def leave_a_dead_start(
    client: TestClient, docker: aiodocker.Docker | None, settings: Settings, user: str
) -> None:
    """What a start leaves when its gateway or its database connection dies half-way: the row in
    `starting`, nobody holding the user's lock, and (given `docker`) a container already running."""
    # As a start does: the agent's secret in the row first, then in the container.
    agent_secret = secrets.token_urlsafe(32)
    async with client.app[DB].acquire() as conn:
        await db.reserve_slot(conn, user, settings.max_sandboxes, agent_secret)
    if docker is not None:
        await containers.ensure_network(docker, settings)
        # As a start does it: the user's filesystem first, then the container.
        await attach_disk(Disks(settings), docker, settings, user)
        await containers.create_and_start(docker, settings, user, agent_secret=agent_secret)


async def test_a_start_that_died_holds_no_slot_and_is_adopted_or_stopped(
    make_client: MakeClient, settings: Settings, docker: aiodocker.Docker
) -> None:
    client = await make_client(max_sandboxes=2)
    await leave_a_dead_start(client, docker, settings, "ghost")
    await leave_a_dead_start(client, None, settings, "phantom")
    # Neither dead start counts: two others start under a cap of two.
    for user in ("alice", "bob"):
        assert (await client.post("/api/sandbox", headers=auth(user))).status == 201

    resolved = await client.app[SANDBOXES].resolve_all_unfinished()
    assert sorted(resolved) == ["ghost (adopted)", "phantom (stopped)"]
    # The adopted one is whole: recorded, running, usable.
    assert await state_of(client, "ghost") == "running"
    assert (await bash(client, "echo back", "ghost"))[1]["stdout"] == "back\n"
    phantom = await (await client.get("/api/sandbox", headers=auth("phantom"))).json()
    assert (phantom["state"], phantom["stop_reason"]) == ("stopped", "start_interrupted")
    # Nothing left half-done, and another pass finds nothing to do.
    assert await client.app[SANDBOXES].resolve_all_unfinished() == []


async def test_a_start_in_progress_is_counted_and_left_alone(
    make_client: MakeClient, settings: Settings
) -> None:
    """A start whose gateway holds the user's lock is genuinely in progress, however long it takes."""
    client = await make_client(max_sandboxes=1)
    async with client.app[DB].acquire() as starter, db.user_lock(starter, "slow"):
        await db.reserve_slot(starter, "slow", settings.max_sandboxes)
        refused = await client.post("/api/sandbox", headers=auth("alice"))
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "capacity_exhausted"
        assert await client.app[SANDBOXES].resolve_all_unfinished() == []
        async with client.app[DB].acquire() as conn:
            assert (await db.get_session(conn, "slow")).state == "starting"  # type: ignore[union-attr]


async def test_a_stop_that_died_is_finished(client: TestClient, docker: aiodocker.Docker) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    container_id = await running_container_id(client, "alice")
    async with client.app[DB].acquire() as conn:
        await db.mark_stopping(conn, "alice", "user")
    assert await client.app[SANDBOXES].resolve_all_unfinished() == ["alice (stopped)"]
    assert await state_of(client, "alice") == "stopped"
    assert await containers.status(docker, container_id) == "container_gone"


@pytest.mark.disruptive
async def test_postgres_restarted_under_starts_leaks_nothing(
    make_client: MakeClient, postgres_cluster: PostgresCluster, docker: aiodocker.Docker, settings: Settings
) -> None:
    client = await make_client(max_sandboxes=4)
    users = [f"u{i}" for i in range(4)]
    starts = [asyncio.ensure_future(client.post("/api/sandbox", headers=auth(user))) for user in users]

    async def some_start_under_way() -> bool:
        async with client.app[DB].acquire() as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM sessions WHERE state = 'starting'"))

    await poll(some_start_under_way, timeout_s=20, interval_s=0.01)
    await asyncio.to_thread(postgres_cluster.stop, "immediate")
    try:
        statuses = [(await start).status for start in starts]
    finally:
        await asyncio.to_thread(postgres_cluster.start)
    assert set(statuses) <= {201, 503}, statuses

    async def database_back() -> bool:
        return (await client.get("/healthz")).status == 200

    await poll(database_back, timeout_s=30)
    # One reaper pass later, every row agrees with Docker, and every user can start and run.
    await client.app[SANDBOXES].resolve_all_unfinished()
    async with client.app[DB].acquire() as conn:
        assert await db.unfinished_users(conn) == []
    found = await containers.labelled(docker, settings)
    async with client.app[DB].acquire() as conn:
        for user in users:
            session = await db.get_session(conn, user)
            recorded = session is not None and session.state == "running"
            assert recorded == (user in found and found[user].running), (user, session, found.get(user))
    for user in users:
        assert (await client.post("/api/sandbox", headers=auth(user))).status in (200, 201)
        assert (await bash(client, "echo ok", user))[1]["stdout"] == "ok\n"
    assert len(await containers.labelled(docker, settings)) == len(users)


@pytest.mark.disruptive
async def test_postgres_restarted_under_a_run_and_an_open_terminal(
    client: TestClient, postgres_cluster: PostgresCluster, docker: aiodocker.Docker
) -> None:
    """A run in flight finishes with its result, and an open terminal carries on, while PostgreSQL
    restarts: neither needs the database once it is going."""
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    screen = await open_terminal(client)
    await screen.type(b"echo BEFORE-$((6*7))\r")
    await screen.expect(b"BEFORE-42")
    container_id = await running_container_id(client, "alice")
    run = asyncio.ensure_future(bash(client, "sleep 2.5; echo finished"))

    async def run_going() -> bool:
        return await docker_shell_ok(docker, container_id, ["pgrep", "-f", "sleep 2.5"])

    await poll(run_going)
    await asyncio.to_thread(postgres_cluster.stop, "immediate")
    try:
        await screen.type(b"echo DURING-$((6*7))\r")
        await screen.expect(b"DURING-42")
        status, result = await run
        assert (status, result["stdout"]) == (200, "finished\n"), result
    finally:
        await asyncio.to_thread(postgres_cluster.start)

    async def database_back() -> bool:
        return (await client.get("/healthz")).status == 200

    await poll(database_back, timeout_s=30)
    await screen.type(b"echo AFTER-$((6*7))\r")
    await screen.expect(b"AFTER-42")
    assert (await bash(client, "echo again"))[1]["stdout"] == "again\n"


async def test_a_run_ends_itself_when_its_gateway_is_killed(
    start_gateways: StartGateways, http: aiohttp.ClientSession, docker: aiodocker.Docker, settings: Settings
) -> None:
    """kill -9 leaves no gateway to end the run at its timeout: the sandbox's agent does."""
    (gateway,) = await start_gateways("a")
    assert (await call(http, gateway, "POST", "/api/sandbox", "alice"))[0] == 201
    container = await docker.containers.get(containers.container_name(settings, "alice"))
    busy = "while :; do :; done # busy-loop-marker"
    body = {"language": "bash", "code": busy, "timeout_ms": 2000}
    request = asyncio.ensure_future(call(http, gateway, "POST", "/api/sandbox/exec", "alice", json=body))

    async def looping() -> bool:
        return await docker_shell_ok(docker, container.id, ["pgrep", "-f", "busy-loop-marker"])

    await poll(looping, timeout_s=10)
    gateway.process.send_signal(signal.SIGKILL)
    await gateway.process.wait()
    with pytest.raises(aiohttp.ClientError):
        await request

    async def ended() -> bool:
        return not await looping()

    # Its timeout (2 s) and the sandbox's grace (5 s), and some slack for the kill itself.
    await poll(ended, timeout_s=12, interval_s=0.2)


async def test_a_terminal_is_hung_up_when_its_gateway_is_killed(
    start_gateways: StartGateways, http: aiohttp.ClientSession, docker: aiodocker.Docker, settings: Settings
) -> None:
    """The shell belongs to the sandbox's agent: a v1 terminal's gateway dying is its socket closing,
    and the agent hangs it up, with no other gateway involved."""
    (a,) = await start_gateways("a")
    assert (await call(http, a, "POST", "/api/sandbox", "alice"))[0] == 201
    container = await docker.containers.get(containers.container_name(settings, "alice"))
    screen = await open_terminal_via(http, a, "alice")
    await screen.type(b"sleep 4242 & echo JOB-$((6*7))\r")
    await screen.expect(b"JOB-42")

    async def job_runs() -> bool:
        return await docker_shell_ok(docker, container.id, ["pgrep", "-f", "sleep 4242"])

    assert await job_runs()
    a.process.send_signal(signal.SIGKILL)
    await a.process.wait()

    async def hung_up() -> bool:
        return not await job_runs()

    await poll(hung_up, timeout_s=15, interval_s=0.2)


async def test_after_docker_kill_the_terminal_says_stopped(
    client: TestClient, docker: aiodocker.Docker
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    screen = await open_terminal(client)
    await screen.type(b"echo READY-$((6*7))\r")
    await screen.expect(b"READY-42")
    await docker.containers.container(await running_container_id(client, "alice")).kill()
    code, reason = await screen.closed()
    assert code == 4000, reason
    assert "stopped" in reason


async def test_after_docker_kill_the_preview_says_stopped(
    client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    """Nobody asks GET first: the preview finds out (from its refused port, or Docker's die event,
    whichever comes first), and the death is recorded with its reason."""
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    await docker.containers.container(await running_container_id(client, "alice")).kill()
    headers = {**auth("alice"), "Host": settings.preview_host}
    response = await client.get("/preview/alice/", headers=headers)
    assert response.status == 409, await response.text()
    assert (await response.json())["error"]["code"] == "sandbox_not_running"

    async def recorded() -> bool:
        stopped = await (await client.get("/api/sandbox", headers=auth("alice"))).json()
        return (stopped["state"], stopped["stop_reason"]) == ("stopped", "exited_137")

    # The recording may be half-way (`stopping`, its container being removed) when we first look.
    await poll(recorded, timeout_s=10)


async def test_a_paused_sandbox_shows_as_paused_and_comes_back(
    client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    container = docker.containers.container(await running_container_id(client, "alice"))
    preview = {**auth("alice"), "Host": settings.preview_host}
    await container.pause()
    try:
        assert await state_of(client, "alice") == "paused"
        status, refused = await bash(client, "echo hi")
        assert (status, refused["error"]["code"]) == (409, "sandbox_paused"), refused
        started = await client.post("/api/sandbox", headers=auth("alice"))
        assert (started.status, (await started.json())["error"]["code"]) == (409, "sandbox_paused")

        # The preview says so at once (Docker's pause event), not at its 30 s response timeout.
        async def preview_says_paused() -> bool:
            async with asyncio.timeout(2):
                response = await client.get("/preview/alice/", headers=preview)
            return response.status == 409 and (await response.json())["error"]["code"] == "sandbox_paused"

        await poll(preview_says_paused, timeout_s=5)
    finally:
        await container.unpause()
    assert await state_of(client, "alice") == "running"
    assert (await bash(client, "echo hi"))[1]["stdout"] == "hi\n"

    async def preview_back() -> bool:
        return (await client.get("/preview/alice/", headers=preview)).status == 502  # no dev server

    await poll(preview_back, timeout_s=5)


async def test_floods_time_out_as_timeouts(client: TestClient) -> None:
    """Four `cat /dev/zero` runs at once: each is a timed-out, truncated result, not a 503."""
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    floods = [bash(client, "cat /dev/zero", timeout_ms=3000) for _ in range(4)]
    results = await asyncio.gather(*floods)
    for status, result in results:
        assert status == 200, result
        assert (result["timed_out"], result["truncated"]) == (True, True)
        assert result["duration_ms"] < 3000 + 2000
    assert (await bash(client, "echo after"))[1]["stdout"] == "after\n"
