"""The processes API against real sandboxes: live output as server-sent events, stdin, signals,
background processes, reconnects through another gateway, the bounds, and isolation between users."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.settings import ProcessSettings, Settings

from .gateway_processes import StartGateways, call
from .helpers import MakeClient, auth, poll

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

PROCESSES = "/api/sandbox/processes"


@dataclass
class Event:
    name: str
    id: str | None
    data: dict[str, Any]
    at: float  # time.monotonic() when it arrived


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """The server-sent events of a response, each as it arrives."""
    name, event_id, data = "message", None, []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield Event(name, event_id, json.loads("\n".join(data)), time.monotonic())
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "id":
            event_id = value
        elif field == "data":
            data.append(value)


async def start(client: TestClient, user: str = "alice", status: int = 201, **body: Any) -> dict[str, Any]:
    response = await client.post(PROCESSES, headers=auth(user), json=body)
    assert response.status == status, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def follow(
    client: TestClient,
    process_id: str,
    user: str = "alice",
    headers: dict[str, str] | None = None,
    **query: str,
) -> list[Event]:
    """Every event of the process's output stream up to its exit event."""
    url = f"{PROCESSES}/{process_id}/output"
    async with client.get(url, headers={**auth(user), **(headers or {})}, params=query) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        seen = []
        async for event in events(response):
            seen.append(event)
            if event.name == "exit":
                break
        return seen


def text(seen: list[Event], name: str = "stdout") -> str:
    return "".join(e.data["text"] for e in seen if e.name == name)


def raw_bytes(seen: list[Event], name: str = "stdout") -> bytes:
    """The bytes as written: base64 where they are not UTF-8, the text where they are."""
    return b"".join(
        base64.b64decode(e.data["base64"]) if "base64" in e.data else e.data["text"].encode()
        for e in seen
        if e.name == name
    )


@pytest.fixture
async def sandbox(client: TestClient) -> TestClient:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    return client


async def bounded(make_client: MakeClient, settings: Settings, **changes: Any) -> TestClient:
    client = await make_client(processes=replace(ProcessSettings(), **changes))
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    return client


async def test_output_streams_as_it_is_written_then_the_exit(sandbox: TestClient) -> None:
    process = await start(sandbox, argv=["bash", "-c", "echo a; sleep 1; echo b; exit 3"])
    assert process["state"] == "running"
    seen = await follow(sandbox, process["id"])
    a, b = (next(e for e in seen if e.name == "stdout" and e.data["text"] == f"{x}\n") for x in "ab")
    # `a` arrived before `b` was even written, a second later.
    assert b.at - a.at > 0.8
    assert seen[-1].name == "exit"
    assert seen[-1].data == {"exit_code": 3, "signal": None, "timed_out": False}
    # Ids are offsets just past each event's bytes.
    assert (a.id, b.id, seen[-1].id) == ("2", "4", "4")


async def test_stdout_and_stderr_apart_and_non_utf8_as_base64(sandbox: TestClient) -> None:
    code = (
        "import sys; print('out', flush=True); print('err', file=sys.stderr, flush=True);"
        " sys.stdout.buffer.write(b'\\xff\\xfe')"
    )
    process = await start(sandbox, language="python", code=code)
    seen = await follow(sandbox, process["id"])
    assert text(seen, "stderr") == "err\n"
    assert any("base64" in e.data for e in seen)
    assert raw_bytes(seen, "stdout") == b"out\n\xff\xfe"


async def test_a_background_process_outlives_its_client_is_listed_and_ends_by_signal(
    sandbox: TestClient, make_client: MakeClient
) -> None:
    # One write (python -u writes print's end apart).
    code = "import sys, time; sys.stdout.write('up\\n'); time.sleep(600)"
    process = await start(sandbox, language="python", code=code, background=True)
    assert (process["background"], process["timeout_ms"]) == (True, None)
    # A stream that reads the first line and goes away.
    async with sandbox.get(f"{PROCESSES}/{process['id']}/output", headers=auth("alice")) as response:
        async for event in events(response):
            if event.name == "stdout":
                assert event.data["text"] == "up\n"
                break
    # Another client (another gateway on the same database) lists it, still running.
    other = await make_client()
    listed = await (await other.get(PROCESSES, headers=auth("alice"))).json()
    mine = [p for p in listed["processes"] if p["id"] == process["id"]]
    assert [p["state"] for p in mine] == ["running"]
    signalled = await other.post(
        f"{PROCESSES}/{process['id']}/signal", headers=auth("alice"), json={"signal": "SIGTERM"}
    )
    assert signalled.status == 200, await signalled.text()
    seen = await follow(other, process["id"])
    assert text(seen) == "up\n"
    assert seen[-1].data == {"exit_code": 143, "signal": "SIGTERM", "timed_out": False}
    ended = await (await other.get(f"{PROCESSES}/{process['id']}", headers=auth("alice"))).json()
    assert (ended["state"], ended["exit_code"], ended["signal"]) == ("exited", 143, "SIGTERM")
    # Signalling an ended process is a conflict; DELETE too.
    again = await other.delete(f"{PROCESSES}/{process['id']}", headers=auth("alice"))
    assert again.status == 409


async def test_delete_kills_every_process_of_it(sandbox: TestClient) -> None:
    process = await start(sandbox, argv=["bash", "-c", "setsid sleep 600 & sleep 600"], background=True)
    assert (await sandbox.delete(f"{PROCESSES}/{process['id']}", headers=auth("alice"))).status == 204
    seen = await follow(sandbox, process["id"])
    assert seen[-1].data["signal"] == "SIGKILL"
    check = await sandbox.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "bash", "code": "pgrep -c sleep || true"},
    )
    assert (await check.json())["stdout"] == "0\n"


async def test_stdin_writes_then_close(sandbox: TestClient) -> None:
    process = await start(sandbox, argv=["cat"])
    assert process["stdin_open"] is True
    url = f"{PROCESSES}/{process['id']}/stdin"
    assert (await sandbox.post(url, headers=auth("alice"), data=b"hello ")).status == 204
    assert (
        await sandbox.post(url, headers=auth("alice"), data=b"world", params={"eof": "true"})
    ).status == 204
    seen = await follow(sandbox, process["id"])
    assert text(seen) == "hello world"
    assert seen[-1].data["exit_code"] == 0
    closed = await sandbox.post(url, headers=auth("alice"), data=b"more")
    assert closed.status == 409
    # Input given at the start: those bytes, then the end.
    given = await start(sandbox, argv=["wc", "-c"], stdin="12345")
    assert text(await follow(sandbox, given["id"])).strip() == "5"


async def test_cwd_env_and_no_agent_secret(sandbox: TestClient) -> None:
    process = await start(sandbox, argv=["bash", "-c", "pwd; env"], cwd="/tmp", env={"GREETING": "hi"})
    output = text(await follow(sandbox, process["id"]))
    lines = output.splitlines()
    assert lines[0] == "/tmp"
    assert "GREETING=hi" in lines
    assert "SANDBOX_AGENT_SECRET" not in output
    run = await sandbox.post(
        "/api/sandbox/exec", headers=auth("alice"), json={"language": "bash", "code": "env"}
    )
    assert "SANDBOX_AGENT_SECRET" not in (await run.json())["stdout"]
    # Asking for it does not bring the real one back either: the agent gave it up at its start.
    asked = await start(sandbox, argv=["printenv", "SANDBOX_AGENT_SECRET"], env={"SANDBOX_AGENT_SECRET": "x"})
    assert text(await follow(sandbox, asked["id"])) in ("", "x\n")


async def test_a_foreground_process_ends_at_its_timeout(sandbox: TestClient) -> None:
    process = await start(sandbox, argv=["sleep", "30"], timeout_ms=300)
    started = time.monotonic()
    seen = await follow(sandbox, process["id"])
    assert time.monotonic() - started < 5
    assert seen[-1].data == {"exit_code": 137, "signal": "SIGKILL", "timed_out": True}


async def test_reconnect_through_another_gateway_gets_what_was_missed(
    start_gateways: StartGateways, http: aiohttp.ClientSession
) -> None:
    one, two = await start_gateways("one", "two")
    assert (await call(http, one, "POST", "/api/sandbox", "carol"))[0] == 201
    program = "for i in 1 2 3 4 5; do echo line$i; sleep 0.2; done"
    status, process = await call(
        http, one, "POST", PROCESSES, "carol", json={"argv": ["bash", "-c", program]}
    )
    assert status == 201, process
    url = f"{PROCESSES}/{process['id']}/output"
    async with http.get(f"{one.url}{url}", headers=auth("carol")) as response:
        async for event in events(response):
            if event.name == "stdout":
                first, last_id = event.data["text"], event.id
                break
    assert first == "line1\n"

    async def ended() -> bool:
        _, described = await call(http, two, "GET", f"{PROCESSES}/{process['id']}", "carol")
        return bool(described["state"] == "exited")

    await poll(ended, timeout_s=10)
    assert last_id is not None
    resumed = []
    async with http.get(f"{two.url}{url}", headers={**auth("carol"), "Last-Event-ID": last_id}) as response:
        async for event in events(response):
            resumed.append(event)
            if event.name == "exit":
                break
    assert first + text(resumed) == "".join(f"line{i}\n" for i in range(1, 6))
    # EventSource reconnecting after the end: 204, which stops it.
    final = resumed[-1].id
    assert final is not None
    async with http.get(f"{two.url}{url}", headers={**auth("carol"), "Last-Event-ID": final}) as response:
        assert response.status == 204
    # ?from= replays from any offset, here from the start.
    async with http.get(f"{two.url}{url}", headers=auth("carol"), params={"from": "0"}) as response:
        replay = [e async for e in events(response)]
    assert text(replay).startswith("line1\nline2\n")


AGENT_RSS = (
    "import os\n"
    "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
    "    try: cmd = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
    "    except OSError: continue\n"
    "    if b'sandbox-agent' in cmd and b'python' in cmd:\n"
    "        print([l.split()[1] for l in open(f'/proc/{pid}/status') if l.startswith('VmRSS')][0])\n"
)


async def _agent_rss_kib(client: TestClient) -> int:
    run = await client.post(
        "/api/sandbox/exec", headers=auth("alice"), json={"language": "python", "code": AGENT_RSS}
    )
    return int((await run.json())["stdout"].split()[0])


async def test_a_flood_shows_a_gap_and_memory_stays_bounded(
    make_client: MakeClient, settings: Settings
) -> None:
    limit = 64 * 1024
    client = await bounded(make_client, settings, max_buffer_bytes=limit)
    before = await _agent_rss_kib(client)
    flood = 16 * 1024 * 1024
    process = await start(client, argv=["head", "-c", str(flood), "/dev/zero"], timeout_ms=60_000)

    async def ended() -> bool:
        described = await (await client.get(f"{PROCESSES}/{process['id']}", headers=auth("alice"))).json()
        return bool(described["state"] == "exited")

    await poll(ended, timeout_s=30, interval_s=0.2)
    after = await _agent_rss_kib(client)
    assert after - before < 8 * 1024, (before, after)
    seen = await follow(client, process["id"], **{"from": "0"})
    assert seen[0].name == "gap"
    assert seen[0].data == {"from": 0, "to": flood - limit, "dropped": flood - limit}
    kept = raw_bytes(seen)
    assert kept == b"\0" * limit
    assert seen[-1].id == str(flood)


async def test_bounds_answer_429_and_400(make_client: MakeClient, settings: Settings) -> None:
    client = await bounded(
        make_client, settings, max_per_user=2, max_streams_per_user=1, max_ended_per_user=1
    )
    first = await start(client, argv=["sleep", "600"], background=True)
    await start(client, argv=["sleep", "600"], background=True)
    refused = await start(client, status=429, argv=["true"])
    assert refused["error"]["code"] == "too_many"
    async with client.get(f"{PROCESSES}/{first['id']}/output", headers=auth("alice")) as stream:
        assert stream.status == 200
        second = await client.get(f"{PROCESSES}/{first['id']}/output", headers=auth("alice"))
        assert second.status == 429

    async def slot_free_again() -> bool:
        async with client.get(f"{PROCESSES}/{first['id']}/output", headers=auth("alice")) as again:
            return again.status == 200

    # A client that went away frees its slot within a second or so, not at the next heartbeat.
    await poll(slot_free_again, timeout_s=5, interval_s=0.2)
    # Bad input, each named.
    for body, field in [
        ({"argv": ["pwd"], "cwd": "/etc"}, "cwd"),
        ({"argv": ["pwd"], "cwd": "/workspace/../etc"}, "cwd"),
        ({"argv": ["sleep", "1"], "background": True, "timeout_ms": 5}, "timeout_ms"),
        ({"argv": ["true"], "language": "bash", "code": "true"}, "body"),
        ({"argv": []}, "argv"),
        ({"argv": ["env"], "env": {"A=B": "c"}}, "env"),
        ({"argv": ["true"], "bogus": 1}, "bogus"),
    ]:
        answer = await start(client, status=400, **body)
        assert answer["error"]["message"].startswith(field), answer
    bad_signal = await client.post(
        f"{PROCESSES}/{first['id']}/signal", headers=auth("alice"), json={"signal": "SIGSEGV"}
    )
    assert bad_signal.status == 400
    for process in (await (await client.get(PROCESSES, headers=auth("alice"))).json())["processes"]:
        await client.delete(f"{PROCESSES}/{process['id']}", headers=auth("alice"))

    async def one_ended_kept() -> bool:
        listed = (await (await client.get(PROCESSES, headers=auth("alice"))).json())["processes"]
        return len(listed) == 1 and listed[0]["state"] == "exited"

    # At most one ended process is kept: the older go.
    await poll(one_ended_kept)


async def test_another_user_cannot_see_or_touch_my_processes(sandbox: TestClient) -> None:
    process = await start(sandbox, argv=["sleep", "600"], background=True)
    assert (await sandbox.post("/api/sandbox", headers=auth("bob"))).status == 201
    url = f"{PROCESSES}/{process['id']}"
    bob = auth("bob")
    assert (await (await sandbox.get(PROCESSES, headers=bob)).json())["processes"] == []
    for method, path, kwargs in [
        ("GET", url, {}),
        ("GET", f"{url}/output", {}),
        ("POST", f"{url}/stdin", {"data": b"x"}),
        ("POST", f"{url}/signal", {"json": {"signal": "SIGKILL"}}),
        ("DELETE", url, {}),
        ("GET", f"{PROCESSES}/not-an-id", {}),
    ]:
        response = await sandbox.request(method, path, headers=bob, **kwargs)
        assert response.status == 404, (method, path)
        assert (await response.json())["error"]["code"] == "process_not_found"
    mine = await (await sandbox.get(url, headers=auth("alice"))).json()
    assert mine["state"] == "running"


async def test_an_idle_stream_carries_heartbeats(make_client: MakeClient, settings: Settings) -> None:
    client = await bounded(make_client, settings, heartbeat_s=0.2)
    process = await start(client, argv=["sleep", "600"], background=True)
    async with client.get(f"{PROCESSES}/{process['id']}/output", headers=auth("alice")) as response:
        assert response.headers["Cache-Control"].startswith("no-cache")
        assert response.headers["X-Accel-Buffering"] == "no"
        comments = 0
        async with asyncio.timeout(10):
            async for raw in response.content:
                comments += raw == b": keep-alive\n"
                if comments == 2:
                    break
    assert comments == 2
    await client.delete(f"{PROCESSES}/{process['id']}", headers=auth("alice"))
