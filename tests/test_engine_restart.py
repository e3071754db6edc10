"""The Docker engine restarts under running sandboxes: the gateway notices, says why, and brings
them back with their workspaces. Only where the suite started its own engine (scripts/ensure-docker.sh
keeps its pid file in the state folder): another engine is not the suite's to restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from .helpers import auth, poll

pytestmark = [pytest.mark.docker, pytest.mark.postgres, pytest.mark.disruptive]

ROOT = Path(__file__).resolve().parent.parent
PID_FILE = Path(os.environ.get("SANDBOX_GATEWAY_STATE", ROOT / ".state")) / "docker" / "dockerd.pid"


def own_engine_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def restart_engine(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    # dockerd stops its containers first (SIGTERM to each, then SIGKILL after its shutdown timeout).
    # A blocking wait is fine here: this runs in a thread (asyncio.to_thread).
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            pytest.fail("dockerd did not exit within 60 s")
        time.sleep(0.1)
    subprocess.run([str(ROOT / "scripts" / "ensure-docker.sh")], check=True, capture_output=True)


@pytest.mark.skipif(
    own_engine_pid() is None, reason="the engine was not started by the suite; not ours to restart"
)
async def test_sandboxes_come_back_after_an_engine_restart(
    client: TestClient, docker: aiodocker.Docker
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    written = await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "bash", "code": "echo kept > /workspace/f"},
    )
    assert (await written.json())["exit_code"] == 0
    pid = own_engine_pid()
    assert pid is not None
    await asyncio.to_thread(restart_engine, pid)

    async def shows_stopped() -> bool:
        response = await client.get("/api/sandbox", headers=auth("alice"))
        return response.status == 200 and (await response.json())["state"] == "stopped"

    await poll(shows_stopped, timeout_s=30)
    body = await (await client.get("/api/sandbox", headers=auth("alice"))).json()
    assert body["stop_reason"].startswith(("exited_", "container_gone"))
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    read = await client.post(
        "/api/sandbox/exec", headers=auth("alice"), json={"language": "bash", "code": "cat /workspace/f"}
    )
    assert (await read.json())["stdout"] == "kept\n"
