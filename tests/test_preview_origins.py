"""Each sandbox's own preview origin: labels, hostile hosts, cookies bound to one origin, share links
and waking a stopped sandbox, on a real gateway, sandbox and PostgreSQL."""

from __future__ import annotations

import time

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from gateway.keys import ACTIVITY, DB, SETTINGS
from gateway.preview_hosts import LABEL, label_of_host
from gateway.settings import Settings

from .helpers import MakeClient, auth, poll
from .test_hostile import exchange
from .test_preview import Preview, ready_preview, root_url_of, set_idle

pytestmark = [pytest.mark.docker, pytest.mark.postgres]


@pytest.fixture
async def preview(
    client: TestClient, settings: Settings, docker: aiodocker.Docker, preview_http: aiohttp.ClientSession
) -> Preview:
    return await ready_preview(client, settings, docker, preview_http, "root")


def test_hosts_map_to_labels_exactly() -> None:
    suffix = ".preview.sandbox.localhost:8080"
    label = "pabcdefghijklmnop"
    assert label_of_host(f"{label}{suffix}", suffix) == label
    assert label_of_host(f"{label.upper()}.PREVIEW.sandbox.localhost:8080", suffix) == label
    for host in (
        f"{label}.preview.sandbox.localhost.:8080",  # a trailing dot
        f"{label}.preview.sandbox.localhost:8081",  # another port
        f"{label}.preview.sandbox.localhost",  # no port
        f"x.{label}{suffix}",  # two labels
        f"{label}-{suffix}",
        f"alice{suffix}",  # a user name is not a label
        f"{label}x{suffix}",
        suffix.lstrip("."),
    ):
        assert label_of_host(host, suffix) is None, host


async def test_labels_are_random_stable_and_apart_for_names_dns_folds(make_client: MakeClient) -> None:
    first = await make_client()
    urls = {}
    for user in ("Alice", "alice", "a.b_c"):
        session = await first.post("/api/sandbox/preview-session", headers=auth(user))
        assert session.status == 200
        urls[user] = URL((await session.json())["preview_url"])
    labels = {user: url.host.split(".", 1)[0] for user, url in urls.items() if url.host}
    assert len(set(labels.values())) == 3
    assert all(LABEL.fullmatch(label) for label in labels.values())
    # Another gateway on the same database gives the same origin.
    second = await make_client()
    again = await second.post("/api/sandbox/preview-session", headers=auth("Alice"))
    assert URL((await again.json())["preview_url"]).host == urls["Alice"].host


async def test_hostile_hosts_never_reach_anothers_preview(preview: Preview, client: TestClient) -> None:
    bob_started = await client.post("/api/sandbox/preview-session", headers=auth("bob"))
    bob_host = URL((await bob_started.json())["preview_url"]).raw_authority
    label, domain = preview.host.split(".", 1)
    cases = {
        "upper case": (preview.host.upper(), "alice", 200),
        "a trailing dot": (f"{label}.{domain.replace(':', '.:')}", "alice", 404),
        "another port": (f"{preview.host.rsplit(':', 1)[0]}:1", "alice", 404),
        "an unknown label": (f"pzzzzzzzzzzzzzzzz.{domain}", "alice", 404),
        "a malformed label": (f"alice.{domain}", "alice", 404),
        "two labels": (f"x.{preview.host}", "alice", 404),
        "another user's label with my token": (bob_host, "alice", 403),
        "my label with another user's token": (preview.host, "bob", 403),
    }
    for why, (host, user, status) in cases.items():
        response = await client.get("/echo", headers={"Host": host, **auth(user)}, allow_redirects=False)
        assert response.status == status, (why, response.status, await response.text())
        if status != 200:
            assert "x-sandbox-user" not in response.headers, why
            assert (await response.json())["error"]["code"] in (
                "preview_not_found",
                "not_found",
                "forbidden",
            ), why


async def test_the_whole_path_is_the_dev_servers_and_never_the_api(preview: Preview) -> None:
    for path in ("api/sandbox", "api/openapi.json", "healthz", "", "_preview/login", "preview/alice/echo"):
        response = await preview.request("GET", path)
        # The fixture answers every path itself (404 for the ones it does not know), as alice's server.
        assert response.headers.get("x-sandbox-user") == "alice", (path, response.status)
    # The gateway's own pages there: only those, and no way through them to the router's others.
    for raw in (
        "/_sandbox-gateway/nothing",
        "/_sandbox-gateway/../api/sandbox",
        "/_sandbox-gateway/%2e%2e/api/sandbox",
    ):
        token = auth("alice")["Authorization"]
        head = (
            f"GET {raw} HTTP/1.1\r\nHost: {preview.host}\r\nAuthorization: {token}\r\nConnection: close\r\n"
        )
        head += "\r\n"
        (response,) = await exchange(preview.client.server.port or 0, head.encode())
        assert response.status in (400, 404), (raw, response.status)
        assert "x-sandbox-user" not in response.headers


async def login_cookie(client: TestClient, user: str) -> tuple[str, str]:
    """The host of the user's own preview origin, and the cookie its login link sets."""
    urls = await (await client.post("/api/sandbox/preview-session", headers=auth(user))).json()
    login = URL(urls["login_url"])
    answer = await client.get(login.path_qs, headers={"Host": login.raw_authority}, allow_redirects=False)
    assert answer.status == 303, await answer.text()
    # The tests send cookies by hand: the client's jar would put the last one over them.
    client.session.cookie_jar.clear()
    return login.raw_authority, answer.cookies["sandbox_preview"].value


async def test_cookies_open_their_own_origin_only_and_survive_tossing(
    preview: Preview, client: TestClient
) -> None:
    _, alice = await login_cookie(client, "alice")
    bob_host, bob = await login_cookie(client, "bob")
    own = {"Host": preview.host}
    assert (await client.get("/echo", headers={**own, "Cookie": f"sandbox_preview={alice}"})).status == 200
    # Bob's cookie, tossed at alice's origin by a sibling page (Domain=<preview domain>), comes first:
    # it neither hides alice's nor opens anything.
    tossed = f"sandbox_preview={bob}; sandbox_preview={alice}"
    assert (await client.get("/echo", headers={**own, "Cookie": tossed})).status == 200
    assert (await client.get("/echo", headers={**own, "Cookie": f"sandbox_preview={bob}"})).status in (
        401,
        403,
    )
    # Alice's cookie is bound to her origin: on bob's it is nothing.
    assert (
        await client.get("/echo", headers={"Host": bob_host, "Cookie": f"sandbox_preview={alice}"})
    ).status == 401
    # Another origin's fetch would carry the cookie (same site): refused before the dev server sees it.
    cross = {**own, "Cookie": f"sandbox_preview={alice}", "Origin": f"http://{bob_host}"}
    refused = await client.get("/echo", headers=cross)
    assert refused.status == 403
    assert "x-sandbox-user" not in refused.headers
    same = {**own, "Cookie": f"sandbox_preview={alice}", "Origin": preview.origin}
    assert (await client.post("/echo", headers=same, data=b"form")).status == 200


async def new_share(client: TestClient, user: str = "alice", **body: object) -> dict[str, str]:
    response = await client.post("/api/sandbox/shares", headers=auth(user), json=body)
    assert response.status == 201, await response.text()
    share: dict[str, str] = await response.json()
    return share


async def open_link(http: aiohttp.ClientSession, link: str) -> aiohttp.ClientResponse:
    url = URL(link)
    return await http.get(url.path_qs, headers={"Host": url.raw_authority}, allow_redirects=False)


async def test_a_share_link_lets_anyone_view_and_nothing_more(preview: Preview, client: TestClient) -> None:
    share = await new_share(client)
    assert URL(share["url"]).raw_authority == preview.host
    assert share["preview_url"] == preview.origin + "/"
    # A stranger: no token, no cookie of the owner's.
    async with aiohttp.ClientSession(base_url=client.make_url("")) as stranger:
        opened = await open_link(stranger, share["url"])
        assert (opened.status, opened.headers["Location"]) == (303, "/")
        cookie = opened.cookies["sandbox_share"]
        assert cookie["httponly"]
        assert not cookie["domain"]
        assert cookie["path"] == "/"
        viewer = {"Host": preview.host, "Cookie": f"sandbox_share={cookie.value}"}
        echoed = await stranger.get("/echo", headers=viewer)
        assert echoed.status == 200
        assert "cookie" not in (await echoed.json())["headers"], (
            "the share cookie never reaches the dev server"
        )
        ws = await stranger.ws_connect("/ws", headers=viewer)
        await ws.send_str("hi")
        assert (await ws.receive()).data == "hi"
        await ws.close()
        # Never the API, never the terminal, never another origin.
        share_only = {"Cookie": f"sandbox_share={cookie.value}"}
        assert (await stranger.get("/api/sandbox", headers=share_only)).status == 401
        assert (await stranger.get("/api/sandbox/terminal", headers=share_only)).status == 401
        bob_urls = await (await client.post("/api/sandbox/preview-session", headers=auth("bob"))).json()
        bob = {"Host": URL(bob_urls["preview_url"]).raw_authority, **share_only}
        assert (await stranger.get("/echo", headers=bob)).status == 401
        # A made-up or mangled link opens nothing.
        assert (await open_link(stranger, share["url"] + "x")).status == 404
    listed = await (await client.get("/api/sandbox/shares", headers=auth("alice"))).json()
    assert [item["id"] for item in listed["shares"]] == [share["id"]]
    assert "url" not in listed["shares"][0], "the secret is shown once"


async def test_share_viewers_do_not_keep_the_sandbox_alive(preview: Preview, client: TestClient) -> None:
    share = await new_share(client)
    async with aiohttp.ClientSession(base_url=client.make_url("")) as stranger:
        cookie = (await open_link(stranger, share["url"])).cookies["sandbox_share"].value
        await set_idle(client)
        writes = client.app[ACTIVITY].writes
        for _ in range(5):
            assert (
                await stranger.get(
                    "/echo", headers={"Host": preview.host, "Cookie": f"sandbox_share={cookie}"}
                )
            ).status == 200
        assert client.app[ACTIVITY].writes == writes


async def test_revoking_takes_effect_on_every_gateway_within_a_second(
    make_client: MakeClient, settings: Settings, docker: aiodocker.Docker
) -> None:
    first = await make_client()
    await ready_preview(first, settings, docker, route="root")
    # Behind one balancer: the same public name, so the same preview domain.
    second = await make_client(public_url=first.app[SETTINGS].public_url)
    share = await new_share(first)
    async with aiohttp.ClientSession(base_url=second.make_url("")) as stranger:
        cookie = (await open_link(stranger, share["url"])).cookies["sandbox_share"].value
        host = URL(share["url"]).raw_authority
        viewer = {"Host": host, "Cookie": f"sandbox_share={cookie}"}
        assert (await stranger.get("/echo", headers=viewer)).status == 200
        revoked = await first.delete(f"/api/sandbox/shares/{share['id']}", headers=auth("alice"))
        assert revoked.status == 204
        since = time.monotonic()

        async def refused() -> bool:
            return (await stranger.get("/echo", headers=viewer)).status == 401

        await poll(refused, timeout_s=3)
        assert time.monotonic() - since < 1.5
        assert (await open_link(stranger, share["url"])).status == 404
    # Revoked is gone for good; another user's id, or none, is a clean 404.
    again = await first.delete(f"/api/sandbox/shares/{share['id']}", headers=auth("alice"))
    assert again.status == 404
    other = await new_share(first, "alice")
    stolen = await first.delete(f"/api/sandbox/shares/{other['id']}", headers=auth("bob"))
    assert (stolen.status, (await stolen.json())["error"]["code"]) == (404, "share_not_found")


async def test_share_requests_are_checked(client: TestClient, settings: Settings) -> None:
    too_long = await client.post(
        "/api/sandbox/shares", headers=auth("alice"), json={"expires_in_s": settings.share_max_lifetime_s + 1}
    )
    assert (too_long.status, (await too_long.json())["error"]["code"]) == (400, "invalid_request")
    for body in ({"expires_in_s": "60"}, {"expires_in_s": 59}, {"wake": True}):
        assert (await client.post("/api/sandbox/shares", headers=auth("alice"), json=body)).status == 400
    assert (await client.post("/api/sandbox/shares")).status == 401


async def test_an_expired_share_opens_nothing(preview: Preview, client: TestClient) -> None:
    share = await new_share(client, expires_in_s=60)
    async with client.app[DB].acquire() as conn:
        await conn.execute("UPDATE preview_shares SET expires_at = now() - interval '1 second'")
    async with aiohttp.ClientSession(base_url=client.make_url("")) as stranger:
        assert (await open_link(stranger, share["url"])).status == 404


async def test_a_stopped_sandbox_offers_its_owner_to_start_it(
    make_client: MakeClient, settings: Settings
) -> None:
    client = await make_client()
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    host = URL(await root_url_of(client, "alice")).raw_authority
    origin = f"http://{host}"
    share = await new_share(client)
    assert (await client.delete("/api/sandbox", headers=auth("alice"))).status == 204
    _, cookie = await login_cookie(client, "alice")
    owner = {"Host": host, "Cookie": f"sandbox_preview={cookie}", "Accept": "text/html"}
    page = await client.get("/some/page?x=1", headers=owner)
    assert page.status == 409
    text = await page.text()
    assert "Start it" in text
    assert "/_sandbox-gateway/start" in text
    assert "/some/page?x=1" in text
    # Scripts get the JSON error; a form from another origin is refused.
    assert (await client.get("/", headers={"Host": host, **auth("alice")})).status == 409
    foreign = await client.post(
        "/_sandbox-gateway/start", headers={**owner, "Origin": "http://evil.localhost"}, data={"next": "/"}
    )
    assert foreign.status == 403
    # A share viewer the owner did not allow to wake it sees no button.
    async with aiohttp.ClientSession(base_url=client.make_url("")) as stranger:
        viewer_cookie = (await open_link(stranger, share["url"])).cookies["sandbox_share"].value
        viewer = {"Host": host, "Cookie": f"sandbox_share={viewer_cookie}", "Accept": "text/html"}
        assert "Start it" not in await (await stranger.get("/", headers=viewer)).text()
        denied = await stranger.post("/_sandbox-gateway/start", headers={**viewer, "Origin": origin})
        assert denied.status == 409
    started = await client.post(
        "/_sandbox-gateway/start",
        headers={**owner, "Origin": origin},
        data={"next": "/some/page?x=1"},
        allow_redirects=False,
    )
    assert (started.status, started.headers["Location"]) == (303, "/some/page?x=1")
    state = await (await client.get("/api/sandbox", headers=auth("alice"))).json()
    assert state["state"] == "running"
    # Nothing is listening yet: the owner's page retries until the dev server answers.
    waiting = await client.get("/some/page?x=1", headers=owner)
    assert waiting.status == 502
    assert "retries" in await waiting.text()


@pytest.mark.parametrize("raw", ["/..%2fx", "/%2e%2e/echo", "/a/../echo", "/a/..\\echo", "/a/.%2e/echo"])
async def test_dot_segments_are_refused_before_the_dev_server(preview: Preview, raw: str) -> None:
    token = auth("alice")["Authorization"]
    head = f"GET {raw} HTTP/1.1\r\nHost: {preview.host}\r\nAuthorization: {token}\r\nConnection: close\r\n"
    (response,) = await exchange(preview.client.server.port or 0, (head + "\r\n").encode())
    assert response.status == 400, raw
    assert "x-sandbox-user" not in response.headers
