"""The preview proxy's HTTP/1.1 client against a local aiohttp server: keep-alive reuse, HEAD,
chunked request bodies, and failures. No Docker needed."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.upstream import HIGH_WATER, UpstreamError, UpstreamPool

from .helpers import free_port, poll


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if request.path == "/cut":
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"partial")
        assert request.transport is not None
        request.transport.close()
        return response
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return web.json_response(
        {"method": request.method, "size": len(body), "chunked": request.headers.get("Transfer-Encoding"),
         "peer": list(peer) if peer else None}
    )  # fmt: skip


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    server = TestServer(app, port=free_port())
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


async def fetch(
    pool: UpstreamPool, port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        assert body is not None
        yield body[: len(body) // 2]
        yield body[len(body) // 2 :]

    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if body is not None else "\r\n"
    response = await pool.request(
        port, head.encode(), chunks() if body is not None else None, chunked=body is not None, method=method
    )
    received = b"".join([chunk async for chunk in response.body()])
    return response.status, received


async def test_connections_are_reused_and_bodies_arrive_whole(server: TestServer) -> None:
    pool = UpstreamPool()
    try:
        peers = set()
        for _ in range(5):
            status, body = await fetch(pool, server.port, "GET", "/x")
            assert status == 200
            peers.add(tuple(json.loads(body)["peer"]))
        # The server sees one client port: one keep-alive connection served all five.
        assert len(peers) == 1
        status, body = await fetch(pool, server.port, "POST", "/upload", b"a" * 300_000)
        assert b'"size": 300000' in body
        assert b'"chunked": "chunked"' in body
        # HEAD: a length is announced, no body follows, and nothing hangs.
        status, body = await fetch(pool, server.port, "HEAD", "/x")
        assert (status, body) == (200, b"")
        assert (await fetch(pool, server.port, "GET", "/x"))[0] == 200
    finally:
        pool.close()


async def test_failures_are_upstream_errors(server: TestServer) -> None:
    pool = UpstreamPool()
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            unused = sock.getsockname()[1]
        with pytest.raises(UpstreamError):
            await fetch(pool, unused, "GET", "/")
        with pytest.raises(UpstreamError):
            await fetch(pool, server.port, "GET", "/cut")
    finally:
        pool.close()


class ScriptedServer:
    """A raw HTTP/1.1 server that answers each path with bytes of its choosing, for answers no
    well-behaved server gives: interim responses, and an answer nobody asked for."""

    def __init__(self) -> None:
        self.stray = asyncio.Event()
        self.closed_by_client = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ", 2)[1]
                if path == b"/interim":
                    writer.write(
                        b"HTTP/1.1 100 Continue\r\n\r\n"
                        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
                    )
                elif path == b"/just-past-high-water":
                    body = b"x" * (HIGH_WATER + 1)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                elif path == b"/stray":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                    await self.stray.wait()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
        except asyncio.IncompleteReadError:
            self.closed_by_client.set()
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedServer, int]]:
    script = ScriptedServer()
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
    try:
        yield script, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_interim_responses_are_not_the_answer(scripted: tuple[ScriptedServer, int]) -> None:
    _, port = scripted
    pool = UpstreamPool()
    try:
        assert await fetch(pool, port, "GET", "/interim") == (200, b"final")
        # The connection stays in step: the next request gets its own answer.
        assert await fetch(pool, port, "GET", "/next") == (200, b"/next")
    finally:
        pool.close()


async def test_an_answer_to_nothing_asked_ends_the_connection(scripted: tuple[ScriptedServer, int]) -> None:
    script, port = scripted
    pool = UpstreamPool()
    try:
        assert await fetch(pool, port, "GET", "/stray") == (200, b"first")
        # The connection is idle in the pool when the stray answer arrives: it must not be kept for
        # the next request, which would take the stray answer for its own.
        script.stray.set()
        async with asyncio.timeout(10):
            await script.closed_by_client.wait()
        assert await fetch(pool, port, "GET", "/next") == (200, b"/next")
    finally:
        pool.close()


async def test_an_upload_that_fails_midway_ends_the_connection(scripted: tuple[ScriptedServer, int]) -> None:
    script, port = scripted
    pool = UpstreamPool()

    async def failing_upload() -> AsyncIterator[bytes]:
        yield b"part of a body"
        raise ConnectionResetError("the client went away")

    head = b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    try:
        with pytest.raises(ConnectionResetError):
            await pool.request(port, head, failing_upload(), chunked=True, method="POST")
        # Half a request went out: the connection is closed, not left for the server to wait on.
        async with asyncio.timeout(10):
            await script.closed_by_client.wait()
        assert await fetch(pool, port, "GET", "/next") == (200, b"/next")
    finally:
        pool.close()


async def test_a_body_taken_whole_past_the_high_water_mark_leaves_the_connection_reading(
    scripted: tuple[ScriptedServer, int],
) -> None:
    _, port = scripted
    pool = UpstreamPool()
    try:
        head = b"GET /just-past-high-water HTTP/1.1\r\nHost: localhost\r\n\r\n"
        response = await pool.request(port, head, None, chunked=False, method="GET")
        # One byte past the mark: reading pauses only as the last byte arrives, with the message complete.
        whole: list[bytes] = []

        async def taken() -> bool:
            body = response.complete_body()
            if body is not None:
                whole.append(body)
            return bool(whole)

        await poll(taken)
        assert len(whole[0]) == HIGH_WATER + 1
        # The connection went back to the pool; the next request on it must be read, not hang.
        async with asyncio.timeout(10):
            assert await fetch(pool, port, "GET", "/next") == (200, b"/next")
    finally:
        pool.close()
