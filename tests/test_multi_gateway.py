"""Two real gateway processes (`python -m gateway`) on one PostgreSQL and one Docker engine, as behind
a load balancer: whatever one starts, the other serves, and the cap and the reaper hold across both."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import asyncpg
import pytest
from yarl import URL

from gateway.containers import LABEL_GATEWAY, LABEL_USER, container_name
from gateway.keys import DB, SANDBOXES
from gateway.settings import Settings

from .gateway_processes import GatewayProcess, StartGateways, call, open_terminal, stop
from .helpers import MakeClient, auth, poll

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

UPSTREAM_JS = Path(__file__).parent / "fixtures" / "upstream.js"


async def state(http: aiohttp.ClientSession, gateway: GatewayProcess, user: str) -> tuple[str, str | None]:
    status, body = await call(http, gateway, "GET", "/api/sandbox", user)
    assert status == 200, body
    return body["state"], body["stop_reason"]


async def run(
    http: aiohttp.ClientSession, gateway: GatewayProcess, user: str, code: str, stdin: str = ""
) -> tuple[int, Any]:
    body = {"language": "bash", "code": code, "stdin": stdin}
    return await call(http, gateway, "POST", "/api/sandbox/exec", user, json=body)


async def start_upstream(
    http: aiohttp.ClientSession,
    gateway: GatewayProcess,
    docker: aiodocker.Docker,
    settings: Settings,
    user: str,
) -> None:
    """Starts tests/fixtures/upstream.js on 5173 of the user's sandbox, detached from any run."""
    source = await asyncio.to_thread(UPSTREAM_JS.read_text)
    status, written = await run(http, gateway, user, "cat > /workspace/upstream.js", stdin=source)
    assert (status, written["exit_code"]) == (200, 0), written
    container = await docker.containers.get(container_name(settings, user))
    execution = await container.exec(["node", "/workspace/upstream.js"], user="sandbox", workdir="/workspace")
    await execution.start(detach=True)


async def containers_of(docker: aiodocker.Docker, settings: Settings) -> list[dict[str, Any]]:
    """This deployment's containers, whichever gateway made them."""
    label = json.dumps({"label": [f"{LABEL_GATEWAY}={settings.gateway_name}"]})
    return [c._container for c in await docker.containers.list(all="1", filters=label)]


async def published_port(docker: aiodocker.Docker, settings: Settings, user: str) -> str:
    info = await (await docker.containers.get(container_name(settings, user))).show()
    port: str = info["NetworkSettings"]["Ports"]["5173/tcp"][0]["HostPort"]
    return port


def preview_url(gateway: GatewayProcess, user: str, path: str) -> URL:
    return URL(f"{gateway.url}/preview/{user}/{path}", encoded=True)


async def preview_get(
    http: aiohttp.ClientSession,
    gateway: GatewayProcess,
    settings: Settings,
    user: str,
    path: str = "echo",
    headers: dict[str, str] | None = None,
) -> int:
    """GET of the user's preview on the preview origin (Host), with a bearer token unless `headers`
    bring the credentials; the status."""
    sent = {"Host": settings.preview_host, **(headers if headers is not None else auth(user))}
    async with http.get(preview_url(gateway, user, path), headers=sent, allow_redirects=False) as response:
        await response.read()
        return response.status


async def test_a_sandbox_started_through_one_gateway_is_served_by_the_other(
    start_gateways: StartGateways,
    http: aiohttp.ClientSession,
    docker: aiodocker.Docker,
    settings: Settings,
) -> None:
    a, b = await start_gateways("a", "b")
    status, started = await call(http, a, "POST", "/api/sandbox", "alice")
    assert (status, started["state"]) == (201, "running"), started
    # B finds it as it is: running, and starting it again through B starts nothing new.
    assert await state(http, b, "alice") == ("running", None)
    assert (await call(http, b, "POST", "/api/sandbox", "alice"))[0] == 200

    status, result = await run(http, b, "alice", "echo $SANDBOX_USER > /workspace/who; cat /workspace/who")
    assert (status, result["stdout"], result["exit_code"]) == (200, "alice\n", 0), result
    assert (await run(http, a, "alice", "cat /workspace/who"))[1]["stdout"] == "alice\n"

    # The preview, through both, once the dev server listens.
    await start_upstream(http, a, docker, settings, "alice")

    async def preview_answers() -> bool:
        return await preview_get(http, b, settings, "alice") == 200

    await poll(preview_answers, timeout_s=20)
    assert await preview_get(http, a, settings, "alice") == 200
    async with http.ws_connect(
        preview_url(b, "alice", "ws"), headers={"Host": settings.preview_host, **auth("alice")}
    ) as preview_ws:
        await preview_ws.send_str("through b")
        assert (await preview_ws.receive()).data == "through b"

    # A browser's preview session: ticket from A, login on B, the cookie good on both.
    status, session = await call(http, a, "POST", "/api/sandbox/preview-session", "alice")
    assert status == 200, session
    login = URL(session["path_login_url"])
    async with http.get(
        f"{b.url}{login.raw_path_qs}", headers={"Host": settings.preview_host}, allow_redirects=False
    ) as response:
        assert response.status == 303, await response.text()
        cookie = response.cookies["sandbox_preview"].value
    for gateway in (a, b):
        with_cookie = {"Cookie": f"sandbox_preview={cookie}"}
        assert await preview_get(http, gateway, settings, "alice", headers=with_cookie) == 200
    forged = {"Cookie": f"sandbox_preview={cookie[:-4]}AAAA"}
    assert await preview_get(http, b, settings, "alice", headers=forged) == 401

    # A terminal through B; one through A is closed when B stops the sandbox.
    through_b = await open_terminal(http, b, "alice")
    await through_b.ws.send_bytes(b"cat /workspace/who\r")
    # Past the READY line, which ends in the user's name too: this is cat's output.
    await through_b.expect(b"alice\r\n", timeout_s=15)
    await through_b.ws.close()
    through_a = await open_terminal(http, a, "alice")

    assert (await call(http, b, "DELETE", "/api/sandbox", "alice"))[0] == 204
    assert await state(http, a, "alice") == ("stopped", "user")
    assert await through_a.closed() == (4000, "the sandbox stopped (user)")
    status, refused = await run(http, a, "alice", "true")
    assert (status, refused["error"]["code"]) == (409, "sandbox_not_running")

    # A's preview forgets the port within its cache's second.
    async def preview_gone() -> bool:
        return await preview_get(http, a, settings, "alice") == 409

    await poll(preview_gone, timeout_s=5)
    assert [c for c in await containers_of(docker, settings) if c["Labels"][LABEL_USER] == "alice"] == []

    # No state of record lives in a process: with A gone, B serves what A started.
    assert (await call(http, a, "POST", "/api/sandbox", "bob"))[0] == 201
    await stop(a)
    assert a.process.returncode is not None
    status, result = await run(http, b, "bob", "echo still here")
    assert (status, result["stdout"]) == (200, "still here\n")


async def test_preview_after_a_restart_through_the_other_gateway_reaches_the_new_container(
    start_gateways: StartGateways,
    http: aiohttp.ClientSession,
    docker: aiodocker.Docker,
    settings: Settings,
) -> None:
    a, b = await start_gateways("a", "b")
    assert (await call(http, a, "POST", "/api/sandbox", "alice"))[0] == 201
    await start_upstream(http, a, docker, settings, "alice")

    async def b_previews() -> bool:
        return await preview_get(http, b, settings, "alice") == 200

    await poll(b_previews, timeout_s=20)
    old_port = await published_port(docker, settings, "alice")

    # Restarted through A: a new container, published on another port. B had looked up the old one.
    assert (await call(http, a, "DELETE", "/api/sandbox", "alice"))[0] == 204
    assert (await call(http, a, "POST", "/api/sandbox", "alice"))[0] == 201
    assert await published_port(docker, settings, "alice") != old_port
    await start_upstream(http, a, docker, settings, "alice")
    await poll(b_previews, timeout_s=20)


async def test_the_cap_holds_across_gateways(
    start_gateways: StartGateways,
    http: aiohttp.ClientSession,
    docker: aiodocker.Docker,
    settings: Settings,
) -> None:
    a, b = await start_gateways("a", "b", MAX_SANDBOXES="2")
    users = {"user0": a, "user1": b, "user2": a}
    results = await asyncio.gather(
        *(call(http, gateway, "POST", "/api/sandbox", user) for user, gateway in users.items())
    )
    statuses = {user: status for user, (status, _) in zip(users, results, strict=True)}
    assert sorted(statuses.values()) == [201, 201, 503], results
    [refused] = [user for user, status in statuses.items() if status == 503]
    assert results[list(users).index(refused)][1]["error"]["code"] == "capacity_exhausted"
    assert len(await containers_of(docker, settings)) == 2

    # Room again once one stops, through the gateway that did not start it; the refused user's two
    # concurrent starts, one through each gateway, make one container.
    admitted = next(user for user, status in statuses.items() if status == 201)
    other = b if users[admitted] is a else a
    assert (await call(http, other, "DELETE", "/api/sandbox", admitted))[0] == 204
    again = await asyncio.gather(
        call(http, a, "POST", "/api/sandbox", refused), call(http, b, "POST", "/api/sandbox", refused)
    )
    assert sorted(status for status, _ in again) == [200, 201], again
    assert len(await containers_of(docker, settings)) == 2


IDLE_TIMEOUT_S = 10  # well above the 5 s at which ordinary use writes last_activity


async def test_the_reaper_stops_each_idle_sandbox_once_and_spares_one_kept_busy_through_the_other(
    start_gateways: StartGateways, http: aiohttp.ClientSession, settings: Settings
) -> None:
    a, b = await start_gateways("a", "b", SANDBOX_IDLE_TIMEOUT_S=str(IDLE_TIMEOUT_S), REAPER_INTERVAL_S="1")
    idle = ["idle0", "idle1", "idle2"]
    for i, user in enumerate([*idle, "busy"]):
        assert (await call(http, (a, b)[i % 2], "POST", "/api/sandbox", user))[0] == 201
    loop = asyncio.get_running_loop()
    busy_since = loop.time()

    async def keep_busy() -> None:
        # Activity through B only; both reapers, A's included, read it from PostgreSQL.
        status, result = await run(http, b, "busy", "true")
        assert status == 200, f"the busy sandbox was stopped: {result}"

    async def idle_ones_reaped() -> bool:
        await keep_busy()
        states = [await state(http, a, user) for user in idle]
        return all(s == ("stopped", "idle") for s in states)

    await poll(idle_ones_reaped, timeout_s=IDLE_TIMEOUT_S + 20, interval_s=0.5)
    # Several more reaper passes on both, past the idle timeout since the busy one started.
    while loop.time() < busy_since + IDLE_TIMEOUT_S + 4:
        await keep_busy()
        await asyncio.sleep(0.5)
    assert await state(http, a, "busy") == ("running", None)

    logs = {gateway.name: gateway.log_text() for gateway in (a, b)}
    for user in idle:
        stops = {
            name: len(re.findall(rf"stopped sandbox of {user} \(idle\)", text)) for name, text in logs.items()
        }
        assert sum(stops.values()) == 1, (user, stops)
    for name, text in logs.items():
        assert "busy" not in "".join(re.findall(r"reaped \d+ idle sandboxes: .*", text)), name
        for trouble in ("ERROR", "Traceback", "reaper pass failed", "WARNING"):
            assert trouble not in text, (name, trouble, text[-3000:])
    conn = await asyncpg.connect(settings.database_url)
    try:
        reasons = await conn.fetch("SELECT user_id, state, stop_reason FROM sessions ORDER BY user_id")
    finally:
        await conn.close()
    assert [tuple(r) for r in reasons] == [
        ("busy", "running", None),
        *((user, "stopped", "idle") for user in idle),
    ]


async def test_a_gateway_starting_up_never_stops_what_another_just_started(
    make_client: MakeClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    """A gateway reconciles at start, while another may be starting sandboxes. Here the starting
    gateway's database pool is held busy, so that its reconciliation waits, while the other starts a
    sandbox from beginning to end; what the reconciliation then finds must leave it running."""
    running, starting = await make_client(), await make_client()
    pool = starting.app[DB]
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        reconciling = asyncio.ensure_future(starting.app[SANDBOXES].reconcile())
        assert (await running.post("/api/sandbox", headers=auth("alice"))).status == 201
    finally:
        for conn in held:
            await pool.release(conn)
    await reconciling
    body = await (await running.get("/api/sandbox", headers=auth("alice"))).json()
    assert (body["state"], body["stop_reason"]) == ("running", None)
    [container] = await containers_of(docker, settings)
    assert container["State"] == "running"
