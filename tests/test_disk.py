"""Disk quotas on real Docker, real loop-mounted filesystems and PostgreSQL: what a sandbox can write,
where, and how much; what survives, what purge deletes, and the floor on the host's free disk."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from gateway import containers, disks
from gateway.disks import Disks, disk_paths, host_problem
from gateway.errors import DiskQuotaUnavailable
from gateway.keys import DB
from gateway.settings import DiskSettings, Settings

from .conftest import TEST_DISKS
from .helpers import MakeClient, auth, poll, running_container_id

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

SMALL = replace(TEST_DISKS, size_mb=64, tmp_mb=16)


async def bash(
    client: TestClient, code: str, user: str = "alice", timeout_ms: int = 30_000
) -> dict[str, Any]:
    response = await client.post(
        "/api/sandbox/exec",
        headers=auth(user),
        json={"language": "bash", "code": code, "timeout_ms": timeout_ms},
    )
    assert response.status == 200, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def mounted(path: Path) -> bool:
    return await asyncio.to_thread(os.path.ismount, path)


async def start(client: TestClient, user: str = "alice") -> None:
    response = await client.post("/api/sandbox", headers=auth(user))
    assert response.status == 201, await response.text()


def fill(path: str, mb: int) -> str:
    """bash that writes `mb` MiB to `path` and prints how dd ended."""
    return f"dd if=/dev/zero of={path} bs=1M count={mb} 2>&1; echo exit=$?"


async def test_workspace_and_home_end_in_enospc_and_a_neighbour_writes_on(make_client: MakeClient) -> None:
    client = await make_client(disk=SMALL)
    await start(client, "alice")
    await start(client, "bob")
    for path in ("/workspace/big", "$HOME/big"):
        result = await bash(client, fill(path, 100))
        assert "No space left on device" in result["stdout"], result
        assert "exit=1" in result["stdout"]
        await bash(client, f"rm -f {path}")
    # The filesystem is the quota: df inside shows its size, not the host's disk.
    df = await bash(client, "df -m --output=size /workspace /home/sandbox | tail -n +2")
    sizes = [int(size) for size in df["stdout"].split()]
    assert len(sizes) == 2, df
    assert all(50 <= size <= 64 for size in sizes), df
    # alice's full disk costs bob nothing.
    result = await bash(client, fill("/workspace/mine", 40) + "; rm /workspace/mine", user="bob")
    assert "exit=0" in result["stdout"], result


async def test_tmp_is_a_bounded_tmpfs_and_the_root_is_read_only(
    make_client: MakeClient, docker: aiodocker.Docker
) -> None:
    client = await make_client(disk=SMALL)
    await start(client)
    for path in ("/tmp/big", "/var/tmp/big"):
        result = await bash(client, fill(path, 32))
        assert "No space left on device" in result["stdout"], result
        await bash(client, f"rm -f {path}")
    result = await bash(client, "touch /usr/x; touch /x; touch /etc/x; echo done")
    assert result["stderr"].count("Read-only file system") == 3, result
    info = await docker.containers.container(await running_container_id(client, "alice")).show()
    host = info["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert set(host["Tmpfs"]) == {"/tmp", "/var/tmp"}
    assert all("size=16m" in options for options in host["Tmpfs"].values())


async def test_the_image_works_on_a_read_only_root(client: TestClient) -> None:
    # What users do in a terminal, with everything outside /workspace, home and /tmp read-only.
    script = r"""
set -e
bash -lc 'echo login-shell-ok'
test -f ~/.bashrc && test -f ~/.profile && echo dotfiles-ok
git config --global user.email a@example.com && git config --global user.name a
cd /workspace && git init -q repo && cd repo && echo hi > f && git add f && git commit -qm first
git log --format=%s
cd /workspace && python3 -m venv venv && venv/bin/python -c 'import sys; print("venv", sys.prefix)'
mktemp >/dev/null && mktemp -d >/dev/null && echo mktemp-ok
npm --version >/dev/null && npm config get cache
"""
    await start(client)
    result = await bash(client, script, timeout_ms=60_000)
    assert result["exit_code"] == 0, result
    assert result["stdout"].split("\n")[:6] == [
        "login-shell-ok",
        "dotfiles-ok",
        "first",
        "venv /workspace/venv",
        "mktemp-ok",
        "/home/sandbox/.npm",
    ], result


async def test_workspace_and_home_survive_stop_and_start_and_the_disk_is_unmounted_between(
    client: TestClient, settings: Settings
) -> None:
    await start(client)
    await bash(client, "echo kept > /workspace/note && echo 'history' > ~/.bash_history")
    paths = disk_paths(settings, "alice")
    assert await mounted(paths.mountpoint)
    assert (await client.delete("/api/sandbox", headers=auth("alice"))).status == 204
    assert not await mounted(paths.mountpoint)
    # Beneath the mount point there is nothing (disks.py: that is what tells a mount the engine missed).
    assert await asyncio.to_thread(os.listdir, paths.mountpoint) == []
    await start(client)
    assert (await bash(client, "cat /workspace/note ~/.bash_history"))["stdout"] == "kept\nhistory\n"


async def test_purge_deletes_the_disk(client: TestClient, settings: Settings) -> None:
    await start(client)
    paths = disk_paths(settings, "alice")
    assert paths.image.is_file()
    assert (await client.delete("/api/sandbox?purge=true", headers=auth("alice"))).status == 204
    assert not paths.image.exists()
    assert not paths.mountpoint.exists()
    assert (await client.delete("/api/sandbox?purge=true", headers=auth("alice"))).status == 404
    await start(client)
    assert (await bash(client, "ls -A /workspace | wc -l; ls -A ~"))[
        "stdout"
    ] == "0\n.bash_logout\n.bashrc\n.profile\n"


async def test_an_old_workspace_volume_moves_into_the_new_disk(
    make_client: MakeClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    # A workspace from before quotas: a gateway without them made it.
    before = await make_client(disk=DiskSettings(size_mb=0))
    await start(before)
    await bash(
        before,
        "mkdir -p /workspace/app && echo old > /workspace/app/main.js && chmod 640 /workspace/app/main.js",
    )
    assert (await before.delete("/api/sandbox", headers=auth("alice"))).status == 204
    await before.close()

    after = await make_client()
    await start(after)
    result = await bash(
        after,
        "cd /workspace/app; cat main.js; stat -c '%a %U' main.js; df -m --output=size . | tail -1",
    )
    lines = result["stdout"].split()
    assert lines[:3] == ["old", "640", "sandbox"], result
    assert int(lines[3]) <= TEST_DISKS.size_mb
    # Copied once: a change made since is not overwritten by the old volume at the next start.
    await bash(after, "echo new > /workspace/app/main.js")
    assert (await after.delete("/api/sandbox", headers=auth("alice"))).status == 204
    await start(after)
    assert (await bash(after, "cat /workspace/app/main.js"))["stdout"] == "new\n"
    # The old volume stays until purge, which deletes both.
    volume_name = containers.workspace_volume(settings, "alice")
    await docker.volumes.get(volume_name)  # type: ignore[no-untyped-call]
    assert (await after.delete("/api/sandbox?purge=true", headers=auth("alice"))).status == 204
    with pytest.raises(aiodocker.DockerError):
        await docker.volumes.get(volume_name)  # type: ignore[no-untyped-call]
    assert not disk_paths(settings, "alice").image.exists()


async def test_starts_are_refused_below_the_free_disk_floor(
    make_client: MakeClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    free = disks.free_mb(TEST_DISKS.directory)
    client = await make_client(disk=replace(TEST_DISKS, min_free_mb=free + 1024 * 1024))
    response = await client.post("/api/sandbox", headers=auth("alice"))
    assert response.status == 503
    body = await response.json()
    assert body["error"]["code"] == "host_disk_low"
    assert "SANDBOX_MIN_FREE_DISK_MB" in body["error"]["message"]
    # Refused before anything was made or reserved.
    assert not disk_paths(settings, "alice").image.exists()
    async with client.app[DB].acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sessions WHERE state <> 'stopped'") == 0
    # Above the floor, the same gateway's settings start sandboxes.
    ok = await make_client(disk=replace(TEST_DISKS, min_free_mb=max(1, free // 2)))
    await start(ok)


async def test_the_container_log_is_bounded(client: TestClient, docker: aiodocker.Docker) -> None:
    await start(client)
    # PID 1 is root's (tini, whose child is the agent): the user cannot write to its output at all.
    refused = await bash(client, "echo x > /proc/1/fd/1")
    assert "Permission denied" in refused["stderr"], refused
    # Whatever does reach it (the agent's own log): 10 MiB through PID 1's stdout, straight into the
    # engine's log, then a line to know it arrived.
    container_id = await running_container_id(client, "alice")
    flood = "head -c 10M /dev/zero | tr '\\0' x > /proc/1/fd/1; echo; echo END-OF-FLOOD > /proc/1/fd/1"
    execution = await docker.containers.container(container_id).exec(["bash", "-c", flood], user="root")
    async with execution.start(detach=False) as stream:
        while await stream.read_out() is not None:
            pass
    info = await docker.containers.container(container_id).show()
    assert info["HostConfig"]["LogConfig"] == containers.LOG_CONFIG
    log_path = Path(info["LogPath"])

    async def arrived() -> bool:
        return b"END-OF-FLOOD" in await asyncio.to_thread(log_path.read_bytes)

    await poll(arrived, timeout_s=30)
    # 1 MiB plus at most the one message that crossed it (16 KiB of text in JSON).
    assert (await asyncio.to_thread(log_path.stat)).st_size < 1024 * 1024 + 64 * 1024


async def test_a_grown_setting_grows_the_disk_and_keeps_its_files(make_client: MakeClient) -> None:
    small = await make_client(disk=SMALL)
    await start(small)
    await bash(small, "echo kept > /workspace/note")
    assert (await small.delete("/api/sandbox", headers=auth("alice"))).status == 204
    large = await make_client(disk=replace(SMALL, size_mb=128))
    await start(large)
    result = await bash(large, "cat /workspace/note; df -m --output=size /workspace | tail -1")
    note, size = result["stdout"].split()
    assert note == "kept"
    assert 100 < int(size) <= 128, result


async def test_reconciliation_unmounts_a_disk_nobody_uses(
    make_client: MakeClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    first = await make_client()
    await start(first)
    paths = disk_paths(settings, "alice")
    # A gateway died between removing the container (and recording it) and unmounting the disk.
    await docker.containers.container(await running_container_id(first, "alice")).delete(force=True)
    await first.app[DB].execute("UPDATE sessions SET state = 'stopped' WHERE user_id = 'alice'")
    await first.close()
    assert await mounted(paths.mountpoint)
    second = await make_client()
    assert not await mounted(paths.mountpoint)
    # And the next start mounts it again, files and all.
    await start(second)
    assert (await bash(second, "ls -A ~ | head -1"))["stdout"] == ".bash_logout\n"


async def test_a_mount_the_engine_cannot_see_refuses_the_start(
    docker: aiodocker.Docker, settings: Settings
) -> None:
    # What an engine in another mount namespace sees of a disk: an empty mount point.
    paths = disk_paths(settings, "ghost")
    paths.mountpoint.mkdir(parents=True)
    with pytest.raises(DiskQuotaUnavailable, match="does not see the filesystems"):
        await containers.create_and_start(docker, settings, "ghost")


async def test_a_gateway_that_cannot_mount_refuses_starts_with_why(settings: Settings) -> None:
    remote = replace(settings, docker_host="tcp://127.0.0.1:2375")
    assert "remote" in (host_problem(remote) or "")
    assert host_problem(replace(settings, disk=DiskSettings(size_mb=0), docker_host="tcp://x:1")) is None

    async def never() -> Any:
        raise AssertionError("not asked")

    with pytest.raises(DiskQuotaUnavailable, match="SANDBOX_DISK_MB=0"):
        await Disks(remote).attach("alice", never, never)


def test_the_home_template_lands_owned_by_the_sandbox_user(tmp_path: Path) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in (("sandbox/.bashrc", b"rc"), ("sandbox/../escape", b"x")):
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(data), 0o644
            tar.addfile(entry, io.BytesIO(data))
        link = tarfile.TarInfo("sandbox/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    archive.seek(0)
    with tarfile.open(fileobj=archive) as template:
        disks._extract_home(template, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bashrc"]
    assert (tmp_path / ".bashrc").stat().st_uid == disks.SANDBOX_UID


async def test_without_quota_the_workspace_is_a_volume_and_the_root_writable(
    make_client: MakeClient, docker: aiodocker.Docker
) -> None:
    client = await make_client(disk=DiskSettings(size_mb=0))
    await start(client)
    info = await docker.containers.container(await running_container_id(client, "alice")).show()
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert mounts["/workspace"]["Type"] == "volume"
    assert info["HostConfig"]["ReadonlyRootfs"] is False
    # The log is bounded either way.
    assert info["HostConfig"]["LogConfig"] == containers.LOG_CONFIG
