"""Client connections (gateway/connections.py, request_handler.py, the front door): a request head
must arrive within the head timeout on every path, a peer address holds a bounded number of
connections, and a ceiling on all of them keeps the gateway's own Docker and PostgreSQL connections
working under a flood. Against the real gateway served by GatewayRunner, and `python -m gateway` under
an open-file limit of 1,024; all traffic to 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiodocker
import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from gateway.connections import DEPENDENCY_RESERVE, FILES_PER_CONNECTION, connection_ceiling
from gateway.keys import METRICS
from gateway.settings import Settings

from .gateway_processes import stop_process
from .helpers import JWT_SECRET, MakeClient, auth, free_port, poll
from .test_frontdoor import server_of
from .test_preview import Preview, ready_preview

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

HEAD_TIMEOUT_S = 1.0
# How late a close may come after its deadline on this shared machine (timers, a busy loop).
LATE_S = 1.5
# A slow client: one byte this often.
TRICKLE_S = 0.1
HOST = "sandbox.localhost"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings with a head timeout short enough to wait for."""
    return replace(settings, header_timeout_s=HEAD_TIMEOUT_S)


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """A raw client connection, from a loopback address of the test's choosing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = asyncio.get_running_loop().time()

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        return cls(reader, writer)

    async def answer(self, timeout_s: float = 10.0) -> RawAnswer:
        """The next response on the connection (every answer here has a Content-Length)."""
        async with asyncio.timeout(timeout_s):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return RawAnswer(int(status_line.split()[1]), headers, body)

    async def get(self, path: str, host: str = HOST, *extra: str) -> RawAnswer:
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *extra]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return await self.answer()

    async def closed_within(self, timeout_s: float) -> float:
        """Reads until the gateway closes the connection; the loop time it closed at."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            pytest.fail(f"the gateway did not close the connection within {timeout_s} s")
        except ConnectionResetError:
            pass
        return loop.time()

    async def still_open_after(self, seconds: float) -> bool:
        """Whether the connection is still open `seconds` from now (nothing read meanwhile)."""
        try:
            async with asyncio.timeout(seconds):
                data = await self.reader.read(1)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        assert data == b"", f"unexpected bytes {data!r}"
        return False

    def close(self) -> None:
        self.writer.close()


Connect = Callable[..., Awaitable[Connection]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Opens raw connections (port, source address), every one closed after the test."""
    opened: list[Connection] = []

    async def open_connection(port: int, source: str = "127.0.0.1") -> Connection:
        connection = await Connection.open(port, source)
        opened.append(connection)
        return connection

    try:
        yield open_connection
    finally:
        for connection in opened:
            connection.close()


@contextlib.asynccontextmanager
async def trickling(connection: Connection, data: bytes) -> AsyncIterator[None]:
    """Writes `data` a byte every TRICKLE_S, as a slowloris client does, until done or closed."""

    async def trickle() -> None:
        for byte in data:
            connection.writer.write(bytes([byte]))
            await asyncio.sleep(TRICKLE_S)  # the client's pace, not a synchronisation

    task = asyncio.create_task(trickle())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task
        connection.close()


def sample(client: TestClient, name: str, **labels: str) -> float:
    return client.app[METRICS].registry.get_sample_value(name, labels) or 0.0


def head_timeouts(client: TestClient, path: str) -> float:
    return sample(client, "sandbox_gateway_head_timeouts_total", path=path)


def assert_closed_at_the_timeout(started: float, closed: float) -> None:
    took = closed - started
    assert HEAD_TIMEOUT_S - 0.05 <= took <= HEAD_TIMEOUT_S + LATE_S, f"closed after {took:.2f} s"


# A head that never ends: a header line after another, each trickled.
ENDLESS = b"".join(f"X-Slow-{n}: {'a' * 20}\r\n".encode() for n in range(200))


@pytest.mark.parametrize(
    ("sent", "what"),
    [(b"", "a connection that sends nothing"), (b"GET /healthz HTTP/1.1\r\n" + ENDLESS, "a GET head")],
)
async def test_a_head_trickled_to_the_door_is_cut_off_at_the_timeout(
    client: TestClient, settings: Settings, sent: bytes, what: str, connect: Connect
) -> None:
    server = server_of(client)
    handed_over = server.handed_over
    connection = await connect(settings.port)
    async with trickling(connection, sent):
        closed = await connection.closed_within(HEAD_TIMEOUT_S + LATE_S + 1)
    assert_closed_at_the_timeout(connection.opened, closed)
    assert server.handed_over == handed_over, f"{what}: the door's to time"
    assert head_timeouts(client, "door") == 1


async def test_a_post_head_trickled_through_aiohttp_is_cut_off_at_the_timeout(
    client: TestClient, settings: Settings, connect: Connect
) -> None:
    """A POST is aiohttp's from its first byte; the head is timed from the accept all the same."""
    server = server_of(client)
    handed_over = server.handed_over
    connection = await connect(settings.port)
    async with trickling(connection, b"POST /api/sandbox/exec HTTP/1.1\r\n" + ENDLESS):
        closed = await connection.closed_within(HEAD_TIMEOUT_S + LATE_S + 1)
    assert_closed_at_the_timeout(connection.opened, closed)
    assert server.handed_over == handed_over + 1
    assert head_timeouts(client, "aiohttp") == 1
    assert head_timeouts(client, "door") == 0


async def test_a_second_head_on_a_kept_alive_aiohttp_connection_is_timed_from_its_first_byte(
    client: TestClient, settings: Settings, connect: Connect
) -> None:
    """Between requests a connection may idle (the keep-alive timeout, 75 s); once a head begins,
    it has the head timeout."""
    server = server_of(client)
    handed_over = server.handed_over
    connection = await connect(settings.port)
    assert (await connection.get("/healthz")).status == 200
    assert server.handed_over == handed_over + 1
    assert await connection.still_open_after(2 * HEAD_TIMEOUT_S), "idle is not slow"
    started = asyncio.get_running_loop().time()
    async with trickling(connection, b"GET /healthz HTTP/1.1\r\n" + ENDLESS):
        closed = await connection.closed_within(HEAD_TIMEOUT_S + LATE_S + 1)
    assert_closed_at_the_timeout(started, closed)
    assert head_timeouts(client, "aiohttp") == 1


async def test_a_slow_body_is_not_a_slow_head(
    client: TestClient, settings: Settings, connect: Connect
) -> None:
    """The head at once, the body a byte at a time over several head timeouts: answered."""
    body = json.dumps({"language": "python", "code": "print(1)  # a slow upload, but an upload"}).encode()
    assert len(body) * TRICKLE_S > 3 * HEAD_TIMEOUT_S
    head = (
        f"POST /api/sandbox/exec HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {auth('alice')['Authorization']}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    connection = await connect(settings.port)
    connection.writer.write(head.encode())
    async with trickling(connection, body):
        answer = await connection.answer(timeout_s=len(body) * TRICKLE_S + 10)
    assert answer.status == 409, answer.body  # read whole, then: no sandbox running
    assert json.loads(answer.body)["error"]["code"] == "sandbox_not_running"
    assert head_timeouts(client, "aiohttp") == head_timeouts(client, "door") == 0


@pytest.fixture
async def path_preview(
    client: TestClient, settings: Settings, docker: aiodocker.Docker, preview_http: aiohttp.ClientSession
) -> Preview:
    return await ready_preview(client, settings, docker, preview_http, "path")


async def test_on_the_door_path_a_second_head_is_timed_and_every_path_releases_its_slot(
    path_preview: Preview, client: TestClient, settings: Settings, connect: Connect
) -> None:
    """A connection is counted once from the accept to its end, whoever serves it by then: the door,
    aiohttp after a hand-over, a splice of either. And a kept-alive connection the door answered
    times its next head as aiohttp's do."""
    server = server_of(client)
    counts = server.client_connections
    # From an address of its own, to count this test's connections apart from the fixtures'.
    me = "127.0.0.3"

    async def held(expected: int) -> bool:
        return counts.held_by(me) == expected

    token = auth("alice")["Authorization"]
    answered = server.answered
    door = await connect(settings.port, source=me)
    await poll(lambda: held(1), timeout_s=5)
    answer = await door.get("/preview/alice/small", path_preview.host, f"Authorization: {token}")
    assert answer.status == 200
    assert server.answered == answered + 1, "answered at the door"
    assert await door.still_open_after(2 * HEAD_TIMEOUT_S)
    started = asyncio.get_running_loop().time()
    async with trickling(door, b"GET /preview/alice/small HTTP/1.1\r\n" + ENDLESS):
        closed = await door.closed_within(HEAD_TIMEOUT_S + LATE_S + 1)
    assert_closed_at_the_timeout(started, closed)
    assert head_timeouts(client, "door") == 1
    await poll(lambda: held(0), timeout_s=5)

    # A WebSocket at the door (spliced from the door's transport), one aiohttp takes (a repeated
    # header makes the door hand it over), and a body (handed over, and on the preview origin answered
    # with Connection: close): three connections, then two, then none.
    connector = aiohttp.TCPConnector(local_addr=(me, 0))
    async with aiohttp.ClientSession(base_url=client.make_url(""), connector=connector) as http:
        headers = {"Host": path_preview.host, **auth("alice")}
        at_door = await http.ws_connect(path_preview.url("ws"), headers=headers, protocols=["vite-hmr"])
        handed = await http.ws_connect(
            path_preview.url("ws"),
            headers=[*headers.items(), ("X-Request-Id", "a"), ("X-Request-Id", "b")],
            protocols=["vite-hmr"],
        )
        posted = await http.post(path_preview.url("echo"), headers=headers, data=b"body")
        assert posted.status == 200
        await posted.read()
        for ws in (at_door, handed):
            await ws.send_str("ping")
            assert (await ws.receive()).data == "ping"
        assert len(server.splices) == 1, "one spliced at the door"
        assert posted.headers["Connection"] == "close"
        await poll(lambda: held(2), timeout_s=5)
        await at_door.send_str("close:4000")
        assert (await at_door.receive()).type == WSMsgType.CLOSE
        await poll(lambda: held(1), timeout_s=5)
        await handed.close()
        await poll(lambda: held(0), timeout_s=5)


async def _is(value: int, expected: int) -> bool:
    return value == expected


async def test_one_address_holds_at_most_its_share_and_the_rest_are_refused_at_once(
    make_client: MakeClient, settings: Settings, connect: Connect
) -> None:
    client = await make_client(max_connections_per_client=4, header_timeout_s=30.0)
    counts = server_of(client).client_connections
    port = settings.port
    # Two idle at the door, two kept alive by aiohttp after a request: all four count.
    held = [await connect(port) for _ in range(2)]
    for _ in range(2):
        kept = await connect(port)
        assert (await kept.get("/healthz")).status == 200
        held.append(kept)
    assert counts.held_by("127.0.0.1") == 4

    refused = await connect(port)
    answer = await refused.answer()
    assert answer.status == 503
    assert json.loads(answer.body)["error"]["code"] == "too_many_connections"
    assert answer.headers["connection"] == "close"
    assert answer.headers["retry-after"] == "1"
    await refused.closed_within(5)
    assert sample(client, "sandbox_gateway_connections_refused_total", reason="per_client") == 1
    assert counts.held_by("127.0.0.1") == 4

    # Another address is another client; the one held connection of the first still answers.
    other = await connect(port, source="127.0.0.2")
    assert (await other.get("/healthz")).status == 200
    assert (await held[-1].get("/healthz")).status == 200
    other.close()

    held.pop(0).close()

    async def admitted_again() -> bool:
        connection = await connect(port)
        try:
            return (await connection.get("/healthz")).status == 200
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        finally:
            connection.close()

    await poll(admitted_again, timeout_s=5)
    for connection in held:
        connection.close()
    await poll(lambda: _is(counts.open, 0), timeout_s=5)
    scraped = sample(client, "sandbox_gateway_client_connection_limit", bound="per_client")
    assert scraped == 4


def test_the_ceiling_reserves_descriptors_for_the_gateway_itself() -> None:
    assert connection_ceiling(None, 1024) == (1024 - DEPENDENCY_RESERVE) // FILES_PER_CONNECTION == 384
    assert connection_ceiling(None, 1 << 20) == ((1 << 20) - DEPENDENCY_RESERVE) // 2
    assert connection_ceiling(100, 1024) == 100
    # Past the reserve, never: an operator may give up the halving, not the gateway's own files.
    assert connection_ceiling(5000, 1024) == 1024 - DEPENDENCY_RESERVE
    assert connection_ceiling(None, 200) == 32


# The soft limit services start with, which the 1,100 idle connections filled.
SERVICE_FILES = 1024
FLOOD = 1100
# From five loopback addresses, 220 each: under the per-client bound of 256, so that the ceiling on
# all connections is what holds (as against many clients, or behind a proxy with the bound off).
FLOOD_SOURCES = [f"127.0.0.{n}" for n in range(2, 7)]
# python -m gateway under a hard limit of 1,024 files, which it cannot raise past.
LIMITED_GATEWAY = (
    "import resource, runpy; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({SERVICE_FILES}, {SERVICE_FILES})); "
    "runpy.run_module('gateway', run_name='__main__', alter_sys=True)"
)
METRICS_TOKEN = "connections-test-metrics-token"
WATCHERS = 4


@dataclass
class LimitedGateway:
    port: int
    log: Path
    process: asyncio.subprocess.Process


@pytest.fixture
async def limited_gateway(settings: Settings, tmp_path: Path) -> AsyncIterator[LimitedGateway]:
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_JWT_SECRET": JWT_SECRET,
        "DATABASE_URL": settings.database_url,
        "GATEWAY_NAME": settings.gateway_name,
        "SANDBOX_NETWORK": settings.sandbox_network,
        "SANDBOX_IMAGE": settings.sandbox_image,
        "GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
        "GATEWAY_LOG_LEVEL": "INFO",
        "GATEWAY_LOG_FORMAT": "text",
        # Long enough that the flood's one-byte heads outlive the checks: the ceiling is under test.
        "GATEWAY_HEADER_TIMEOUT_S": "120",
    }
    log = tmp_path / "gateway.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LIMITED_GATEWAY, env=env, stdout=sink, stderr=sink
        )
    gateway = LimitedGateway(port, log, process)

    async def healthy() -> bool:
        if process.returncode is not None:
            pytest.fail(f"the gateway exited at start:\n{log.read_text(errors='replace')}")
        try:
            connection = await Connection.open(port)
        except OSError:
            return False
        try:
            return (await connection.get("/healthz")).status == 200
        finally:
            connection.close()

    try:
        await poll(healthy, timeout_s=30, interval_s=0.1)
        yield gateway
    finally:
        await stop_process(process)


def _enough_files_for_the_flood() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FLOOD + 512
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"the test's own flood needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def _refused(connection: Connection) -> bool:
    """Whether the gateway refused the connection: a 503 (or a reset, when the client's byte came
    after the close), as against held open, waiting for the rest of its head."""
    try:
        answer = await connection.answer(timeout_s=3)
    except TimeoutError:
        return False
    except (asyncio.IncompleteReadError, ConnectionError):
        return True
    assert answer.status == 503
    return True


async def test_a_flood_past_the_ceiling_leaves_healthz_reaching_docker_and_postgresql(
    limited_gateway: LimitedGateway, connect: Connect
) -> None:
    """The issue's figure: a gateway with 1,024 open files, 1,100 connections that send one byte
    each. Before the ceiling, accept() and then Docker's and PostgreSQL's connects failed
    ("docker": false). Now the connections past the ceiling are refused as they come, and a client
    already connected asks /healthz with both dependencies true."""
    _enough_files_for_the_flood()
    port = limited_gateway.port
    ceiling = connection_ceiling(None, SERVICE_FILES)
    assert f"client connections: at most {ceiling}," in limited_gateway.log.read_text()
    # Clients connected before the flood, from an address of their own; they ask at once, so that
    # the gateway needs new connections to Docker and PostgreSQL (its pools hold one idle each).
    watchers = [await connect(port, "127.0.0.7") for _ in range(WATCHERS)]
    for watcher in watchers:
        assert (await watcher.get("/healthz")).status == 200

    flood: list[Connection] = []
    try:
        for n in range(FLOOD):
            connection = await connect(port, FLOOD_SOURCES[n % len(FLOOD_SOURCES)])
            connection.writer.write(b"G" if n % 2 else b"P")  # at the door, and handed to aiohttp
            flood.append(connection)
        outcomes = await asyncio.gather(*(_refused(connection) for connection in flood))

        for _ in range(3):
            answers = await asyncio.gather(*(watcher.get("/healthz") for watcher in watchers))
            healthy = {"status": "ok", "docker": True, "database": True, "egress": True}
            assert [(a.status, json.loads(a.body)) for a in answers] == [(200, healthy)] * WATCHERS
        refused = sum(outcomes)
        # The watchers hold their places; the first ones of the flood the rest.
        held = ceiling - WATCHERS
        assert outcomes == [False] * held + [True] * (FLOOD - held)
    finally:
        for connection in flood:
            connection.close()

    async def metrics() -> str | None:
        connection = await connect(port)
        try:
            answer = await connection.get("/metrics", HOST, f"Authorization: Bearer {METRICS_TOKEN}")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        finally:
            connection.close()
        return answer.body.decode() if answer.status == 200 else None

    scraped: str | None = None

    async def admitted() -> bool:
        nonlocal scraped
        scraped = await metrics()
        return scraped is not None

    await poll(admitted, timeout_s=10)
    assert scraped is not None
    samples = dict(line.rsplit(" ", 1) for line in scraped.splitlines() if not line.startswith("#"))
    # And perhaps a scrape or two of the poll's, refused before the flood's closes were all seen.
    assert float(samples['sandbox_gateway_connections_refused_total{reason="total"}']) >= refused
    assert float(samples['sandbox_gateway_client_connection_limit{bound="total"}']) == ceiling
