"""The front door (gateway/frontdoor.py): which requests it answers itself, that it answers them as
aiohttp's preview handler does, and that whatever it hands over reaches aiohttp whole."""

from __future__ import annotations

import asyncio
import json
from typing import cast

import aiodocker
import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from gateway.http1 import parse_head
from gateway.keys import METRICS
from gateway.preview_access import PATH_ROUTE_LABEL, ROOT_ROUTE_LABEL
from gateway.server import GatewayServer
from gateway.settings import Settings

from . import test_preview
from .helpers import auth
from .test_hostile import exchange
from .test_preview import Preview, ready_preview

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

# Alice's running preview, on each route in turn: test_preview's own fixture.
preview = test_preview.preview

GET = "GET /preview/alice/echo HTTP/1.1\r\nHost: preview.example\r\n"


@pytest.mark.parametrize(
    ("head", "why"),
    [
        ("POST /preview/alice/echo HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n", "a body"),
        ("GET /preview/alice/echo HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", "a body announced"),
        ("GET /preview/alice/echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", "chunks"),
        ("GET /preview/alice/echo HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n", "Expect"),
        ("GET /preview/alice/echo HTTP/1.0\r\nHost: h\r\n\r\n", "HTTP/1.0"),
        ("GET /preview/alice/echo HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n", "two Hosts"),
        ("GET /preview/alice/echo HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n", "two Cookies"),
        ("GET /preview/alice/echo HTTP/1.1\nHost: h\r\n\r\n", "a bare LF"),
        ("GET /preview/alice/echo HTTP/1.1\r\nHost: h\rX: 1\r\n\r\n", "a bare CR"),
        ("GET /preview/alice/echo HTTP/1.1\r\nHost: h\r\nX: 1\r\n folded\r\n\r\n", "obs-fold"),
        ("GET /preview/alice/echo HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", "a NUL"),
        ("GET /preview/alice/é HTTP/1.1\r\nHost: h\r\n\r\n", "a raw non-ASCII path"),
        ("GET /preview/alice/echo HTTP/1.1\r\n\r\n", "no Host"),
        ("GET /preview/alice/ HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", "h2c"),
        ("GET /preview/alice/ HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n", "Upgrade alone"),
    ],
)
def test_heads_the_front_door_leaves_to_aiohttp(head: str, why: str) -> None:
    assert parse_head(head.encode("utf-8")) is None, why


def test_heads_the_front_door_takes() -> None:
    plain = parse_head(f"{GET}Accept: */*\r\n\r\n".encode())
    assert plain is not None
    assert (plain.method, plain.target) == ("GET", "/preview/alice/echo")
    assert plain.keep_alive
    assert not plain.upgrade
    closing = parse_head(f"{GET}Connection: close\r\n\r\n".encode())
    assert closing is not None
    assert not closing.keep_alive
    websocket = parse_head(f"{GET}Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode())
    assert websocket is not None
    assert websocket.upgrade


@pytest.fixture
async def path_preview(
    client: TestClient, settings: Settings, docker: aiodocker.Docker, preview_http: aiohttp.ClientSession
) -> Preview:
    return await ready_preview(client, settings, docker, preview_http, "path")


def server_of(client: TestClient) -> GatewayServer:
    assert client.server.runner is not None
    return cast(GatewayServer, client.server.runner.server)


async def test_previews_are_answered_at_the_door_and_the_rest_handed_over(preview: Preview) -> None:
    server = server_of(preview.client)
    answered, handed_over = server.answered, server.handed_over
    assert (await preview.request("GET", "small")).status == 200
    assert (await preview.request("HEAD", "small")).status == 200
    assert server.answered == answered + 2
    assert server.handed_over == handed_over
    # A body is aiohttp's.
    assert (await preview.echo("POST", data=b"body"))["size"] == 4
    assert server.handed_over == handed_over + 1
    # Whose answer closed the connection (preview_origin_connections_middleware): the next GET
    # meets the door again.
    assert (await preview.request("GET", "small")).status == 200
    assert server.answered == answered + 3


async def test_a_connection_handed_over_midway_loses_nothing(
    path_preview: Preview, settings: Settings
) -> None:
    """Answered at the door, then a request with a body, then one the door would take: all three come
    back, in order, on one connection (the last from aiohttp, which has the connection by then). On
    the main origin, where a script with a token reaches previews and aiohttp keeps connections."""
    token = auth("alice")["Authorization"]
    head = f"Host: sandbox.localhost:{settings.port}\r\nAuthorization: {token}\r\n"
    pipelined = (
        f"GET /preview/alice/echo?n=1 HTTP/1.1\r\n{head}\r\n"
        f"POST /preview/alice/echo?n=2 HTTP/1.1\r\n{head}Content-Length: 5\r\n\r\nhello"
        f"GET /preview/alice/echo?n=3 HTTP/1.1\r\n{head}Connection: close\r\n\r\n"
    ).encode()
    server = server_of(path_preview.client)
    answered = server.answered
    responses = await exchange(settings.port, pipelined)
    bodies = [json.loads(response.body) for response in responses]
    assert [(b["method"], b["url"], b["size"]) for b in bodies] == [
        ("GET", "/preview/alice/echo?n=1", 0),
        ("POST", "/preview/alice/echo?n=2", 5),
        ("GET", "/preview/alice/echo?n=3", 0),
    ]
    assert server.answered == answered + 1


def raw_get(preview: Preview, target: str, *extra: str) -> bytes:
    token = auth(preview.user)["Authorization"]
    lines = [f"GET {target} HTTP/1.1", f"Host: {preview.host}", f"Authorization: {token}", *extra]
    return ("\r\n".join([*lines, "Connection: close"]) + "\r\n\r\n").encode()


async def test_the_door_and_aiohttp_answer_alike(preview: Preview) -> None:
    """The same request twice: as the door takes it, and with a second Origin header, which makes the
    door hand it over. The dev server sees the same headers; the client gets the same answer."""
    server = server_of(preview.client)
    port = preview.client.server.port or 0
    extra = ("Cookie: theme=dark", "X-Forwarded-For: 10.0.0.1", "Forwarded: for=evil", "X-Request-Id: req-1")
    answered, handed_over = server.answered, server.handed_over
    (fast,) = await exchange(port, raw_get(preview, f"{preview.prefix}echo?q=1", *extra))
    assert (server.answered, server.handed_over) == (answered + 1, handed_over)
    twice = ("Origin: a", "Origin: b")
    (slow,) = await exchange(port, raw_get(preview, f"{preview.prefix}echo?q=1", *extra, *twice))
    assert (server.answered, server.handed_over) == (answered + 1, handed_over + 1)

    assert fast.status == slow.status == 200
    assert fast.headers["x-request-id"] == slow.headers["x-request-id"] == "req-1"
    aiohttp_own = {"server", "date"}
    assert fast.headers.keys() - aiohttp_own == slow.headers.keys() - aiohttp_own
    seen_fast = json.loads(fast.body)["headers"]
    seen_slow = json.loads(slow.body)["headers"]
    seen_slow.pop("origin")
    assert seen_fast == seen_slow
    assert seen_fast["cookie"] == "theme=dark"
    assert seen_fast["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen_fast["host"] == "localhost:5173"
    assert not {"authorization", "forwarded"} & seen_fast.keys()


async def test_both_paths_count_under_the_preview_route(preview: Preview) -> None:
    registry = preview.client.app[METRICS].registry
    route = ROOT_ROUTE_LABEL if preview.route == "root" else PATH_ROUTE_LABEL
    labels = {"route": route, "method": "GET", "status": "200"}

    def count() -> float:
        return registry.get_sample_value("sandbox_gateway_http_requests_total", labels) or 0.0

    before = count()
    port = preview.client.server.port or 0
    (fast,) = await exchange(port, raw_get(preview, f"{preview.prefix}small"))
    (slow,) = await exchange(port, raw_get(preview, f"{preview.prefix}small", "Content-Length: 0"))
    assert fast.status == slow.status == 200
    assert count() == before + 2


async def test_preview_websockets_end_when_the_gateway_shuts_down(preview: Preview) -> None:
    server = server_of(preview.client)
    headers = {"Host": preview.host, **auth("alice")}
    ws = await preview.http.ws_connect(preview.url("ws"), headers=headers, protocols=["vite-hmr"])
    await ws.send_str("ping")
    assert (await ws.receive()).data == "ping"
    assert len(server.splices) == 1
    await preview.client.server.close()
    message = await asyncio.wait_for(ws.receive(), 10)
    assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    assert not server.splices


async def test_on_the_preview_origin_aiohttp_gives_the_connection_back(
    preview: Preview, settings: Settings
) -> None:
    """What the door hands over on the preview origin is answered with Connection: close, so that the
    browser's next request comes on a new connection, to the door."""
    token = auth("alice")["Authorization"]
    head = f"Host: {preview.host}\r\nAuthorization: {token}\r\n"
    pipelined = (
        f"POST {preview.prefix}echo?n=1 HTTP/1.1\r\n{head}Content-Length: 5\r\n\r\nhello"
        f"GET {preview.prefix}echo?n=2 HTTP/1.1\r\n{head}\r\n"
    ).encode()
    # exchange() reads until the gateway closes: the POST is answered, and then the connection ends.
    (answer,) = await exchange(settings.port, pipelined)
    assert answer.status == 200
    assert json.loads(answer.body)["url"] == f"{preview.prefix}echo?n=1"
    assert answer.headers["connection"].lower() == "close"


async def test_a_websocket_handed_over_is_spliced_by_aiohttp_end_to_end(preview: Preview) -> None:
    """An upgrade the door does not take (a repeated header) reaches aiohttp's transport, whose splice
    is the door's: subprotocol, text and binary frames, and close codes pass as on the fast path."""
    server = server_of(preview.client)
    handed_over, splices = server.handed_over, len(server.splices)
    headers = CIMultiDict([("Host", preview.host), *auth("alice").items()])
    headers.add("X-Request-Id", "one")
    headers.add("X-Request-Id", "two")
    ws = await preview.http.ws_connect(preview.url("ws?token=t"), headers=headers, protocols=["vite-hmr"])
    assert server.handed_over == handed_over + 1
    assert len(server.splices) == splices, "not a door splice"
    assert ws.protocol == "vite-hmr"
    await ws.send_str("héllo")
    assert (await ws.receive()).data == "héllo"
    await ws.send_bytes(b"\x00\xff")
    assert (await ws.receive()).data == b"\x00\xff"
    await ws.send_str("whoami")
    seen = json.loads((await ws.receive()).data)
    assert seen["url"] == f"{preview.prefix}ws?token=t"
    assert "authorization" not in seen["headers"]
    await ws.send_str("close:4321")
    assert (await ws.receive()).type == WSMsgType.CLOSE
    assert ws.close_code == 4321
