"""Persistence, idle reaping and reconciliation on real Docker and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from gateway.containers import LABEL_GATEWAY, LABEL_USER, container_config, workspace_volume
from gateway.disks import disk_paths
from gateway.keys import ACTIVITY, DB, SANDBOXES
from gateway.reaper import reap_once
from gateway.settings import DiskSettings, Settings

from .conftest import PostgresCluster
from .helpers import MakeClient, auth, docker_shell_ok, poll, running_container_id

pytestmark = [pytest.mark.docker, pytest.mark.postgres]


async def bash(client: TestClient, code: str, user: str = "alice") -> dict[str, Any]:
    response = await client.post(
        "/api/sandbox/exec", headers=auth(user), json={"language": "bash", "code": code}
    )
    assert response.status == 200, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def state_of(client: TestClient, user: str = "alice") -> tuple[str, str | None]:
    body = await (await client.get("/api/sandbox", headers=auth(user))).json()
    return body["state"], body["stop_reason"]


async def run_memory_hog(client: TestClient) -> dict[str, Any]:
    """Runs, in alice's sandbox, a program that allocates until the memory limit stops it."""
    hog = "const keep = []; for (;;) keep.push(Buffer.alloc(16 * 1024 * 1024, 1));"
    response = await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "node", "code": hog, "timeout_ms": 30_000},
    )
    result: dict[str, Any] = await response.json()
    return result


async def make_idle(client: TestClient, *users: str) -> None:
    async with client.app[DB].acquire() as conn:
        await conn.execute(
            "UPDATE sessions SET last_activity = now() - interval '1 hour' WHERE user_id = ANY($1)",
            list(users),
        )


@pytest.mark.runtimes
async def test_workspace_survives_stop_and_start(client: TestClient) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    await bash(client, "echo kept > /workspace/note.txt")
    assert (await client.delete("/api/sandbox", headers=auth("alice"))).status == 204
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    assert (await bash(client, "cat /workspace/note.txt"))["stdout"] == "kept\n"


async def test_purge_deletes_the_workspace(
    client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    await bash(client, "echo gone > /workspace/note.txt")
    assert (await client.delete("/api/sandbox?purge=maybe", headers=auth("alice"))).status == 400
    assert (await client.delete("/api/sandbox?purge=true", headers=auth("alice"))).status == 204
    with pytest.raises(aiodocker.DockerError):
        await docker.volumes.get(workspace_volume(settings, "alice"))
    assert not await asyncio.to_thread(disk_paths(settings, "alice").image.exists)
    # Purging what is already gone is 404.
    assert (await client.delete("/api/sandbox?purge=true", headers=auth("alice"))).status == 404
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    assert (await bash(client, "ls -A /workspace | wc -l"))["stdout"] == "0\n"


async def test_idle_sandbox_is_reaped_and_comes_back_with_its_workspace(make_client: MakeClient) -> None:
    client = await make_client(idle_timeout_s=60, reaper_interval_s=0.2)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    assert (await client.post("/api/sandbox", headers=auth("bob"))).status == 201
    await bash(client, "echo survived > /workspace/note.txt")
    writes = client.app[ACTIVITY].writes
    ws = await client.ws_connect(
        "/api/sandbox/terminal", headers=auth("alice"), protocols=["sandbox-terminal.v1"]
    )

    # Terminal output is activity: the prompt's is recorded first, then the terminal falls silent.
    async def prompt_recorded() -> bool:
        return client.app[ACTIVITY].writes > writes

    await poll(prompt_recorded)
    await make_idle(client, "alice")

    async def reaped() -> bool:
        return await state_of(client) == ("stopped", "idle")

    await poll(reaped)
    # Its terminal is closed with the reason; the busy neighbour is left alone.
    message = await ws.receive()
    while message.type == WSMsgType.BINARY:
        message = await ws.receive()
    assert ws.close_code == 4000
    assert "idle" in message.extra
    assert await state_of(client, "bob") == ("running", None)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    assert (await bash(client, "cat /workspace/note.txt"))["stdout"] == "survived\n"


async def test_two_reapers_never_stop_the_same_sandbox_twice(make_client: MakeClient) -> None:
    one, two = await make_client(), await make_client()
    users = [f"idle{i}" for i in range(4)]
    for user in users:
        assert (await one.post("/api/sandbox", headers=auth(user))).status == 201
    await make_idle(one, *users)
    first, second = await asyncio.gather(
        reap_once(one.app[SANDBOXES], one.app[DB], 60), reap_once(two.app[SANDBOXES], two.app[DB], 60)
    )
    assert sorted(first + second) == users
    assert not set(first) & set(second)
    for user in users:
        assert await state_of(one, user) == ("stopped", "idle")


async def test_a_second_gateway_adopts_running_sandboxes(
    make_client: MakeClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    first = await make_client()
    assert (await first.post("/api/sandbox", headers=auth("alice"))).status == 201
    container_id = await running_container_id(first, "alice")
    await first.close()  # the old gateway goes away; its sandboxes stay
    second = await make_client()
    assert await running_container_id(second, "alice") == container_id
    assert (await bash(second, "echo adopted"))["stdout"] == "adopted\n"
    info = await docker.containers.container(container_id).show()
    assert info["State"]["Running"]


async def test_reconciliation_at_start(
    make_client: MakeClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    first = await make_client()
    for user in ("alice", "bob"):
        assert (await first.post("/api/sandbox", headers=auth(user))).status == 201
    bob_container = await running_container_id(first, "bob")
    # Gone first: a running gateway would hear of bob's death from Docker's events and record it.
    await first.close()
    # bob's container vanishes while no gateway runs, and a labelled stranger appears.
    await docker.containers.container(bob_container).delete(force=True)
    # On a volume: mallory has no mounted filesystem (disks.py) to bind.
    stranger = await docker.containers.create(
        container_config(replace(settings, disk=DiskSettings(size_mb=0)), "mallory"),
        name=f"{settings.gateway_name}-mallory",
    )
    await stranger.start()

    second = await make_client()
    assert await state_of(second, "alice") == ("running", None)
    assert await state_of(second, "bob") == ("stopped", "container_gone")
    label = json.dumps({"label": [f"{LABEL_GATEWAY}={settings.gateway_name}", f"{LABEL_USER}=mallory"]})
    assert await docker.containers.list(all="1", filters=label) == []


async def test_container_killed_from_outside_shows_why_and_recovers(
    client: TestClient, docker: aiodocker.Docker
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    await bash(client, "echo still-here > /workspace/note.txt")
    await docker.containers.container(await running_container_id(client, "alice")).kill(signal="SIGKILL")

    async def shows_exited() -> bool:
        return await state_of(client) == ("stopped", "exited_137")

    await poll(shows_exited)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    assert (await bash(client, "cat /workspace/note.txt"))["stdout"] == "still-here\n"


async def test_memory_limit_kills_a_hog_with_137(client: TestClient) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    result = await run_memory_hog(client)
    assert result["timed_out"] is False
    assert result["exit_code"] == 137
    # The sandbox itself lives on.
    assert (await bash(client, "echo alive"))["stdout"] == "alive\n"


async def test_postgres_restart_is_survived_without_a_gateway_restart(
    client: TestClient, postgres_cluster: PostgresCluster
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    await asyncio.to_thread(postgres_cluster.stop)
    try:
        down = await client.get("/api/sandbox", headers=auth("alice"))
        assert down.status == 503
        assert (await down.json())["error"]["code"] == "database_unavailable"
        health = await client.get("/healthz")
        assert (await health.json())["database"] is False
    finally:
        await asyncio.to_thread(postgres_cluster.start)

    async def recovered() -> bool:
        return (await client.get("/api/sandbox", headers=auth("alice"))).status == 200

    await poll(recovered)
    # No session lost or duplicated: the same sandbox, still running, still usable.
    assert await state_of(client) == ("running", None)
    assert (await bash(client, "echo back"))["stdout"] == "back\n"
    async with client.app[DB].acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sessions") == 1


class DockerSocketSwitch:
    """A unix socket in front of the real Docker socket that a test can take down and bring back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_unix_server(self._forward, path=self.path)

    async def down(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Connections the client keeps alive go down with the engine, as with a real outage.
        for writer in list(self._open):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _forward(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        engine_reader, engine_writer = await asyncio.open_unix_connection("/var/run/docker.sock")
        self._open.update((client_writer, engine_writer))

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()
            self._open.discard(writer)

        await asyncio.gather(pipe(client_reader, engine_writer), pipe(engine_reader, client_writer))


@pytest.fixture
async def switch(tmp_path: Path) -> AsyncIterator[DockerSocketSwitch]:
    switch = DockerSocketSwitch(str(tmp_path / "docker.sock"))
    await switch.up()
    try:
        yield switch
    finally:
        await switch.down()


# `switch` before `make_client`: the gateway goes away before its engine's socket does.
async def test_docker_outage_is_503_and_recovers_by_itself(
    switch: DockerSocketSwitch, make_client: MakeClient
) -> None:
    client = await make_client(docker_host=f"unix://{switch.path}")
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201, client.port
    await switch.down()
    try:
        refused = await client.post("/api/sandbox", headers=auth("bob"))
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "docker_unavailable"
        # What does not need the engine still works: runs go to the sandbox's agent.
        run = await client.post(
            "/api/sandbox/exec", headers=auth("alice"), json={"language": "bash", "code": "true"}
        )
        assert run.status == 200
        assert (await client.get("/api/openapi.json")).status == 200
    finally:
        await switch.up()

    async def recovered() -> bool:
        return (await client.post("/api/sandbox", headers=auth("bob"))).status == 201

    await poll(recovered)
    assert (await bash(client, "echo engine-back"))["stdout"] == "engine-back\n"


async def test_shutdown_lets_in_flight_runs_finish_and_leaves_sandboxes_running(
    client: TestClient, docker: aiodocker.Docker
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    container_id = await running_container_id(client, "alice")
    run = asyncio.ensure_future(
        client.post(
            "/api/sandbox/exec",
            headers=auth("alice"),
            json={"language": "bash", "code": "sleep 1.5; echo finished"},
        )
    )
    # Shut down once the run is under way: the server stops taking requests but lets it finish.
    await poll(lambda: docker_shell_ok(docker, container_id, ["pgrep", "-f", "sleep 1.5"]))
    await client.server.close()
    response = await run
    assert response.status == 200
    assert (await response.json())["stdout"] == "finished\n"
    assert (await docker.containers.container(container_id).show())["State"]["Running"]


async def test_sandbox_that_ran_out_of_memory_says_so(client: TestClient, docker: aiodocker.Docker) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    assert (await run_memory_hog(client))["exit_code"] == 137
    # The container then dies (here: killed from outside); Docker remembers the OOM, and so do we.
    await docker.containers.container(await running_container_id(client, "alice")).kill(signal="SIGKILL")

    async def shows_oom() -> bool:
        return await state_of(client) == ("stopped", "oom_killed")

    await poll(shows_oom)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
