"""The lifecycle API against a real Docker engine and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from gateway.containers import AGENT_CAPABILITIES, AGENT_COMMAND, LABEL_GATEWAY, LABEL_USER
from gateway.disks import disk_paths
from gateway.runtime import gvisor_pids
from gateway.settings import Settings

from .helpers import MakeClient, auth, exec_bash, poll

pytestmark = [pytest.mark.docker, pytest.mark.postgres]


async def containers_of(docker: aiodocker.Docker, settings: Settings) -> list[dict[str, object]]:
    label = json.dumps({"label": [f"{LABEL_GATEWAY}={settings.gateway_name}"]})
    return [c._container for c in await docker.containers.list(all="1", filters=label)]


@pytest.mark.runtimes
async def test_start_creates_then_returns_the_same_sandbox(client: TestClient, settings: Settings) -> None:
    first = await client.post("/api/sandbox", headers=auth("alice"))
    assert first.status == 201
    body = await first.json()
    assert body["user"] == "alice"
    assert body["state"] == "running"
    # The sandbox's own origin, <label>.<preview domain>, and the path route beside it.
    assert re.fullmatch(r"http://p[a-z2-7]{16}\.preview\.sandbox\.localhost:\d+/", body["preview_url"])
    assert body["path_preview_url"] == f"{settings.preview_origin}/preview/alice/"
    assert body["limits"] == {"memory_mb": 256, "cpus": 1.0, "pids": 128}

    again = await client.post("/api/sandbox", headers=auth("alice"))
    assert again.status == 200
    assert (await again.json())["created_at"] == body["created_at"]

    shown = await client.get("/api/sandbox", headers=auth("alice"))
    assert shown.status == 200
    assert (await shown.json())["state"] == "running"


@pytest.mark.runtimes
async def test_container_is_locked_down(
    client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    [summary] = await containers_of(docker, settings)
    info = await docker.containers.container(str(summary["Id"])).show()
    host = info["HostConfig"]
    # The agent's user: it runs the user's programs as `sandbox`, with no capability at all.
    assert info["Config"]["User"] == "root"
    assert info["Config"]["Cmd"] == AGENT_COMMAND
    assert (await exec_bash(client, "id -un; grep ^CapEff /proc/self/status"))["stdout"] == (
        "sandbox\nCapEff:\t0000000000000000\n"
    )
    assert info["Config"]["Labels"][LABEL_USER] == "alice"
    assert host["Memory"] == 256 * 1024 * 1024
    assert host["MemorySwap"] == host["Memory"]
    assert host["NanoCpus"] == 1_000_000_000
    if settings.sandbox_runtime == "runsc":
        # gVisor keeps the limit itself; the cgroup only bounds its own threads (runtime.gvisor_pids).
        assert host["Ulimits"] == [{"Name": "nproc", "Soft": 128, "Hard": 128}]
        assert host["PidsLimit"] == gvisor_pids(128).host
    else:
        assert host["PidsLimit"] == 128
    assert host["CapDrop"] == ["ALL"]
    assert sorted(host["CapAdd"]) == sorted(AGENT_CAPABILITIES)
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    assert host["Runtime"] == settings.sandbox_runtime
    bindings = info["NetworkSettings"]["Ports"]["5173/tcp"]
    assert bindings
    assert all(b["HostIp"] == "127.0.0.1" for b in bindings)
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    # The user's own filesystem (disks.py) at /workspace and home; nothing else is writable but tmpfs.
    paths = disk_paths(settings, "alice")
    assert (mounts["/workspace"]["Type"], mounts["/workspace"]["Source"]) == ("bind", str(paths.workspace))
    assert (mounts["/home/sandbox"]["Type"], mounts["/home/sandbox"]["Source"]) == ("bind", str(paths.home))
    assert host["ReadonlyRootfs"] is True
    assert not any("docker.sock" in m["Source"] for m in info["Mounts"])
    if settings.ca_bundle:
        assert mounts["/etc/ssl/certs/ca-certificates.crt"]["RW"] is False
    # The network forbids traffic between sandboxes.
    network = await (await docker.networks.get(settings.sandbox_network)).show()
    assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"


async def test_stop_removes_container_and_keeps_the_row(
    client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    stopped = await client.delete("/api/sandbox", headers=auth("alice"))
    assert stopped.status == 204
    assert await containers_of(docker, settings) == []

    shown = await client.get("/api/sandbox", headers=auth("alice"))
    assert shown.status == 200
    body = await shown.json()
    assert (body["state"], body["stop_reason"]) == ("stopped", "user")

    again = await client.delete("/api/sandbox", headers=auth("alice"))
    assert again.status == 404
    assert (await again.json())["error"]["code"] == "sandbox_not_found"

    restarted = await client.post("/api/sandbox", headers=auth("alice"))
    assert restarted.status == 201


async def test_never_started_is_404(client: TestClient) -> None:
    for method in ("GET", "DELETE"):
        response = await client.request(method, "/api/sandbox", headers=auth("nobody"))
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "sandbox_not_found"


async def test_users_only_touch_their_own_sandbox(
    client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    # bob sees and stops nothing of alice's.
    assert (await client.get("/api/sandbox", headers=auth("bob"))).status == 404
    assert (await client.delete("/api/sandbox", headers=auth("bob"))).status == 404
    run = await client.post(
        "/api/sandbox/exec", headers=auth("bob"), json={"language": "bash", "code": "echo hi"}
    )
    assert run.status == 409
    # Identity comes from the token only: a user named in the query or body changes nothing.
    sneaky = await client.delete("/api/sandbox?user=alice", headers=auth("bob"))
    assert sneaky.status == 404
    [container] = await containers_of(docker, settings)
    assert container["State"] == "running"
    assert (await (await client.get("/api/sandbox", headers=auth("alice"))).json())["state"] == "running"


async def test_concurrent_starts_for_one_user_make_one_container(
    client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    responses = await asyncio.gather(*(client.post("/api/sandbox", headers=auth("alice")) for _ in range(5)))
    assert sorted(r.status for r in responses) == [200, 200, 200, 200, 201]
    assert len(await containers_of(docker, settings)) == 1


async def test_cap_holds_under_concurrent_starts(
    make_client: MakeClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    client = await make_client(max_sandboxes=2)
    users = [f"user{i}" for i in range(5)]
    responses = await asyncio.gather(*(client.post("/api/sandbox", headers=auth(u)) for u in users))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201, 201, 503, 503, 503], [await r.text() for r in responses]
    for response in responses:
        if response.status == 503:
            assert (await response.json())["error"]["code"] == "capacity_exhausted"
    assert len(await containers_of(docker, settings)) == 2


async def test_cap_is_shared_by_two_gateways_on_one_database(
    make_client: MakeClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    one, two = await make_client(max_sandboxes=3), await make_client(max_sandboxes=3)
    starts = [(one if i % 2 else two).post("/api/sandbox", headers=auth(f"user{i}")) for i in range(6)]
    statuses = sorted(r.status for r in await asyncio.gather(*starts))
    assert statuses == [201, 201, 201, 503, 503, 503]
    assert len(await containers_of(docker, settings)) == 3


async def test_start_after_the_container_vanished_starts_a_new_one(
    client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    [container] = await containers_of(docker, settings)
    await docker.containers.container(str(container["Id"])).delete(force=True)

    restarted = await client.post("/api/sandbox", headers=auth("alice"))
    assert restarted.status == 201

    async def one_running() -> bool:
        found = await containers_of(docker, settings)
        return len(found) == 1 and found[0]["State"] == "running"

    await poll(one_running)


async def test_start_with_a_missing_image_leaves_nothing_behind(
    make_client: MakeClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    client = await make_client(sandbox_image="sandbox-gateway/does-not-exist:never")
    response = await client.post("/api/sandbox", headers=auth("alice"))
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "sandbox_start_failed"
    assert await containers_of(docker, settings) == []
    body = await (await client.get("/api/sandbox", headers=auth("alice"))).json()
    assert (body["state"], body["stop_reason"]) == ("stopped", "start_failed")


async def test_start_rejects_a_body_with_fields(client: TestClient) -> None:
    response = await client.post("/api/sandbox", headers=auth("alice"), json={"image": "evil"})
    assert response.status == 400
    assert "image: unknown field" in (await response.json())["error"]["message"]


async def test_start_takes_no_body_or_json_but_not_whitespace(client: TestClient) -> None:
    json_type = {"Content-Type": "application/json"}
    blank = await client.post("/api/sandbox", headers={**auth("alice"), **json_type}, data=b"\r\n\r\n")
    assert blank.status == 400
    assert (await blank.json())["error"]["code"] == "invalid_request"
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    assert (await client.post("/api/sandbox", headers=auth("alice"), json={})).status == 200
