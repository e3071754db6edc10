"""Terminals that outlive their socket (sandbox-terminal.v2): reattach by id with a replay, through
any gateway, several viewers, the grace period, explicit close, the list, and isolation by user."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from gateway.settings import TerminalSettings

from .gateway_processes import StartGateways, call
from .helpers import MakeClient, auth, docker_shell_ok, poll, running_container_id
from .test_terminal import PATH, Screen

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

V2 = "sandbox-terminal.v2"
TICK = re.compile(rb"tick-(\d+)")


async def attach(
    ws: aiohttp.ClientWebSocketResponse,
) -> tuple[Screen, dict[str, Any]]:
    """The v2 socket's first message, then a Screen over what follows."""
    message = await ws.receive(timeout=15)
    assert message.type == WSMsgType.TEXT, message
    attached = json.loads(message.data)
    assert attached["type"] == "attached"
    return Screen(ws), attached


async def open_v2(client: TestClient, query: str = "", user: str = "alice") -> tuple[Screen, dict[str, Any]]:
    ws = await client.ws_connect(PATH + query, headers=auth(user), protocols=[V2])
    assert ws.protocol == V2
    return await attach(ws)


async def ready_v2(client: TestClient, user: str = "alice") -> tuple[Screen, str]:
    screen, attached = await open_v2(client, user=user)
    assert attached["new"] is True
    assert attached["replayed"] == 0
    assert re.fullmatch(r"[0-9a-f]{24}", attached["id"])
    await screen.type(b"echo READY-$((40+2))\r")
    await screen.expect(b"READY-42")
    return screen, attached["id"]


async def last_tick(screen: Screen) -> int:
    await screen.expect(b"tick-")
    ticks = [int(n) for n in TICK.findall(bytes(screen.output))]
    return max(ticks)


@pytest.fixture
async def sandbox(client: TestClient) -> TestClient:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    return client


async def list_terminals(client: TestClient, user: str = "alice") -> list[dict[str, Any]]:
    response = await client.get("/api/sandbox/terminals", headers=auth(user))
    assert response.status == 200, await response.text()
    terminals: list[dict[str, Any]] = (await response.json())["terminals"]
    return terminals


async def test_reattach_after_closing_the_socket_resumes_the_shell_and_replays(sandbox: TestClient) -> None:
    screen, terminal_id = await ready_v2(sandbox)
    # The loop is a job of its own (bash -c): Ctrl-C then ends it for sure. Run by the interactive shell
    # itself, a SIGINT landing between two sleeps is taken for one that the sleep handled, and the loop
    # goes on (bash's rule for children that catch SIGINT).
    await screen.type(
        b"echo MARKER-$((6*7)); bash -c 'for i in $(seq 1 100000); do echo tick-$i; sleep 0.1; done'\r"
    )
    await screen.expect(b"MARKER-42")
    before = await last_tick(screen)
    await screen.ws.close()

    again, attached = await open_v2(sandbox, f"?id={terminal_id}")
    assert attached == {"type": "attached", "id": terminal_id, "replayed": attached["replayed"], "new": False}
    assert attached["replayed"] > 0
    # The replay redraws what was on the screen, the marker included, and the loop never stopped.
    await again.expect(b"MARKER-42")
    await again.expect(f"tick-{before + 5}\r\n".encode())
    await again.type(b"\x03")
    await again.type(b"echo AFTER-$((6*7))\r")
    await again.expect(b"AFTER-42")


async def test_reattach_through_another_gateway_process(
    start_gateways: StartGateways, http: aiohttp.ClientSession
) -> None:
    a, b = await start_gateways("a", "b")
    assert (await call(http, a, "POST", "/api/sandbox", "alice"))[0] == 201
    screen, attached = await attach(
        await http.ws_connect(f"{a.url}{PATH}", headers=auth("alice"), protocols=[V2])
    )
    await screen.type(b"cd /tmp && echo VIA-A-$$\r")
    await screen.expect(b"VIA-A-")
    await screen.ws.close()
    # Gateway a goes away entirely: nothing of the terminal was in it.
    a.process.terminate()
    await a.process.wait()

    url = f"{b.url}{PATH}?id={attached['id']}"
    again, reattached = await attach(await http.ws_connect(url, headers=auth("alice"), protocols=[V2]))
    assert reattached["id"] == attached["id"]
    assert reattached["replayed"] > 0
    await again.expect(b"VIA-A-")
    await again.type(b"echo VIA-B-$(pwd)\r")
    await again.expect(b"VIA-B-/tmp")
    await again.ws.close()


async def test_two_viewers_of_one_terminal_both_see_its_output(sandbox: TestClient) -> None:
    first, terminal_id = await ready_v2(sandbox)
    second, attached = await open_v2(sandbox, f"?id={terminal_id}")
    assert attached["replayed"] > 0
    # Either one's keys reach the shell, and both see what it prints.
    await second.type(b"echo FROM-SECOND-$((6*7))\r")
    for screen in (first, second):
        await screen.expect(b"FROM-SECOND-42")
    await first.type(b"echo FROM-FIRST-$((6*7))\r")
    for screen in (first, second):
        await screen.expect(b"FROM-FIRST-42")
    (described,) = await list_terminals(sandbox)
    assert described["viewers"] == 2
    # One leaving does not end it for the other.
    await first.ws.close()
    await second.type(b"echo STILL-$((6*7))\r")
    await second.expect(b"STILL-42")


async def test_a_detached_terminal_ends_after_its_grace_period(
    make_client: MakeClient, docker: aiodocker.Docker
) -> None:
    client = await make_client(terminal=TerminalSettings(grace_s=2))
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    container_id = await running_container_id(client, "alice")
    screen, terminal_id = await ready_v2(client)
    await screen.type(b"sleep 4747 & echo started\r")
    await screen.expect(b"started")
    await screen.ws.close()

    async def detached() -> bool:
        terminals = await list_terminals(client)
        return len(terminals) == 1 and terminals[0]["detached_since"] is not None

    await poll(detached)
    assert await docker_shell_ok(docker, container_id, ["pgrep", "-f", "sleep 4747"])

    async def ended() -> bool:
        return not await list_terminals(client)

    await poll(ended, timeout_s=10)
    # Hung up: its job is gone, and its id attaches to nothing.
    assert not await docker_shell_ok(docker, container_id, ["pgrep", "-f", "sleep 4747"])
    code, _ = await attach_refused(client, terminal_id)
    assert code == 4004


async def attach_refused(client: TestClient, terminal_id: str, user: str = "alice") -> tuple[int | None, str]:
    ws = await client.ws_connect(f"{PATH}?id={terminal_id}", headers=auth(user), protocols=[V2])
    return await Screen(ws).closed()


async def test_list_and_explicit_close(sandbox: TestClient) -> None:
    screen, terminal_id = await ready_v2(sandbox)
    (described,) = await list_terminals(sandbox)
    assert described["id"] == terminal_id
    assert described["viewers"] == 1
    assert described["detached_since"] is None
    assert described["created_at"].endswith("+00:00")

    response = await sandbox.delete(f"/api/sandbox/terminals/{terminal_id}", headers=auth("alice"))
    assert response.status == 204
    # Its socket hears why, and the shell is gone.
    code, reason = await screen.closed()
    assert (code, reason) == (1000, "the terminal was closed")
    assert await list_terminals(sandbox) == []
    response = await sandbox.delete(f"/api/sandbox/terminals/{terminal_id}", headers=auth("alice"))
    assert response.status == 404
    assert (await sandbox.delete("/api/sandbox/terminals/nonsense", headers=auth("alice"))).status == 400


async def test_another_user_cannot_attach_to_or_close_my_terminal(sandbox: TestClient) -> None:
    screen, terminal_id = await ready_v2(sandbox)
    assert (await sandbox.post("/api/sandbox", headers=auth("bob"))).status == 201
    # Bob's request looks in bob's sandbox, where alice's id is not.
    code, reason = await attach_refused(sandbox, terminal_id, user="bob")
    assert code == 4004, reason
    response = await sandbox.delete(f"/api/sandbox/terminals/{terminal_id}", headers=auth("bob"))
    assert response.status == 404
    assert await list_terminals(sandbox, "bob") == []
    # And alice's shell did not notice.
    await screen.type(b"echo MINE-$((6*7))\r")
    await screen.expect(b"MINE-42")


async def test_v1_attaches_by_id_and_refuses_bad_ids(sandbox: TestClient) -> None:
    _, terminal_id = await ready_v2(sandbox)
    ws = await sandbox.ws_connect(
        f"{PATH}?id={terminal_id}", headers=auth("alice"), protocols=["sandbox-terminal.v1"]
    )
    screen = Screen(ws)
    # v1 has no text frames: the replay comes as bytes.
    await screen.expect(b"READY-42")
    with pytest.raises(aiohttp.WSServerHandshakeError) as failure:
        await sandbox.ws_connect(f"{PATH}?id=../../x", headers=auth("alice"), protocols=[V2])
    assert failure.value.status == 400


async def test_a_shell_that_exits_tells_v2_its_status(sandbox: TestClient) -> None:
    screen, _ = await ready_v2(sandbox)
    await screen.type(b"exit 3\r")
    message = await screen.ws.receive(timeout=15)
    while message.type == WSMsgType.BINARY:
        message = await screen.ws.receive(timeout=15)
    assert message.type == WSMsgType.TEXT
    assert json.loads(message.data) == {"type": "ended", "reason": "exited", "exit": 3}
    code, reason = await screen.closed()
    assert (code, reason) == (1000, "the shell exited")


async def test_a_stalled_viewer_is_dropped_and_the_others_go_on(make_client: MakeClient) -> None:
    settings = TerminalSettings(viewer_buffer_bytes=16 * 1024, viewer_stall_s=1)
    client = await make_client(terminal=settings)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    reader, terminal_id = await ready_v2(client)
    stalled, _ = await open_v2(client, f"?id={terminal_id}")
    # The flood goes on until stopped; `stalled` reads nothing from here on.
    await reader.type(b"while :; do head -c 100000 /dev/urandom | base64; echo FLOOD; done\r")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    received_after_stall = 0
    started = loop.time()
    while loop.time() < deadline and received_after_stall < 2_000_000:
        message = await reader.ws.receive(timeout=10)
        assert message.type == WSMsgType.BINARY, message
        if loop.time() - started > settings.viewer_stall_s + 2:
            received_after_stall += len(message.data)
    # Long past the stalled viewer's bound, the shell still floods the one that reads.
    assert received_after_stall >= 2_000_000
    await reader.type(b"\x03")
    # What the stalled socket finally reads ends with its drop: 4008, and it may reattach.
    code, reason = await stalled.closed(timeout_s=60)
    assert code == 4008, reason
    again, attached = await open_v2(client, f"?id={terminal_id}")
    assert attached["replayed"] > 0
    await again.ws.close()
