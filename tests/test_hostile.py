"""Hostile requests against the preview proxy of a real gateway, with two users (alice and bob) whose
sandboxes both run the echo server of tests/fixtures/upstream.js: path tricks, oversized requests,
header injection and request smuggling. Each is rejected or normalised, never reaches bob's sandbox
with alice's credentials, and never lets a second request hide in a body.

Malformed requests go over raw sockets: an HTTP client library would refuse to send them. Every raw
exchange ends with `Connection: close`, so reading until the gateway closes is the end of the answer.
The upstream's own log (`/seen`) is the proof of what was forwarded.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiodocker
import httptools
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.settings import Settings

from .helpers import auth, free_port, poll
from .test_preview import Preview, start_upstream

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

READ_DEADLINE_S = 15.0
SMUGGLED = "smuggled-request"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


class _ResponseCollector:
    """httptools callbacks: every complete response in a byte stream, pipelined ones too."""

    def __init__(self) -> None:
        self.responses: list[RawResponse] = []
        self.current: RawResponse | None = None
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = RawResponse(status=0)

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.responses.append(self.current)
        self.current = None


async def exchange(port: int, data: bytes) -> list[RawResponse]:
    """Writes `data` to a fresh connection and returns every response read until the gateway closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        writer.write(data)
        async with asyncio.timeout(READ_DEADLINE_S):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        pytest.fail(
            f"the gateway neither answered nor closed within {READ_DEADLINE_S} s: {bytes(received)!r}"
        )
    except ConnectionResetError:
        pass  # it may reset after answering; what it sent before is in `received`
    finally:
        writer.close()
    collector = _ResponseCollector()
    collector.parser.feed_data(bytes(received))
    if collector.current is not None:
        # A response whose body ends with the connection (no length given) is complete now.
        collector.responses.append(collector.current)
    return collector.responses


@dataclass
class Gateway:
    client: TestClient
    settings: Settings
    alice: Preview
    bob: Preview

    @property
    def port(self) -> int:
        port = self.client.port
        assert port is not None
        return port

    def request(
        self,
        target: str,
        *,
        user: str = "alice",
        method: str = "GET",
        headers: list[str] | None = None,
        body: bytes = b"",
    ) -> bytes:
        """A request as raw bytes to the preview origin with `user`'s token: header lines exactly as
        given, then Connection: close."""
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.settings.preview_host}",
            f"Authorization: {auth(user)['Authorization']}",
            *(headers or []),
            "Connection: close",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def seen(self, preview: Preview) -> list[dict[str, Any]]:
        """What the user's dev server received, in order (its own /seen request last)."""
        body = await preview.echo(path="seen")
        requests: list[dict[str, Any]] = body["requests"]
        return [request for request in requests if not request["url"].endswith("/seen")]


@pytest.fixture
async def gateway(client: TestClient, settings: Settings, docker: aiodocker.Docker) -> Gateway:
    for user in ("alice", "bob"):
        assert (await client.post("/api/sandbox", headers=auth(user))).status == 201
    await asyncio.gather(*(start_upstream(client, docker, user) for user in ("alice", "bob")))
    alice, bob = Preview(client, settings, "alice"), Preview(client, settings, "bob")
    for preview in (alice, bob):

        async def listening(preview: Preview = preview) -> bool:
            return (await preview.request("GET", "small")).status == 200

        await poll(listening, timeout_s=20)
    return Gateway(client, settings, alice, bob)


def _headers_of(request: dict[str, Any]) -> list[tuple[str, str]]:
    raw = request["rawHeaders"]
    return [(raw[i].lower(), raw[i + 1]) for i in range(0, len(raw), 2)]


async def _bob_untouched(gateway: Gateway, before: int) -> None:
    """Bob's dev server got nothing but bob's own requests since it had `before` of them."""
    seen = await gateway.seen(gateway.bob)
    assert seen[before:] == [], seen[before:]


# -- paths -------------------------------------------------------------------------------------------

PATH_TRICKS = [
    "/preview/alice/../bob/echo",
    "/preview/alice/%2e%2e/bob/echo",
    "/preview/alice/%2E%2E/bob/echo",
    "/preview/alice/.%2e/bob/echo",
    "/preview/alice/%2e%2e%2fbob/echo",
    "/preview/alice%2F..%2Fbob/echo",
    "/preview/alice%2fbob/echo",
    "/preview/alice/..%2Fbob/echo",
    "/preview/alice/..%5Cbob/echo",
    "/preview/alice/..\\bob/echo",
    "/preview/bob/../alice/echo",
    "/preview//bob/echo",
    "//preview/bob/echo",
    "/preview/alice//../bob/echo",
    "/preview/./bob/echo",
    "/preview/%62ob/echo",
    "/preview/bob%00/echo",
    "/preview/alice/%2e%2e/%2e%2e/preview/bob/echo",
    "http://preview.sandbox.localhost/preview/bob/echo",
    "/preview/alice/../../preview/bob/echo",
    "/preview/alice/;/../bob/echo",
    "/preview/alice/echo/../../bob/echo",
    "/preview/alice/%2e%2e",
    "/preview/alice/sub/%2e",
]


async def test_path_tricks_never_reach_bobs_sandbox_with_alices_token(gateway: Gateway) -> None:
    bob_before = len(await gateway.seen(gateway.bob))
    alice_before = len(await gateway.seen(gateway.alice))
    for target in PATH_TRICKS:
        responses = await exchange(gateway.port, gateway.request(target))
        assert len(responses) == 1, (target, responses)
        response = responses[0]
        # Refused by the gateway itself: no dev server answered, not even alice's own.
        assert "x-sandbox-user" not in response.headers, (target, response)
        assert response.status in (400, 403, 404), (target, response)
        assert response.json()["error"]["code"] in (
            "invalid_request",
            "forbidden",
            "not_found",
            "preview_not_found",
        ), response
    await _bob_untouched(gateway, bob_before)
    assert len(await gateway.seen(gateway.alice)) == alice_before
    # Dot segments, plain or encoded, are refused as such, not merely routed somewhere harmless.
    for target in ("/preview/alice/../bob/echo", "/preview/alice/%2e%2e/bob/echo", "/preview/alice/.%2E/x"):
        (response,) = await exchange(gateway.port, gateway.request(target))
        assert (response.status, response.json()["error"]["message"]) == (400, "malformed preview path")


async def test_encoded_slashes_and_doubled_slashes_stay_under_the_owners_prefix(gateway: Gateway) -> None:
    for target in ("/preview/alice/a%2Fb/echo", "/preview/alice//echo", "/preview/alice/echo//x"):
        responses = await exchange(gateway.port, gateway.request(target))
        assert len(responses) == 1
        # Whatever alice's server makes of it, it got the raw path: nothing decoded, merged or lost.
        assert responses[0].headers.get("x-sandbox-user") == "alice", (target, responses[0])
    seen = await gateway.seen(gateway.alice)
    assert [request["url"] for request in seen[-3:]] == [
        "/preview/alice/a%2Fb/echo",
        "/preview/alice//echo",
        "/preview/alice/echo//x",
    ]


async def test_overlong_paths_and_oversized_headers_are_refused(gateway: Gateway) -> None:
    bob_before = len(await gateway.seen(gateway.bob))
    alice_before = len(await gateway.seen(gateway.alice))
    cases = {
        "64 KiB path": gateway.request("/preview/alice/" + "a" * 65536),
        "64 KiB query": gateway.request("/preview/alice/echo?q=" + "a" * 65536),
        "64 KiB header": gateway.request("/preview/alice/echo", headers=["X-Big: " + "b" * 65536]),
        "64 KiB header name": gateway.request("/preview/alice/echo", headers=["X" * 65536 + ": 1"]),
        "10,000 headers": gateway.request(
            "/preview/alice/echo", headers=[f"X-H{i}: {i}" for i in range(10_000)]
        ),
        "1 MiB of headers": gateway.request(
            "/preview/alice/echo", headers=[f"X-H{i}: {'c' * 4000}" for i in range(256)]
        ),
    }
    for name, data in cases.items():
        responses = await exchange(gateway.port, data)
        assert [r.status for r in responses] in ([400], [413], [414], [431]), (name, responses)
    await _bob_untouched(gateway, bob_before)
    # None of them was forwarded, not even to alice's own server.
    assert len(await gateway.seen(gateway.alice)) == alice_before


# -- header injection --------------------------------------------------------------------------------

INJECTIONS = {
    "bare CR in a value": b"X-Note: a\rInjected: 1",
    "bare LF in a value": b"X-Note: a\nInjected: 1",
    "NUL in a value": b"X-Note: a\x00Injected: 1",
    "space before the colon": b"Injected : 1",
    "obs-fold": b"X-Note: a\r\n Injected: 1",
    "tab fold": b"X-Note: a\r\n\tInjected: 1",
    "a line with no colon": b"Injected 1",
    "CR in a header name": b"X-No\rte: 1",
}


async def test_cr_lf_in_headers_is_refused_and_never_injects_upstream(gateway: Gateway) -> None:
    alice_before = len(await gateway.seen(gateway.alice))
    for name, line in INJECTIONS.items():
        data = gateway.request("/preview/alice/echo").replace(
            b"Connection: close", line + b"\r\nConnection: close"
        )
        assert [r.status for r in await exchange(gateway.port, data)] == [400], name
    assert len(await gateway.seen(gateway.alice)) == alice_before
    # Encoded in the request target, CR LF stays encoded on its way: one request line, no new header.
    target = "/preview/alice/echo?x=%0d%0aInjected:%201%0d%0a"
    (response,) = await exchange(gateway.port, gateway.request(target))
    assert response.status == 200
    (forwarded,) = (await gateway.seen(gateway.alice))[alice_before:]
    assert forwarded["url"] == target
    assert "injected" not in {name for name, _ in _headers_of(forwarded)}


async def test_forwarded_headers_from_the_client_cannot_inject(gateway: Gateway) -> None:
    echoed = await gateway.alice.echo(
        headers={
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Port": "443",
            "X-Forwarded-Prefix": "/preview/bob/",
            "X-Forwarded-Server": "evil",
            "Forwarded": "for=6.6.6.6;host=evil.example;proto=https",
            "X-Real-IP": "6.6.6.6",
        }
    )
    headers = echoed["headers"]
    assert headers["x-forwarded-host"] == gateway.settings.preview_host
    assert headers["x-forwarded-proto"] == "http"
    # The client's own chain may come first, but the last hop is the one the gateway saw.
    assert headers["x-forwarded-for"].split(", ")[-1] == "127.0.0.1"
    for dropped in ("x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server", "forwarded", "x-real-ip"):
        assert dropped not in headers, dropped
    # Several X-Forwarded-* of one name do not add up to a second value either.
    raw = gateway.request(
        "/preview/alice/echo",
        headers=[
            "X-Forwarded-Host: evil.example",
            "X-Forwarded-Host: evil2.example",
            "X-Forwarded-Proto: https",
        ],
    )
    (response,) = await exchange(gateway.port, raw)
    assert response.status == 200
    forwarded = [
        h for h in _headers_of((await gateway.seen(gateway.alice))[-1]) if h[0].startswith("x-forwarded")
    ]
    assert sorted(forwarded) == sorted(
        [
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-host", gateway.settings.preview_host),
            ("x-forwarded-proto", "http"),
        ]
    )


# -- smuggling ---------------------------------------------------------------------------------------


def _hidden(gateway: Gateway, user: str = "alice", padding: int = 0) -> bytes:
    """A complete request for `user`'s preview carrying alice's token, to hide in a body."""
    return gateway.request(f"/preview/{user}/echo?{SMUGGLED}&{'p' * padding}", user="alice")


def _compressed_to_own_length(gateway: Gateway, compress: Callable[[bytes], bytes]) -> bytes:
    """A body whose compressed length equals the filler before the hidden request in it, so that a
    proxy that forwarded the compressed length with the decoded bytes would leave the hidden request
    to be read as the next one on its upstream connection."""
    for padding in range(64):
        hidden = _hidden(gateway, padding=padding)
        for filler in range(16, 512):
            if len(compressed := compress(b"A" * filler + hidden)) == filler:
                return compressed
    raise AssertionError("no body compresses to its own filler's length")


def smuggling_cases(gateway: Gateway) -> dict[str, bytes]:
    hidden_alice, hidden_bob = _hidden(gateway), _hidden(gateway, "bob")
    chunked_hiding = b"0\r\n\r\n" + hidden_bob
    post = "/preview/alice/echo"
    gz = _compressed_to_own_length(gateway, lambda data: gzip.compress(data, mtime=0))
    deflated = _compressed_to_own_length(gateway, zlib.compress)
    return {
        "CL and TE: chunked": gateway.request(
            post,
            method="POST",
            headers=[f"Content-Length: {len(chunked_hiding)}", "Transfer-Encoding: chunked"],
            body=chunked_hiding,
        ),
        "TE: chunked and a short CL": gateway.request(
            post,
            method="POST",
            headers=["Transfer-Encoding: chunked", "Content-Length: 3"],
            body=chunked_hiding,
        ),
        "two different Content-Lengths": gateway.request(
            post, method="POST", headers=["Content-Length: 3", "Content-Length: 40"], body=b"abc" + hidden_bob
        ),
        "two equal Content-Lengths": gateway.request(
            post, method="POST", headers=["Content-Length: 3", "Content-Length: 3"], body=b"abc"
        ),
        "Content-Length: 3, 3": gateway.request(
            post, method="POST", headers=["Content-Length: 3, 3"], body=b"abc"
        ),
        "Content-Length: +3": gateway.request(
            post, method="POST", headers=["Content-Length: +3"], body=b"abc"
        ),
        "TE: chunked, identity": gateway.request(
            post, method="POST", headers=["Transfer-Encoding: chunked, identity"], body=chunked_hiding
        ),
        "TE: identity, chunked": gateway.request(
            post, method="POST", headers=["Transfer-Encoding: identity, chunked"], body=chunked_hiding
        ),
        "TE: xchunked": gateway.request(
            post, method="POST", headers=["Transfer-Encoding: xchunked"], body=chunked_hiding
        ),
        "TE: chunked twice": gateway.request(
            post,
            method="POST",
            headers=["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
            body=chunked_hiding,
        ),
        "TE with a space before the colon": gateway.request(
            post, method="POST", headers=["Transfer-Encoding : chunked"], body=chunked_hiding
        ),
        "TE obs-folded": gateway.request(
            post, method="POST", headers=["Transfer-Encoding:", " chunked"], body=chunked_hiding
        ),
        "TE on HTTP/1.0": gateway.request(
            post, method="POST", headers=["Transfer-Encoding: chunked"], body=chunked_hiding
        ).replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1),
        "chunk size with a bare LF": gateway.request(
            post,
            method="POST",
            headers=["Transfer-Encoding: chunked"],
            body=b"3\nabc\r\n0\r\n\r\n" + hidden_bob,
        ),
        "chunk size overflow": gateway.request(
            post,
            method="POST",
            headers=["Transfer-Encoding: chunked"],
            body=b"10000000000000003\r\nabc\r\n0\r\n\r\n" + hidden_bob,
        ),
        "gzip body of its own length": gateway.request(
            post, method="POST", headers=["Content-Encoding: gzip", f"Content-Length: {len(gz)}"], body=gz
        ),
        "deflate body of its own length": gateway.request(
            post,
            method="POST",
            headers=["Content-Encoding: deflate", f"Content-Length: {len(deflated)}"],
            body=deflated,
        ),
        "GET with a body hiding a request": gateway.request(
            post, headers=[f"Content-Length: {len(hidden_bob)}"], body=hidden_bob
        ),
        "POST whose body is a request": gateway.request(
            post, method="POST", headers=[f"Content-Length: {len(hidden_alice)}"], body=hidden_alice
        ),
        "chunked POST whose body is a request": gateway.request(
            post,
            method="POST",
            headers=["Transfer-Encoding: CHUNKED"],
            body=b"%x\r\n%b\r\n0\r\n\r\n" % (len(hidden_alice), hidden_alice),
        ),
    }


async def test_request_smuggling_shapes_are_rejected_or_normalised(gateway: Gateway) -> None:
    bob_before = len(await gateway.seen(gateway.bob))
    outcomes = {}
    for name, data in smuggling_cases(gateway).items():
        alice_before = len(await gateway.seen(gateway.alice))
        responses = await exchange(gateway.port, data)
        statuses = [response.status for response in responses]
        outcomes[name] = statuses
        # One answer per connection: the gateway read no second request out of the first one's body.
        assert len(responses) == 1, (name, statuses)
        response = responses[0]
        forwarded = (await gateway.seen(gateway.alice))[alice_before:]
        assert all(SMUGGLED not in request["url"] for request in forwarded), (name, forwarded)
        if response.status == 200:
            # Normalised: alice's server got exactly one request, and the hidden one as its body.
            assert len(forwarded) == 1, (name, forwarded)
            assert response.headers.get("x-sandbox-user") == "alice", (name, response)
            assert response.json()["size"] in (len(_hidden(gateway)), len(_hidden(gateway, "bob"))), response
        else:
            assert response.status in (400, 415), (name, response)
            assert forwarded == [], (name, forwarded)
        # Whatever came of it, the proxy's next request on alice's pooled connections is answered by
        # alice's server for that request, not by a leftover answer to a hidden one.
        followup = await gateway.alice.echo(path="echo?followup")
        assert followup["url"] == "/preview/alice/echo?followup", (name, followup)
    await _bob_untouched(gateway, bob_before)
    # The conflicting shapes are refused outright; only well-formed ones went through.
    assert {name for name, statuses in outcomes.items() if statuses == [200]} == {
        "GET with a body hiding a request",
        "POST whose body is a request",
        "chunked POST whose body is a request",
    }


async def test_compressed_uploads_smuggle_nothing_where_the_server_decodes(
    gateway: Gateway, settings: Settings, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> None:
    """The gateway is meant to run without aiohttp's decoding of request bodies (SERVER_OPTIONS), but
    the preview must not depend on it: served with aiohttp's defaults, a gzip body whose decoded
    bytes outrun its Content-Length would leave a request for the dev server to find."""
    port = free_port()
    elsewhere = replace(settings, port=port, public_url=f"http://sandbox.localhost:{port}")
    decoding = Gateway(
        await aiohttp_client(create_app(elsewhere), server_kwargs={"port": port}),
        elsewhere,
        gateway.alice,
        gateway.bob,
    )
    alice_before = len(await gateway.seen(gateway.alice))
    cases = smuggling_cases(decoding)
    for name in ("gzip body of its own length", "deflate body of its own length"):
        assert [r.status for r in await exchange(decoding.port, cases[name])] == [415], name
    assert (await gateway.seen(gateway.alice))[alice_before:] == []


async def test_pipelined_requests_are_each_authenticated(gateway: Gateway) -> None:
    bob_before = len(await gateway.seen(gateway.bob))
    first = gateway.request("/preview/alice/echo").replace(b"Connection: close\r\n", b"")
    # The second carries no token: a connection that proved alice once does not stay alice.
    second = b"GET /preview/bob/echo HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (
        gateway.settings.preview_host.encode()
    )
    third_with_alices_token = gateway.request("/preview/bob/echo")
    responses = await exchange(gateway.port, first + second)
    assert [response.status for response in responses] == [200, 401]
    responses = await exchange(gateway.port, third_with_alices_token)
    assert [response.status for response in responses] == [403]
    await _bob_untouched(gateway, bob_before)


# -- interim answers ---------------------------------------------------------------------------------


async def test_expect_100_continue_gets_one_final_answer(gateway: Gateway) -> None:
    upload = b"u" * 1000
    raw = gateway.request(
        "/preview/alice/echo",
        method="POST",
        headers=["Expect: 100-continue", f"Content-Length: {len(upload)}"],
    )
    responses = await exchange(gateway.port, raw + upload)
    # aiohttp's own 100 Continue, then the dev server's answer; not the dev server's 100 as the answer.
    assert [response.status for response in responses] == [100, 200]
    assert responses[1].json()["size"] == len(upload)
    assert "expect" not in responses[1].json()["headers"]
    followup = await gateway.alice.echo(path="echo?followup")
    assert followup["url"] == "/preview/alice/echo?followup"


async def test_early_hints_are_not_taken_for_the_answer(gateway: Gateway) -> None:
    assert await gateway.alice.echo(path="early-hints") == {"hinted": True}
    followup = await gateway.alice.echo(path="echo?followup")
    assert followup["url"] == "/preview/alice/echo?followup"
