"""A sandbox reaches neither the gateway, nor PostgreSQL, nor the Docker engine, nor another user's
sandbox: the gateway and PostgreSQL listen on loopback or a unix socket, the sandboxes sit on a bridge
network of their own with inter-container traffic off, and they publish their port on 127.0.0.1 only.

The probes run inside a real sandbox, through the API, with bash's /dev/tcp, and only toward loopback:
this machine's network rule keeps tests' traffic on 127.0.0.0/8, so the bridge side (inter-container
traffic off, ports published on 127.0.0.1 only) is checked as configuration.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shlex
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiodocker
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.containers import AGENT_PORT, PREVIEW_PORT
from gateway.settings import Settings

from .helpers import auth, running_container_id

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

ENSURE_POSTGRES = Path(__file__).resolve().parent.parent / "scripts" / "ensure-postgres.sh"
CONTROL_PORT = 8000
# Runs in alice's sandbox. A control listener on its own loopback shows that the probe can say
# "open"; "refused" is a RST, "filtered" a connection that went unanswered for PROBE_TIMEOUT_S.
PROBE = r"""
set -u
python3 -m http.server {control} --bind 127.0.0.1 >/dev/null 2>&1 &
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/{control}) 2>/dev/null && break; sleep 0.1; done
probe() {{  # probe NAME HOST PORT
    timeout {timeout} bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null
    case $? in 0) echo "$1 open" ;; 124) echo "$1 filtered" ;; *) echo "$1 refused" ;; esac
}}
# All at once, each in the background of a subshell that waits for them alone.
(
{probes}
wait
)
for path in /var/run/docker.sock /run/docker.sock {postgres_socket_dir}; do
    if [ -e "$path" ]; then echo "path:$path present"; else echo "path:$path absent"; fi
done
echo "sockets: $(find / -xdev -type s 2>/dev/null | grep -v '^/proc' | tr '\n' ' ')"
"""
PROBE_TIMEOUT_S = 3


def _postgres_socket_dir(dsn: str) -> str:
    """The unix socket folder of the suite's cluster (`?host=/tmp/...`), or the DSN's host."""
    parts = urlsplit(dsn)
    return parse_qs(parts.query).get("host", [parts.hostname or ""])[0]


async def _probe_from_alice(
    client: TestClient, targets: dict[str, tuple[str, int]], socket_dir: str
) -> dict[str, str]:
    probes = "\n".join(
        f"probe {shlex.quote(name)} {shlex.quote(host)} {port} &" for name, (host, port) in targets.items()
    )
    code = PROBE.format(
        control=CONTROL_PORT,
        timeout=PROBE_TIMEOUT_S,
        probes=probes,
        postgres_socket_dir=shlex.quote(socket_dir),
    )
    response = await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "bash", "code": code, "timeout_ms": 30_000},
    )
    result = await response.json()
    assert result["exit_code"] == 0, result
    outcome: dict[str, str] = {}
    for line in result["stdout"].splitlines():
        name, _, verdict = line.partition(" ")
        outcome[name] = verdict
    return outcome


async def test_a_sandbox_sees_no_gateway_database_or_engine(
    client: TestClient, settings: Settings, postgres_server: str
) -> None:
    """From inside: the host's loopback, where the gateway listens, is not the sandbox's loopback, and
    no Docker or PostgreSQL socket is anywhere in its file system. Probes stay on loopback (this
    machine's network rule); the bridge side is proven by the configuration test below."""
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    targets = {
        "control": ("127.0.0.1", CONTROL_PORT),
        "gateway-on-loopback": ("127.0.0.1", settings.port),
        "postgres-on-loopback": ("127.0.0.1", 5432),
        "docker-api-on-loopback": ("127.0.0.1", 2375),
    }
    socket_dir = _postgres_socket_dir(postgres_server)
    outcome = await _probe_from_alice(client, targets, socket_dir)
    # The probe can tell: what listens inside alice's own sandbox is open.
    assert outcome["control"] == "open", outcome
    for name in targets.keys() - {"control"}:
        assert outcome[name] == "refused", (name, outcome)
    assert outcome["path:/var/run/docker.sock"] == "absent"
    assert outcome["path:/run/docker.sock"] == "absent"
    if socket_dir.startswith("/"):
        assert outcome[f"path:{socket_dir}"] == "absent"
    assert "docker.sock" not in outcome["sockets:"]
    assert ".s.PGSQL" not in outcome["sockets:"]


async def test_the_configuration_keeps_sandboxes_apart(
    client: TestClient, settings: Settings, docker: aiodocker.Docker, postgres_server: str
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    # The gateway listens on loopback, by default and here.
    assert Settings(jwt_key="x" * 32, database_url="unused").host == "127.0.0.1"
    assert Settings.from_env({"GATEWAY_JWT_SECRET": "x" * 32, "DATABASE_URL": "postgresql:///x"}).host == (
        "127.0.0.1"
    )
    assert client.server.runner is not None
    for address in client.server.runner.addresses:
        assert ipaddress.ip_address(address[0]).is_loopback, address

    # PostgreSQL: the suite's cluster, like the one scripts/run.sh starts, has no TCP listener at all.
    connection = await asyncpg.connect(postgres_server)
    try:
        listen = await connection.fetchval("SHOW listen_addresses")
    finally:
        await connection.close()
    assert all(
        address.strip() in ("", "localhost") or ipaddress.ip_address(address.strip()).is_loopback
        for address in listen.split(",")
    ), listen
    assert "-c listen_addresses=''" in await asyncio.to_thread(ENSURE_POSTGRES.read_text)

    # The sandbox network: a bridge of its own with inter-container traffic off.
    network = await (await docker.networks.get(settings.sandbox_network)).show()
    assert network["Driver"] == "bridge"
    assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"

    container = await docker.containers.container(await running_container_id(client, "alice")).show()
    host_config = container["HostConfig"]
    assert host_config["NetworkMode"] == settings.sandbox_network
    assert list(container["NetworkSettings"]["Networks"]) == [settings.sandbox_network]
    # The dev server's port and the agent's, both on this host's loopback; nothing else.
    loopback = [{"HostIp": "127.0.0.1", "HostPort": ""}]
    assert host_config["PortBindings"] == {PREVIEW_PORT: loopback, AGENT_PORT: loopback}
    published = [
        binding for bindings in container["NetworkSettings"]["Ports"].values() for binding in bindings or []
    ]
    assert published
    assert {binding["HostIp"] for binding in published} == {"127.0.0.1"}
    assert not host_config["Privileged"]
    assert host_config["CapDrop"] == ["ALL"]
    assert host_config["PublishAllPorts"] is False
    for mount in container["Mounts"]:
        assert "docker.sock" not in mount.get("Source", ""), mount
        assert not mount.get("Source", "").startswith("/var/run"), mount
        assert not mount.get("Source", "").startswith("/run"), mount
