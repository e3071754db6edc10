"""Any port of a sandbox at its own origin, `<port>-<label>.<preview domain>`, through the sandbox's
agent: servers on every address (loopback only included), HTTP and WebSocket, nothing listening,
the agent's own port, the same credentials and isolation as the default route, and the ports list,
on a real gateway, sandbox and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Page, expect
from yarl import URL

from gateway.preview_hosts import origin_of_host
from gateway.settings import Settings

from .helpers import MakeClient, auth, poll, running_container_id
from .test_preview import UPSTREAM_JS, root_url_of
from .test_preview_browser import preview_frame, sign_in_and_start
from .test_preview_origins import new_share, open_link

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

LABEL = "pabcdefghijklmnop"


def test_port_origins_map_exactly() -> None:
    suffix = ".preview.sandbox.localhost:8080"
    assert origin_of_host(f"{LABEL}{suffix}", suffix) == (LABEL, None)
    assert origin_of_host(f"8000-{LABEL}{suffix}", suffix) == (LABEL, 8000)
    assert origin_of_host(f"1-{LABEL.upper()}{suffix.upper()}", suffix) == (LABEL, 1)
    assert origin_of_host(f"65535-{LABEL}{suffix}", suffix) == (LABEL, 65535)
    for first in ("0", "08000", "65536", "123456", "-1", "80a", "", " 80"):
        assert origin_of_host(f"{first}-{LABEL}{suffix}", suffix) is None, first
    for host in (f"8000-{LABEL}-x{suffix}", f"8000.{LABEL}{suffix}", f"x.8000-{LABEL}{suffix}"):
        assert origin_of_host(host, suffix) is None, host


async def start_server(
    client: TestClient,
    docker: aiodocker.Docker,
    user: str,
    argv: list[str],
    env: dict[str, str] | None = None,
) -> None:
    """Starts argv as the user in their sandbox, detached from any run."""
    container = docker.containers.container(await running_container_id(client, user))
    environment = [f"{name}={value}" for name, value in (env or {}).items()]
    execution = await container.exec(argv, user="sandbox", workdir="/workspace", environment=environment)
    await execution.start(detach=True)


class Ports:
    """Alice's sandbox, with requests to any port's origin as a script sends them."""

    def __init__(self, client: TestClient, http: aiohttp.ClientSession | TestClient, root_url: str) -> None:
        self.client = client
        self.http = http
        root = URL(root_url).raw_authority
        self.label, self.domain = root.split(".", 1)

    def host(self, port: int, label: str | None = None) -> str:
        return f"{port}-{label or self.label}.{self.domain}"

    async def get(
        self, port: int, path: str = "/", user: str = "alice", **kwargs: Any
    ) -> aiohttp.ClientResponse:
        headers = {"Host": self.host(port), **auth(user), **kwargs.pop("headers", {})}
        return await self.http.get(URL(path, encoded=True), headers=headers, allow_redirects=False, **kwargs)

    async def answers(self, port: int, path: str = "/") -> bool:
        return (await self.get(port, path)).status == 200


@pytest.fixture
async def ports(client: TestClient, docker: aiodocker.Docker, preview_http: aiohttp.ClientSession) -> Ports:
    started = await client.post("/api/sandbox", headers=auth("alice"))
    assert started.status == 201
    source = await asyncio.to_thread(UPSTREAM_JS.read_text)
    written = await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "bash", "code": "cat > /workspace/upstream.js", "stdin": source},
    )
    assert (await written.json())["exit_code"] == 0
    return Ports(client, preview_http, (await started.json())["preview_url"])


async def test_servers_on_every_address_are_reached_http_and_websocket(
    ports: Ports, client: TestClient, docker: aiodocker.Docker
) -> None:
    upstream = ["node", "/workspace/upstream.js"]
    await start_server(client, docker, "alice", upstream, {"PORT": "8001", "HOST": "0.0.0.0"})  # noqa: S104
    await start_server(client, docker, "alice", upstream, {"PORT": "8002", "HOST": "127.0.0.1"})
    # As a user types it: only the sandbox's loopback.
    await start_server(
        client, docker, "alice", ["python3", "-m", "http.server", "--bind", "127.0.0.1", "8000"]
    )
    for port, path in ((8000, "/"), (8001, "/echo"), (8002, "/echo")):
        await poll(lambda port=port, path=path: ports.answers(port, path), timeout_s=20)
    listing = await (await ports.get(8000, "/")).text()
    assert "Directory listing" in listing
    for port in (8001, 8002):
        echoed = await (await ports.get(port, "/echo?x=1")).json()
        assert echoed["url"] == "/echo?x=1"
        assert echoed["headers"]["host"] == f"localhost:{port}"
        assert echoed["headers"]["x-forwarded-host"] == ports.host(port)
        assert "authorization" not in echoed["headers"]
        # Streamed through the relay, both ways, with the backpressure of a slow reader.
        big = await ports.get(port, "/big?mb=20")
        assert big.headers["Content-Length"] == str(20 * 2**20)
        assert len(await big.read()) == 20 * 2**20
        payload = bytes(range(256)) * 4096
        posted = await ports.http.post(
            "/echo", data=payload, headers={"Host": ports.host(port), **auth("alice")}
        )
        assert (await posted.json())["size"] == len(payload)
        # The WebSocket: through the front door (a connection of the preview's own) and through
        # aiohttp (the API client's connections, which the front door handed over).
        for http in (ports.http, client):
            ws = await http.ws_connect(
                "/ws", headers={"Host": ports.host(port), **auth("alice")}, protocols=("vite-hmr",)
            )
            assert ws.protocol == "vite-hmr"
            for message in ("hi", "x" * 100_000):
                await ws.send_str(message)
                assert (await ws.receive()).data == message
            await ws.send_str("whoami")
            assert (await ws.receive_json())["headers"]["host"] == f"localhost:{port}"
            await ws.close()


async def test_nothing_listening_is_said_for_that_port(ports: Ports) -> None:
    response = await ports.get(8999)
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "dev_server_not_running"
    assert "port 8999" in error["message"]
    page = await ports.get(8999, headers={"Accept": "text/html"})
    assert page.status == 502
    assert "Nothing listens on port 8999 in your sandbox" in await page.text()
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await ports.http.ws_connect("/ws", headers={"Host": ports.host(8999), **auth("alice")})
    assert failed.value.status == 502


async def test_the_agents_port_and_impossible_ports_are_refused(ports: Ports, client: TestClient) -> None:
    answer = await ports.get(49983)
    assert answer.status == 404
    assert "49983" in (await answer.json())["error"]["message"]
    for first in ("0", "65536", "08000"):
        host = f"{first}-{ports.label}.{ports.domain}"
        assert (await ports.http.get("/", headers={"Host": host, **auth("alice")})).status == 404
    refused = await client.post("/api/sandbox/preview-session", headers=auth("alice"), json={"port": 49983})
    assert refused.status == 400
    for port in (0, 65536, "80"):
        body = {"port": port}
        assert (
            await client.post("/api/sandbox/preview-session", headers=auth("alice"), json=body)
        ).status == 400


async def test_port_origins_keep_the_default_routes_isolation(
    ports: Ports, client: TestClient, docker: aiodocker.Docker
) -> None:
    await start_server(client, docker, "alice", ["node", "/workspace/upstream.js"], {"PORT": "8001"})
    await poll(lambda: ports.answers(8001, "/echo"), timeout_s=20)
    # Bob's token on alice's port origin, and alice's on bob's, open nothing.
    assert (await ports.get(8001, "/echo", user="bob")).status == 403
    bob = await (await client.post("/api/sandbox/preview-session", headers=auth("bob"))).json()
    bob_label = URL(bob["preview_url"]).raw_authority.split(".", 1)[0]
    mine_on_bobs = await ports.http.get(
        "/echo", headers={"Host": ports.host(8001, bob_label), **auth("alice")}
    )
    assert mine_on_bobs.status == 403
    assert "x-sandbox-user" not in mine_on_bobs.headers
    # No credential at all.
    assert (await ports.http.get("/echo", headers={"Host": ports.host(8001)})).status == 401

    # The browser's way: a login link for this one port origin, a cookie bound to it alone.
    urls = await (
        await client.post("/api/sandbox/preview-session", headers=auth("alice"), json={"port": 8001})
    ).json()
    assert urls["port_url"] == f"http://{ports.host(8001)}/"
    login = URL(urls["port_login_url"])
    assert login.raw_authority == ports.host(8001)
    answer = await ports.http.get(login.path_qs, headers={"Host": login.raw_authority}, allow_redirects=False)
    assert answer.status == 303, await answer.text()
    cookie = answer.cookies["sandbox_preview"].value
    ports.http.cookie_jar.clear()
    with_cookie = {"Cookie": f"sandbox_preview={cookie}"}
    echoed = await ports.http.get("/echo", headers={"Host": ports.host(8001), **with_cookie})
    assert echoed.status == 200
    assert "cookie" not in (await echoed.json())["headers"], "our cookie never reaches the server"
    # The cookie of port 8001's origin opens neither the default origin nor another port's.
    root_host = URL(await root_url_of(client, "alice")).raw_authority
    for host in (root_host, ports.host(8002)):
        assert (await ports.http.get("/echo", headers={"Host": host, **with_cookie})).status == 401, host
    # Another origin's request carrying the cookie, and its WebSocket, are refused.
    foreign = {"Host": ports.host(8001), **with_cookie, "Origin": f"http://{ports.host(8002)}"}
    assert (await ports.http.get("/echo", headers=foreign)).status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await ports.http.ws_connect("/ws", headers=foreign)
    assert failed.value.status == 403
    # A login ticket of the default origin does not log in to a port's.
    default_login = URL(urls["login_url"])
    wrong = await ports.http.get(
        default_login.path_qs, headers={"Host": ports.host(8001)}, allow_redirects=False
    )
    assert wrong.status == 401

    # A share link shares the preview, not the sandbox's other ports.
    share = await new_share(client)
    async with aiohttp.ClientSession(base_url=client.make_url("")) as stranger:
        port_link = f"http://{ports.host(8001)}{URL(share['url']).raw_path_qs}"
        opened = await open_link(stranger, port_link)
        assert opened.status == 404
        assert "sandbox_share" not in opened.cookies
        shared = await open_link(stranger, share["url"])
        assert shared.status == 303
        cookie = {"Cookie": f"sandbox_share={shared.cookies['sandbox_share'].value}"}
        assert (await stranger.get("/echo", headers={**cookie, "Host": ports.host(8001)})).status == 401


async def test_the_ports_list_says_what_listens_and_where_it_is_served(
    ports: Ports, client: TestClient, docker: aiodocker.Docker, settings: Settings
) -> None:
    await start_server(client, docker, "alice", ["node", "/workspace/upstream.js"], {"PORT": "8001"})
    await start_server(
        client, docker, "alice", ["python3", "-m", "http.server", "--bind", "127.0.0.1", "8000"]
    )

    found: dict[int, dict[str, Any]] = {}

    async def listed() -> bool:
        response = await client.get("/api/sandbox/ports", headers=auth("alice"))
        assert response.status == 200, await response.text()
        found.clear()
        found.update({entry["port"]: entry for entry in (await response.json())["ports"]})
        return {8000, 8001} <= found.keys()

    await poll(listed, timeout_s=20)
    assert 49983 not in found, "the agent's own port is not the user's"
    python, node = found[8000], found[8001]
    assert python["addresses"] == ["127.0.0.1"]
    assert python["process"]["command"] == "python3 -m http.server --bind 127.0.0.1 8000"
    assert isinstance(python["process"]["pid"], int)
    assert node["addresses"] == ["0.0.0.0"]  # noqa: S104
    assert node["process"]["command"] == "node /workspace/upstream.js"
    assert node["preview_url"] == f"http://{ports.host(8001)}/"
    # Bob has no sandbox: his list is not alice's.
    assert (await client.get("/api/sandbox/ports", headers=auth("bob"))).status == 409
    assert (await client.get("/api/sandbox/ports")).status == 401


async def test_a_loopback_only_dev_server_on_5173_is_served_at_the_default_origin(
    ports: Ports, client: TestClient, docker: aiodocker.Docker
) -> None:
    """Vite without --host: nothing on the sandbox's address for Docker's published port to reach."""
    await start_server(client, docker, "alice", ["node", "/workspace/upstream.js"], {"HOST": "127.0.0.1"})
    root_host = URL(await root_url_of(client, "alice")).raw_authority

    async def answers() -> bool:
        return (await ports.http.get("/echo", headers={"Host": root_host, **auth("alice")})).status == 200

    await poll(answers, timeout_s=20)
    for _ in range(3):
        echoed = await (await ports.http.get("/echo", headers={"Host": root_host, **auth("alice")})).json()
        assert echoed["headers"]["host"] == "localhost:5173"
    ws = await ports.http.ws_connect("/ws", headers={"Host": root_host, **auth("alice")})
    await ws.send_str("hmr")
    assert (await ws.receive()).data == "hmr"
    await ws.close()
    posted = await ports.http.post("/echo", data=b"x" * 1000, headers={"Host": root_host, **auth("alice")})
    assert (await posted.json())["size"] == 1000


async def test_ipv6_servers_are_reached_as_the_sandbox_allows(
    ports: Ports, client: TestClient, docker: aiodocker.Docker
) -> None:
    bind = await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={
            "language": "python",
            "code": "import socket\ns = socket.socket(socket.AF_INET6)\ns.bind(('::1', 0))\nprint('ok')",
        },
    )
    if (await bind.json())["exit_code"] == 0:
        # A daemon with IPv6 on its bridges: a server on ::1 alone is reached through the agent.
        host = "::1"
    else:
        # Docker's bridge networks come without IPv6 unless the daemon enables it (this project's
        # does not): nothing can listen on ::1, and a server on the IPv6 wildcard, which takes IPv4
        # too, is what remains; the agent reaches it at 127.0.0.1.
        assert "Cannot assign requested address" in (await bind.json())["stderr"]
        host = "::"
    await start_server(
        client, docker, "alice", ["node", "/workspace/upstream.js"], {"PORT": "8003", "HOST": host}
    )
    await poll(lambda: ports.answers(8003, "/echo"), timeout_s=20)


async def test_relays_per_sandbox_are_bounded(
    make_client: MakeClient, docker: aiodocker.Docker, preview_http: aiohttp.ClientSession
) -> None:
    client = await make_client(preview_port_relays=2)
    started = await client.post("/api/sandbox", headers=auth("alice"))
    source = await asyncio.to_thread(UPSTREAM_JS.read_text)
    await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "bash", "code": "cat > /workspace/upstream.js", "stdin": source},
    )
    async with aiohttp.ClientSession(base_url=client.make_url("")) as http:
        ports = Ports(client, http, (await started.json())["preview_url"])
        await start_server(client, docker, "alice", ["node", "/workspace/upstream.js"], {"PORT": "8001"})
        await poll(lambda: ports.answers(8001, "/echo"), timeout_s=20)
        headers = {"Host": ports.host(8001), **auth("alice")}
        # The idle pooled connection of the poll above holds one relay; a WebSocket takes the other.
        ws = await http.ws_connect("/ws", headers=headers)
        with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
            await http.ws_connect("/ws", headers=headers)
        assert failed.value.status == 429
        await ws.close()


@pytest.mark.browser
async def test_the_preview_pane_offers_the_ports_and_shows_the_chosen_one(
    page: Page, client: TestClient, settings: Settings, docker: aiodocker.Docker
) -> None:
    await sign_in_and_start(page, settings)
    await start_server(
        client, docker, "alice", ["python3", "-m", "http.server", "--bind", "127.0.0.1", "8000"]
    )
    ports = Ports(client, client, await root_url_of(client, "alice"))
    await poll(lambda: ports.answers(8000), timeout_s=20)
    await page.click("#preview-reload")
    offered = page.locator("#preview-port option[value='8000']")
    await expect(offered).to_have_count(1, timeout=10_000)
    assert "python3" in (await offered.text_content() or "")
    await page.select_option("#preview-port", "8000")
    frame = await preview_frame(page, f"http://{ports.host(8000)}")
    await expect(frame.locator("h1")).to_have_text(re.compile("Directory listing"), timeout=20_000)
    assert await page.get_attribute("#preview-link", "href") == f"http://{ports.host(8000)}/"
    # And back to the default route.
    await page.select_option("#preview-port", "")
    root = (await root_url_of(client, "alice")).rstrip("/")
    await poll(lambda: _shows(page, root), timeout_s=20)


async def _shows(page: Page, origin: str) -> bool:
    return any(frame.url.startswith(origin + "/") for frame in page.frames)
