"""What a sandbox sees of its own limits, under each runtime (gateway/runtime.py): memory and CPU
figures from free, /proc/meminfo, nproc, Node.js and Python; the process limit holding without taking
the sandbox down; and a host that lacks the configured runtime refusing starts with what to fix."""

from __future__ import annotations

import json
from typing import Any

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from gateway.runtime import LABEL_CPUS, least_used_cpus
from gateway.settings import SandboxLimits

from .helpers import MakeClient, auth, running_container_id

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

LIMITS = SandboxLimits(memory_mb=512, cpus=1.0, pids=128)

FIGURES = r"""
free -b | awk '/^Mem:/ {print "free", $2}'
awk '/^MemTotal:/ {print "meminfo", $2 * 1024}' /proc/meminfo
echo nproc "$(nproc)"
echo online "$(cat /sys/devices/system/cpu/online)"
echo cpuinfo "$(grep -c ^processor /proc/cpuinfo)"
node -e 'const os = require("os"); console.log("os.cpus", os.cpus().length);
  console.log("availableParallelism", os.availableParallelism()); console.log("totalmem", os.totalmem())'
python3 -c 'import os; print("cpu_count", os.cpu_count()); print("affinity", len(os.sched_getaffinity(0)))'
"""


async def bash(client: TestClient, code: str, timeout_ms: int = 20_000) -> dict[str, Any]:
    response = await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "bash", "code": code, "timeout_ms": timeout_ms},
    )
    assert response.status == 200, await response.text()
    result: dict[str, Any] = await response.json()
    return result


@pytest.mark.runtimes
async def test_memory_and_cpus_inside_are_the_sandbox_own(make_client: MakeClient) -> None:
    # lxcfs required under runc: a host without it fails this test, saying so, instead of passing it.
    client = await make_client(limits=LIMITS, sandbox_lxcfs="on")
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    result = await bash(client, FIGURES)
    assert result["exit_code"] == 0, result["stderr"]
    seen = dict(line.split(" ", 1) for line in result["stdout"].splitlines())
    memory = str(512 * 1024 * 1024)
    # One CPU online: lxcfs writes "0", gVisor "0-0".
    assert seen.pop("online") in ("0", "0-0")
    assert seen == {
        "free": memory,
        "meminfo": memory,
        "totalmem": memory,
        "nproc": "1",
        "cpuinfo": "1",
        "os.cpus": "1",
        "availableParallelism": "1",
        "cpu_count": "1",
        "affinity": "1",
    }


@pytest.mark.runtimes
async def test_forks_past_the_limit_fail_and_the_sandbox_lives_on(make_client: MakeClient) -> None:
    client = await make_client(limits=LIMITS)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    # Small children (sleep, spawned without copying the interpreter): under gVisor every guest page
    # counts against the memory limit, and an OOM there ends the whole sandbox, not one process.
    code = """
import subprocess
children = []
try:
    for _ in range(400):
        children.append(subprocess.Popen(["sleep", "60"]))
    error = "none"
except BlockingIOError as err:
    error = err.__class__.__name__
for child in children:
    child.kill()
    child.wait()
print(len(children), error)
"""
    response = await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "python", "code": code, "timeout_ms": 30_000},
    )
    assert response.status == 200, await response.text()
    result = await response.json()
    forked, error = result["stdout"].split()
    assert error == "BlockingIOError"
    # The limit counts the run's own processes too (and, under runc, the agent's; gVisor counts the
    # user's alone, so there the agent never competes with the user for it).
    assert 64 <= int(forked) <= LIMITS.pids
    after = await bash(client, "echo alive")
    assert after["stdout"] == "alive\n"


async def test_a_runtime_the_engine_lacks_refuses_starts_and_names_it(make_client: MakeClient) -> None:
    client = await make_client(sandbox_runtime="no-such-runtime")
    response = await client.post("/api/sandbox", headers=auth("alice"))
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "host_misconfigured"
    assert "'no-such-runtime'" in error["message"]
    assert "SANDBOX_RUNTIME" in error["message"]
    # Refused before a slot was taken: the user has no sandbox, not a failed one.
    assert (await client.get("/api/sandbox", headers=auth("alice"))).status == 404


async def test_sandboxes_are_spread_over_the_cpus(make_client: MakeClient, docker: aiodocker.Docker) -> None:
    client = await make_client(limits=LIMITS)
    ncpu = (await docker.system.info())["NCPU"]
    pinned_before = await docker.containers.list(
        filters=json.dumps({"label": [LABEL_CPUS], "status": ["running"]})
    )
    cpusets = []
    for user in ("alice", "bob"):
        assert (await client.post("/api/sandbox", headers=auth(user))).status == 201
        info = await docker.containers.container(await running_container_id(client, user)).show()
        cpuset = info["HostConfig"]["CpusetCpus"]
        assert info["Config"]["Labels"][LABEL_CPUS] == cpuset
        assert cpuset.isdigit()
        assert int(cpuset) < ncpu
        cpusets.append(cpuset)
    if ncpu > 1 and not pinned_before:
        assert cpusets[0] != cpusets[1]


@pytest.mark.parametrize(
    ("ncpu", "needed", "pinned", "chosen"),
    [
        (2, 1, [], "0"),
        (2, 1, ["0"], "1"),
        (2, 1, ["0", "1", "1"], "0"),
        (4, 2, ["0-1", "2"], "0,3"),
        (4, 2, ["0,1", "2,3", "0"], "1,2"),
        (2, 2, ["0", "0"], "0,1"),
        (3, 1, ["junk", ""], "0"),
    ],
)
def test_least_used_cpus(ncpu: int, needed: int, pinned: list[str], chosen: str) -> None:
    assert least_used_cpus(ncpu, needed, pinned) == chosen
