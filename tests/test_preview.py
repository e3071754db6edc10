"""The preview proxy against a real HTTP + WebSocket server in a real sandbox (tests/fixtures/upstream.js)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from yarl import URL

from gateway.keys import ACTIVITY, DB
from gateway.settings import Settings

from .helpers import MakeClient, auth, poll, running_container_id

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

UPSTREAM_JS = Path(__file__).parent / "fixtures" / "upstream.js"


async def start_upstream(client: TestClient, docker: aiodocker.Docker, user: str) -> None:
    """Starts the fixture server on port 5173 of the user's sandbox, detached from any run."""
    source = await asyncio.to_thread(UPSTREAM_JS.read_text)
    written = await client.post(
        "/api/sandbox/exec",
        headers=auth(user),
        json={"language": "bash", "code": "cat > /workspace/upstream.js", "stdin": source},
    )
    assert (await written.json())["exit_code"] == 0
    container = docker.containers.container(await running_container_id(client, user))
    execution = await container.exec(["node", "/workspace/upstream.js"], user="sandbox", workdir="/workspace")
    await execution.start(detach=True)


# The two routes to a preview: the sandbox's own origin, served from the root, and the path route.
ROUTES = ("root", "path")


class Preview:
    """Requests to a user's preview, as a script would send them: on the sandbox's own origin
    (`root_url`, from the API) or under /preview/<user>/ on the shared preview origin."""

    def __init__(
        self,
        client: TestClient,
        settings: Settings,
        user: str,
        http: aiohttp.ClientSession | None = None,
        root_url: str | None = None,
    ) -> None:
        self.client = client
        self.user = user
        self.route = "path" if root_url is None else "root"
        if root_url is None:
            self.host = settings.preview_host
            self.prefix = f"/preview/{user}/"
            self.origin = settings.preview_origin
        else:
            self.host = URL(root_url).raw_authority
            self.prefix = "/"
            self.origin = root_url.rstrip("/")
        # A browser keeps the preview origin's connections apart from the page's; a session of its own
        # does the same, so that previews meet the front door rather than a connection it handed over.
        self.http: aiohttp.ClientSession | TestClient = http or client

    def url(self, path: str) -> URL:
        return URL(f"{self.prefix}{path.lstrip('/')}", encoded=True)

    async def request(
        self, method: str, path: str, as_user: str | None = None, **kwargs: Any
    ) -> aiohttp.ClientResponse:
        headers = {"Host": self.host, **auth(as_user or self.user), **kwargs.pop("headers", {})}
        return await self.http.request(
            method, self.url(path), headers=headers, allow_redirects=False, **kwargs
        )

    async def echo(self, method: str = "GET", path: str = "echo", **kwargs: Any) -> dict[str, Any]:
        response = await self.request(method, path, **kwargs)
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def ready_preview(
    client: TestClient,
    settings: Settings,
    docker: aiodocker.Docker,
    http: aiohttp.ClientSession | None = None,
    route: str = "path",
) -> Preview:
    """Alice's sandbox, started, with the fixture server answering on its preview."""
    started = await client.post("/api/sandbox", headers=auth("alice"))
    assert started.status == 201
    await start_upstream(client, docker, "alice")
    root_url = (await started.json())["preview_url"] if route == "root" else None
    alice = Preview(client, settings, "alice", http, root_url)
    await poll(lambda: listening(alice), timeout_s=20)
    return alice


async def root_url_of(client: TestClient, user: str) -> str:
    response = await client.get("/api/sandbox", headers=auth(user))
    assert response.status == 200, await response.text()
    url: str = (await response.json())["preview_url"]
    return url


async def listening(preview: Preview) -> bool:
    return (await preview.request("GET", "echo")).status == 200


@pytest.fixture(params=ROUTES)
async def preview(
    client: TestClient,
    settings: Settings,
    docker: aiodocker.Docker,
    preview_http: aiohttp.ClientSession,
    request: pytest.FixtureRequest,
) -> Preview:
    """Alice's running preview, on each route in turn."""
    return await ready_preview(client, settings, docker, preview_http, request.param)


async def test_methods_bodies_and_query_strings_pass_untouched(preview: Preview) -> None:
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        body = b"payload-" + method.encode() if method not in ("GET", "OPTIONS") else b""
        echoed = await preview.echo(method, "echo?a=1&b=%2F&c=%20x&a=2", data=body)
        assert echoed["method"] == method
        assert echoed["url"] == f"{preview.prefix}echo?a=1&b=%2F&c=%20x&a=2"
        assert echoed["size"] == len(body)
        assert echoed["sha256"] == hashlib.sha256(body).hexdigest()
    head = await preview.request("HEAD", "echo")
    assert head.status == 200
    assert await head.read() == b""


async def test_large_upload_and_download_are_streamed(preview: Preview) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(20):
            digest.update(chunk)
            yield chunk

    echoed = await preview.echo("POST", "echo", data=body())
    assert echoed["size"] == 20 * len(chunk)
    assert echoed["sha256"] == digest.hexdigest()

    response = await preview.request("GET", "big?mb=50")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(50 * 2**20)
    received = 0
    async for piece in response.content.iter_chunked(2**20):
        received += len(piece)
    assert received == 50 * 2**20


async def test_server_sent_events_arrive_as_they_are_sent(preview: Preview) -> None:
    started = time.monotonic()
    response = await preview.request("GET", "sse")
    assert response.headers["Content-Type"].startswith("text/event-stream")
    arrivals = []
    async for line in response.content:
        if line.startswith(b"data:"):
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 3
    # 700 ms apart at the source; a buffering proxy would deliver them together at the end.
    assert arrivals[1] - arrivals[0] > 0.4
    assert arrivals[2] - arrivals[1] > 0.4


async def test_headers_hop_by_hop_forwarded_and_credentials(preview: Preview) -> None:
    echoed = await preview.echo(
        headers={
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "1",
            "Keep-Alive": "timeout=5",
            "X-Custom": "kept",
            "Cookie": "theme=dark; sandbox_preview=forged; lang=en",
            "X-Forwarded-For": "10.1.2.3",
        }
    )
    headers = echoed["headers"]
    assert headers["host"] == "localhost:5173"
    assert headers["x-forwarded-host"] == preview.host
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert headers["x-custom"] == "kept"
    assert headers["cookie"] == "theme=dark; lang=en"
    for gone in ("x-private-hop", "keep-alive", "authorization"):
        assert gone not in headers


async def test_redirects_and_cookies_stay_inside_the_prefix(preview: Preview) -> None:
    own = await preview.request("GET", "redirect-own-origin")
    assert (own.status, own.headers["Location"]) == (302, f"{preview.prefix}target?x=1")
    root = await preview.request("GET", "redirect-root")
    assert root.headers["Location"] == f"{preview.prefix}elsewhere"
    away = await preview.request("GET", "redirect-away")
    assert away.headers["Location"] == "https://example.org/"

    cookies = await preview.request("GET", "cookies")
    set_cookies = cookies.headers.getall("Set-Cookie")
    assert any(
        c.startswith("wide=1") and f"Path={preview.prefix}" in c and "Domain" not in c for c in set_cookies
    )
    assert any(c.startswith("narrow=2") and f"Path={preview.prefix}sub" in c for c in set_cookies)
    assert "Service-Worker-Allowed" not in cookies.headers
    assert (await preview.request("GET", "status/418")).status == 418


@pytest.mark.runtimes
async def test_websocket_subprotocol_frames_pings_and_close_codes(preview: Preview) -> None:
    headers = {"Host": preview.host, **auth("alice")}
    ws = await preview.http.ws_connect(
        preview.url("ws?token=abc"), headers=headers, protocols=["vite-hmr"], autoping=False
    )
    assert ws.protocol == "vite-hmr"
    await ws.send_str("héllo")
    assert (await ws.receive()).data == "héllo"
    await ws.send_bytes(b"\x00\xff binary")
    message = await ws.receive()
    assert (message.type, message.data) == (WSMsgType.BINARY, b"\x00\xff binary")
    await ws.ping(b"are you there")
    pong = await ws.receive()
    assert (pong.type, pong.data) == (WSMsgType.PONG, b"are you there")
    await ws.send_str("whoami")
    seen = json.loads((await ws.receive()).data)
    assert seen["url"] == f"{preview.prefix}ws?token=abc"
    assert "authorization" not in seen["headers"]
    await ws.send_str("close:4321")
    closing = await ws.receive()
    assert closing.type == WSMsgType.CLOSE
    assert ws.close_code == 4321


async def test_only_the_owner_sees_a_preview(preview: Preview, settings: Settings) -> None:
    assert (await preview.request("GET", "echo", as_user="bob")).status == 403
    anonymous = await preview.client.get(preview.url("echo"), headers={"Host": preview.host})
    assert anonymous.status == 401
    assert (await anonymous.json())["error"]["code"] == "unauthorized"
    browser = await preview.client.get(
        preview.url("echo"), headers={"Host": preview.host, "Accept": "text/html"}
    )
    assert browser.status == 401
    assert "sign in" in (await browser.text()).lower()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await preview.client.ws_connect(preview.url("ws"), headers={"Host": preview.host, **auth("bob")})
    assert refused.value.status == 403


async def test_browser_cookie_flow(preview: Preview, settings: Settings) -> None:
    session = await preview.client.post("/api/sandbox/preview-session", headers=auth("alice"))
    assert session.status == 200
    urls = await session.json()
    ours, other = (
        ("login_url", "path_login_url") if preview.route == "root" else ("path_login_url", "login_url")
    )
    login_url = URL(urls[ours])
    assert login_url.raw_authority == preview.host
    login = await preview.client.get(login_url.path_qs, headers={"Host": preview.host}, allow_redirects=False)
    assert login.status == 303
    assert login.headers["Location"] == preview.prefix
    cookie = login.cookies["sandbox_preview"]
    assert cookie["path"] == preview.prefix
    assert cookie["httponly"]
    assert cookie["samesite"] == "Lax"
    assert not cookie["domain"], "host-only: never sent to a sibling preview origin"
    # The link works once: leaked from a history or a referrer, it opens nothing.
    again = await preview.client.get(login_url.path_qs, headers={"Host": preview.host}, allow_redirects=False)
    assert again.status == 401
    assert "used already" in (await again.json())["error"]["message"]
    headers = {"Host": preview.host, "Cookie": f"sandbox_preview={cookie.value}; theme=dark"}
    echoed = await preview.client.get(preview.url("echo"), headers=headers)
    assert echoed.status == 200
    # The credential never reaches the dev server.
    assert (await echoed.json())["headers"]["cookie"] == "theme=dark"
    # It opens this preview only, and never the API.
    api = await preview.client.get("/api/sandbox", headers={"Cookie": f"sandbox_preview={cookie.value}"})
    assert api.status == 401
    # A forged or expired ticket gets nothing, nor does the other route's ticket here.
    for ticket in ("forged", URL(urls[other]).query["ticket"]):
        refused = await preview.client.get(
            login_url.with_query(ticket=ticket).path_qs, headers={"Host": preview.host}, allow_redirects=False
        )
        assert refused.status == 401
        assert "sandbox_preview" not in refused.cookies


@pytest.mark.parametrize(
    "raw_path",
    [
        "/preview/alice/../bob/echo",
        "/preview/alice/%2e%2e/bob/echo",
        "/preview/bob/../alice/echo",
        "/preview/al%69ce/echo",
        "/preview/alice/" + "a" * 9000,
    ],
)
async def test_path_tricks_never_reach_another_sandbox(preview: Preview, raw_path: str) -> None:
    response = await preview.client.get(
        URL(raw_path, encoded=True), headers={"Host": preview.host, **auth("bob")}, allow_redirects=False
    )
    # bob has no sandbox; whatever the path says, no answer comes from alice's server to bob.
    assert response.status in (400, 403, 404, 409, 414, 431), (raw_path, response.status)


@pytest.mark.parametrize("route", ROUTES)
async def test_dev_server_not_running_and_sandbox_stopped(
    client: TestClient, settings: Settings, route: str
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    root_url = await root_url_of(client, "alice") if route == "root" else None
    preview = Preview(client, settings, "alice", root_url=root_url)
    response = await preview.request("GET", "")
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "dev_server_not_running"
    page = await preview.request("GET", "", headers={"Accept": "text/html"})
    assert page.status == 502
    assert "port 5173" in await page.text()

    assert (await client.delete("/api/sandbox", headers=auth("alice"))).status == 204

    async def stopped() -> bool:
        return (await preview.request("GET", "")).status == 409

    await poll(stopped)
    page = await preview.request("GET", "", headers={"Accept": "text/html"})
    # The path route says so; the sandbox's own origin offers its owner to start it (waking up).
    assert ("Start it" if route == "root" else "not running") in await page.text()


async def test_browsers_on_the_main_origin_are_sent_to_the_preview_origin(
    client: TestClient, settings: Settings
) -> None:
    response = await client.get("/preview/alice/src/main.js?v=1", allow_redirects=False)
    assert response.status == 307
    assert response.headers["Location"] == f"{settings.preview_origin}/preview/alice/src/main.js?v=1"
    slash = await client.get("/preview/alice", headers={"Host": settings.preview_host}, allow_redirects=False)
    assert slash.headers["Location"] == "/preview/alice/"


@pytest.mark.parametrize("route", ROUTES)
async def test_busy_preview_makes_no_write_storm(
    make_client: MakeClient, settings: Settings, docker: aiodocker.Docker, route: str
) -> None:
    client = await make_client(activity_interval_s=5.0)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    await start_upstream(client, docker, "alice")
    root_url = await root_url_of(client, "alice") if route == "root" else None
    preview = Preview(client, settings, "alice", root_url=root_url)
    # Idle before the first preview request, whose activity write the 200 below must then not repeat.
    await set_idle(client)
    before = client.app[ACTIVITY].writes
    await poll(lambda: listening(preview))
    for _ in range(200):
        assert (await preview.request("GET", "echo")).status == 200
    # 200 requests in a few seconds: at most a write or two, and last_activity did move.
    assert client.app[ACTIVITY].writes - before <= 2
    assert await activity_moved(client)


async def set_idle(client: TestClient) -> None:
    """Sets last_activity far back, so that any activity recorded after shows."""
    async with client.app[DB].acquire() as conn:
        await conn.execute("UPDATE sessions SET last_activity = '2000-01-01'")


async def activity_moved(client: TestClient) -> bool:
    async with client.app[DB].acquire() as conn:
        return bool(await conn.fetchval("SELECT last_activity > '2001-01-01' FROM sessions"))


@pytest.mark.parametrize("route", ROUTES)
async def test_preview_websocket_traffic_counts_as_activity_and_silence_does_not(
    make_client: MakeClient, settings: Settings, docker: aiodocker.Docker, route: str
) -> None:
    client = await make_client(activity_interval_s=0.2)
    preview = await ready_preview(client, settings, docker, route=route)
    ws = await client.ws_connect(preview.url("ws"), headers={"Host": preview.host, **auth("alice")})
    await set_idle(client)

    async def chatting() -> bool:
        await ws.send_str("ping")
        assert (await ws.receive()).data == "ping"
        return await activity_moved(client)

    await poll(chatting, timeout_s=10)
    # Observation windows, not synchronisation: let the recorder note the last bytes of the chat, then
    # watch five recording intervals of an open, silent socket.
    await asyncio.sleep(0.5)
    await set_idle(client)
    await asyncio.sleep(1.0)
    assert not await activity_moved(client)
    await ws.close()


HANGING_SERVER = "require('net').createServer(() => {}).listen(5173, '0.0.0.0')"


async def hanging_preview(client: TestClient, settings: Settings, docker: aiodocker.Docker) -> Preview:
    """Alice's preview, in front of a dev server that accepts every connection and never answers."""
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    container = docker.containers.container(await running_container_id(client, "alice"))
    execution = await container.exec(["node", "-e", HANGING_SERVER], user="sandbox")
    await execution.start(detach=True)
    preview = Preview(client, settings, "alice", root_url=await root_url_of(client, "alice"))

    async def accepting() -> bool:
        # 502 while nothing listens yet; then the request is taken and hangs (or, with a short
        # response timeout, the gateway says 504).
        try:
            answer = await preview.request("GET", "", timeout=aiohttp.ClientTimeout(total=3))
        except TimeoutError:
            return True
        return answer.status == 504

    await poll(accepting, timeout_s=30)
    return preview


async def test_a_dev_server_that_never_answers_gets_a_504_from_both_transports(
    make_client: MakeClient, settings: Settings, docker: aiodocker.Docker
) -> None:
    client = await make_client(preview_response_timeout_s=1)
    preview = await hanging_preview(client, settings, docker)
    for method, extra in (("GET", {}), ("POST", {"data": b"a body: aiohttp's transport"})):
        started = time.monotonic()
        answer = await preview.request(method, "slow", **extra)
        assert answer.status == 504, method
        assert (await answer.json())["error"]["code"] == "dev_server_timeout"
        assert time.monotonic() - started < 5
    page = await preview.request("GET", "", headers={"Accept": "text/html"})
    assert page.status == 504
    assert "did not start answering" in await page.text()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_abandoned_requests_release_their_upstream_connections_at_once(
    make_client: MakeClient, settings: Settings, docker: aiodocker.Docker
) -> None:
    """Clients that give up on a dev server that never answers: the gateway (in this process) lets go
    of every upstream connection long before its 30 s response timeout would."""
    client = await make_client(preview_response_timeout_s=30)
    preview = await hanging_preview(client, settings, docker)
    before = None
    async with aiohttp.ClientSession() as impatient:
        # The first round also grows the gateway's own pools (PostgreSQL's, while the port is looked
        # up): the baseline is taken after it, and each later round must give back what it took.
        for method, body in (("GET", None), ("GET", None), ("POST", b"x")):
            pending = [
                asyncio.ensure_future(
                    impatient.request(
                        method,
                        client.make_url(str(preview.url("hang"))),
                        headers={"Host": preview.host, **auth("alice")},
                        data=body,
                    )
                )
                for _ in range(40)
            ]
            await asyncio.sleep(0.5)  # an observation window: the requests reach the dev server
            for request in pending:
                request.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if before is None:
                await asyncio.sleep(1)  # an observation window: the first round settles
                before = open_descriptors()
                continue

            async def released(baseline: int = before) -> bool:
                return open_descriptors() <= baseline + 3

            # 40 abandoned requests held 80 descriptors (client and upstream sides) until the timeout.
            await poll(released, timeout_s=5)
