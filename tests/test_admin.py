"""Administration: an admin token sees and stops every sandbox; anyone else gets 403."""

from __future__ import annotations

import asyncio

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from gateway.containers import workspace_volume
from gateway.disks import disk_paths
from gateway.settings import Settings

from .helpers import auth, poll, running_container_id

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

ADMIN = auth("root", admin=True)


async def start(client: TestClient, *users: str) -> None:
    for user in users:
        response = await client.post("/api/sandbox", headers=auth(user))
        assert response.status == 201, await response.text()


async def test_admin_lists_every_sandbox_with_state_limits_and_activity(
    client: TestClient, settings: Settings
) -> None:
    await start(client, "alice", "bob")
    assert (await client.delete("/api/sandbox", headers=auth("bob"))).status == 204
    response = await client.get("/api/admin/sandboxes", headers=ADMIN)
    assert response.status == 200
    body = await response.json()
    by_user = {item["user"]: item for item in body["sandboxes"]}
    assert set(by_user) == {"alice", "bob"}
    assert body["next"] is None
    assert by_user["alice"]["state"] == "running"
    assert by_user["alice"]["container_id"]
    assert by_user["alice"]["limits"]["memory_mb"] == settings.limits.memory_mb
    assert by_user["alice"]["last_activity"]
    assert by_user["bob"]["state"] == "stopped"
    assert by_user["bob"]["stop_reason"] == "user"

    running = await (await client.get("/api/admin/sandboxes?state=running", headers=ADMIN)).json()
    assert [item["user"] for item in running["sandboxes"]] == ["alice"]


async def test_admin_pages_through_sandboxes_in_user_order(client: TestClient) -> None:
    await start(client, "carol", "alice", "bob")
    seen: list[str] = []
    after = ""
    while True:
        response = await client.get(f"/api/admin/sandboxes?limit=2&after={after}", headers=ADMIN)
        page = await response.json()
        seen += [item["user"] for item in page["sandboxes"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == ["alice", "bob", "carol"]


async def test_admin_sees_a_dead_container_as_its_owner_does(
    client: TestClient, docker: aiodocker.Docker
) -> None:
    await start(client, "alice", "bob")
    await docker.containers.container(await running_container_id(client, "alice")).kill(signal="SIGKILL")

    async def listed_stopped() -> bool:
        page = await (await client.get("/api/admin/sandboxes", headers=ADMIN)).json()
        states = {item["user"]: (item["state"], item["stop_reason"]) for item in page["sandboxes"]}
        return states == {"alice": ("stopped", "exited_137"), "bob": ("running", None)}

    await poll(listed_stopped)
    one = await (await client.get("/api/admin/sandboxes/alice", headers=ADMIN)).json()
    mine = await (await client.get("/api/sandbox", headers=auth("alice"))).json()
    assert (
        (one["state"], one["stop_reason"])
        == (mine["state"], mine["stop_reason"])
        == ("stopped", "exited_137")
    )
    running = await (await client.get("/api/admin/sandboxes?state=running", headers=ADMIN)).json()
    assert [item["user"] for item in running["sandboxes"]] == ["bob"]


async def test_admin_stops_and_purges_anyones_sandbox(
    client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    await start(client, "alice")
    stop = await client.delete("/api/admin/sandboxes/alice?purge=true", headers=ADMIN)
    assert stop.status == 204
    mine = await (await client.get("/api/sandbox", headers=auth("alice"))).json()
    assert (mine["state"], mine["stop_reason"]) == ("stopped", "admin")
    with pytest.raises(aiodocker.DockerError):
        await docker.volumes.get(workspace_volume(settings, "alice"))
    assert not await asyncio.to_thread(disk_paths(settings, "alice").image.exists)
    again = await client.delete("/api/admin/sandboxes/alice", headers=ADMIN)
    assert again.status == 404
    assert "alice has no running sandbox" in (await again.json())["error"]["message"]
    one = await client.get("/api/admin/sandboxes/alice", headers=ADMIN)
    assert (await one.json())["state"] == "stopped"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/admin/sandboxes"),
        ("GET", "/api/admin/sandboxes/alice"),
        ("DELETE", "/api/admin/sandboxes/alice"),
    ],
)
async def test_admin_routes_refuse_everyone_else(client: TestClient, method: str, path: str) -> None:
    await start(client, "alice")
    for headers, status in [(auth("alice"), 403), (auth("mallory"), 403), ({}, 401)]:
        response = await client.request(method, path, headers=headers)
        assert response.status == status
        assert (await response.json())["error"]["code"] in ("forbidden", "unauthorized")
    # The refused DELETE did nothing.
    assert (await (await client.get("/api/sandbox", headers=auth("alice"))).json())["state"] == "running"


@pytest.mark.parametrize(
    "path",
    [
        "/api/admin/sandboxes?state=asleep",
        "/api/admin/sandboxes?limit=0",
        "/api/admin/sandboxes?limit=abc",
        "/api/admin/sandboxes?limit=100000",
        "/api/admin/sandboxes?after=%00",
        "/api/admin/sandboxes?after=..%2Fbob",
        "/api/admin/sandboxes/..%2Fbob",
        "/api/admin/sandboxes/alice?purge=maybe",
    ],
)
async def test_admin_bad_parameters_are_400(client: TestClient, path: str) -> None:
    method = "DELETE" if "purge" in path else "GET"
    response = await client.request(method, path, headers=ADMIN)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_request"


async def test_admin_asking_for_an_unknown_user_is_404(client: TestClient) -> None:
    response = await client.get("/api/admin/sandboxes/nobody", headers=ADMIN)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "sandbox_not_found"
