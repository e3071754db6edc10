"""The terminal WebSocket against a real sandbox: a real TTY, both ways, and its limits."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from gateway.keys import DB
from gateway.settings import Settings
from gateway.tokens import mint_token

from .helpers import MakeClient, auth, docker_shell_ok, poll, running_container_id

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

PATH = "/api/sandbox/terminal"
PROTOCOL = "sandbox-terminal.v1"


class Screen:
    """Everything a terminal printed, and a way to wait for something to appear in it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.output = bytearray()
        # Where the last expected text ended: each expect looks only past it.
        self.cursor = 0

    async def expect(self, needle: bytes, timeout_s: float = 10.0) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while (found := self.output.find(needle, self.cursor)) < 0:
                    message = await self.ws.receive()
                    assert message.type == WSMsgType.BINARY, (message, bytes(self.output[-300:]))
                    self.output += message.data
            self.cursor = found + len(needle)
        except TimeoutError:
            pytest.fail(
                f"{needle!r} did not appear within {timeout_s} s; "
                f"the screen ends with {bytes(self.output[-300:])!r}"
            )

    async def type(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def closed(self, timeout_s: float = 15.0) -> tuple[int | None, str]:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.ws.receive()
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                    return self.ws.close_code, message.extra or ""
                if message.type == WSMsgType.BINARY:
                    self.output += message.data


@pytest.fixture
async def sandbox(client: TestClient) -> TestClient:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    return client


async def open_terminal(
    client: TestClient, user: str = "alice", query: str = "", headers: dict[str, str] | None = None
) -> Screen:
    ws = await client.ws_connect(PATH + query, headers=headers or auth(user), protocols=[PROTOCOL])
    return Screen(ws)


async def ready(client: TestClient, query: str = "", headers: dict[str, str] | None = None) -> Screen:
    """A terminal whose shell has printed its first prompt."""
    screen = await open_terminal(client, query=query, headers=headers)
    await screen.type(b"echo READY-$((40+2))\r")
    await screen.expect(b"READY-42")
    return screen


@pytest.mark.runtimes
async def test_echo_round_trip(sandbox: TestClient) -> None:
    screen = await ready(sandbox)
    assert screen.ws.protocol == PROTOCOL
    await screen.type(b"echo hello-$((6 * 7)) && whoami && pwd\r")
    await screen.expect(b"hello-42\r\nsandbox\r\n/workspace")


@pytest.mark.runtimes
async def test_resize_reaches_the_tty(sandbox: TestClient) -> None:
    screen = await ready(sandbox, query="?cols=100&rows=30")
    await screen.type(b"stty size\r")
    await screen.expect(b"30 100")
    await screen.ws.send_str('{"type": "resize", "cols": 123, "rows": 45}')
    await screen.type(b"stty size\r")
    await screen.expect(b"45 123")


@pytest.mark.runtimes
async def test_ctrl_c_interrupts_the_foreground_process(
    sandbox: TestClient, docker: aiodocker.Docker
) -> None:
    screen = await ready(sandbox)
    container_id = await running_container_id(sandbox, "alice")
    await screen.type(b"sleep 100\r")
    await poll(lambda: docker_shell_ok(docker, container_id, ["pgrep", "-f", "sleep 100"]))
    await screen.type(b"\x03")
    await screen.expect(b"^C")
    # 130: killed by SIGINT. The shell outlives it.
    await screen.type(b"echo status-$?\r")
    await screen.expect(b"status-130")
    assert not await docker_shell_ok(docker, container_id, ["pgrep", "-f", "sleep 100"])


async def test_job_control_and_colours(sandbox: TestClient) -> None:
    screen = await ready(sandbox)
    await screen.type(b"sleep 30 &\r")
    await screen.expect(b"[1] ")
    await screen.type(b"jobs; echo $TERM; kill %1\r")
    await screen.expect(b"Running")
    await screen.expect(b"xterm-256color")


async def test_bytes_survive_both_ways(sandbox: TestClient) -> None:
    screen = await ready(sandbox)
    # Output that is not UTF-8 arrives byte for byte.
    await screen.type(b"printf 'out:\\377\\376\\200:end\\n'\r")
    await screen.expect(b"out:\xff\xfe\x80:end")
    # Input that is not UTF-8, and a UTF-8 character split across two frames, reach the program whole.
    await screen.type(b"stty -echo; head -c 5 | od -An -tx1; stty echo\r")
    await screen.type(b"\xff\xfe\xc3")
    await screen.type(b"\xa9\n")
    await screen.expect(b"ff fe c3 a9 0a")


@pytest.mark.runtimes
async def test_closing_the_socket_hangs_up_the_shell(sandbox: TestClient, docker: aiodocker.Docker) -> None:
    screen = await ready(sandbox)
    container_id = await running_container_id(sandbox, "alice")
    await screen.type(b"sleep 4747 & nohup sleep 4848 >/dev/null 2>&1 & echo started\r")
    await screen.expect(b"started")

    async def both_running() -> bool:
        # "started" prints as the jobs fork: a hang-up before nohup has ignored SIGHUP would end it
        # too (under gVisor's ptrace platform, exec is slow enough for that to happen).
        jobs = [["pgrep", "-f", f"^sleep {n}"] for n in (4747, 4848)]
        return all([await docker_shell_ok(docker, container_id, job) for job in jobs])

    await poll(both_running)
    await screen.ws.close()

    async def job_gone() -> bool:
        return not await docker_shell_ok(docker, container_id, ["pgrep", "-f", "sleep 4747"])

    await poll(job_gone)
    # Like a closed SSH session: what was started with nohup stays.
    assert await docker_shell_ok(docker, container_id, ["pgrep", "-f", "sleep 4848"])


async def test_exit_closes_the_socket_normally(sandbox: TestClient) -> None:
    screen = await ready(sandbox)
    await screen.type(b"exit\r")
    code, reason = await screen.closed()
    assert code == 1000
    assert "exited" in reason


async def test_stopping_the_sandbox_closes_its_terminals(sandbox: TestClient) -> None:
    screen = await ready(sandbox)
    assert (await sandbox.delete("/api/sandbox", headers=auth("alice"))).status == 204
    code, reason = await screen.closed()
    assert code == 4000
    assert "stopped (user)" in reason


async def test_another_user_cannot_reach_the_shell(sandbox: TestClient) -> None:
    # bob's token opens bob's terminal, never alice's: bob has no sandbox.
    screen = await open_terminal(sandbox, user="bob")
    code, reason = await screen.closed()
    assert code == 4009
    assert "not running" in reason


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic YTpi"}],
)
async def test_bad_or_missing_token_fails_the_handshake(sandbox: TestClient, headers: dict[str, str]) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as failure:
        await sandbox.ws_connect(PATH, headers=headers, protocols=[PROTOCOL])
    assert failure.value.status == 401


async def test_browsers_send_the_token_as_a_subprotocol(sandbox: TestClient, settings: Settings) -> None:
    token = mint_token("alice", settings, 60)
    ws = await sandbox.ws_connect(PATH, protocols=[PROTOCOL, f"bearer.{token}"])
    # The token is not echoed back as the chosen protocol.
    assert ws.protocol == PROTOCOL
    screen = Screen(ws)
    await screen.type(b"echo via-subprotocol\r")
    await screen.expect(b"via-subprotocol")
    with pytest.raises(aiohttp.WSServerHandshakeError) as failure:
        await sandbox.ws_connect(PATH, protocols=[PROTOCOL, "bearer.forged"])
    assert failure.value.status == 401


async def test_origin_is_checked(make_client: MakeClient) -> None:
    client = await make_client(allowed_origins=frozenset({"https://ide.example"}))
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    with pytest.raises(aiohttp.WSServerHandshakeError) as failure:
        await open_terminal(client, headers={**auth("alice"), "Origin": "https://evil.example"})
    assert failure.value.status == 403
    own = f"http://{client.host}:{client.port}"
    for origin in (own, "https://ide.example"):
        screen = await ready(client, headers={**auth("alice"), "Origin": origin})
        await screen.ws.close()


async def test_terminals_per_user_are_bounded(make_client: MakeClient) -> None:
    client = await make_client(max_terminals_per_user=2)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    first, second = await ready(client), await ready(client)
    third = await open_terminal(client)
    code, reason = await third.closed()
    assert code == 4029
    assert "at most 2" in reason
    await first.ws.close()

    # A closed one frees its place, once the gateway has seen the close.
    async def another_opens() -> bool:
        screen = await open_terminal(client)
        await screen.type(b"echo PLACE\r")
        message = await screen.ws.receive()
        await screen.ws.close()
        return message.type == WSMsgType.BINARY

    await poll(another_opens)
    await second.ws.close()


async def test_bad_control_message_closes_with_1003(sandbox: TestClient) -> None:
    screen = await ready(sandbox)
    await screen.ws.send_str('{"type": "resize", "cols": "wide", "rows": 2}')
    code, _ = await screen.closed()
    assert code == 1003


async def test_bad_initial_size_is_400(sandbox: TestClient) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as failure:
        await open_terminal(sandbox, query="?cols=0&rows=10")
    assert failure.value.status == 400


async def test_terminal_traffic_counts_as_activity(make_client: MakeClient) -> None:
    client = await make_client(activity_interval_s=0.2)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    screen = await ready(client)
    async with client.app[DB].acquire() as conn:
        await conn.execute("UPDATE sessions SET last_activity = '2000-01-01' WHERE user_id = 'alice'")

    async def moved() -> bool:
        await screen.type(b"\r")
        async with client.app[DB].acquire() as conn:
            return bool(await conn.fetchval("SELECT last_activity > '2001-01-01' FROM sessions"))

    await poll(moved)


async def test_shutdown_closes_terminals_with_going_away(sandbox: TestClient) -> None:
    screen = await ready(sandbox)
    closing = asyncio.ensure_future(sandbox.server.close())
    code, _ = await screen.closed()
    await closing
    assert code == 1001


# --- memory under a flood toward a stalled client, measured on a gateway in its own process ---


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
async def gateway_process(settings: Settings) -> AsyncIterator[tuple[str, int]]:
    env = {
        **os.environ,
        "GATEWAY_PORT": str(settings.port),
        "GATEWAY_JWT_SECRET": settings.jwt_key,
        "DATABASE_URL": settings.database_url,
        "GATEWAY_NAME": settings.gateway_name,
        "SANDBOX_NETWORK": settings.sandbox_network,
        "SANDBOX_IMAGE": settings.sandbox_image,
        "GATEWAY_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", env=env)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def healthy() -> bool:
                try:
                    async with session.get(f"{url}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await poll(healthy, timeout_s=30)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGINT)
        await process.wait()


async def test_flood_to_a_stalled_client_keeps_memory_bounded(gateway_process: tuple[str, int]) -> None:
    url, pid = gateway_process
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/api/sandbox", headers=auth("alice")) as response:
            assert response.status == 201
        # A small receive buffer, and then no reading at all: the client stalls.
        ws = await session.ws_connect(
            f"{url}{PATH}", headers=auth("alice"), protocols=[PROTOCOL], max_msg_size=0
        )
        await ws.send_bytes(b"cat /dev/urandom | base64\r")
        baseline = rss_bytes(pid)
        peak = baseline
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8
        health_latencies = []
        while loop.time() < deadline:
            peak = max(peak, rss_bytes(pid))
            started = loop.time()
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
            health_latencies.append(loop.time() - started)
            await asyncio.sleep(0.25)
        print(f"gateway RSS: baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB; "
              f"healthz max {max(health_latencies) * 1000:.0f} ms while flooding")  # fmt: skip
        # The flood produces far more than this in 8 s (tens of MB); the gateway holds a few buffers.
        assert peak - baseline < 32 * 2**20
        assert max(health_latencies) < 1.0
        # The flood was real: the stalled socket holds output.
        assert (await ws.receive()).type == WSMsgType.BINARY
        await ws.close()
