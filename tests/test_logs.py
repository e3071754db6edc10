"""Structured logs: JSON lines that carry the request id the response returns, and never a secret."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator

import pytest
from aiohttp.test_utils import TestClient

from gateway.access_log import AccessLogger
from gateway.app import create_app
from gateway.logs import log_handler
from gateway.settings import Settings

from .helpers import GatewayTestServer, auth

pytestmark = [pytest.mark.docker, pytest.mark.postgres]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the gateway logs during the test, as `python -m gateway` writes it."""
    stream = io.StringIO()
    handler = log_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_every_response_carries_a_request_id(client: TestClient) -> None:
    made = await client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-Id"])
    assert made.headers["X-Request-Id"] != (await client.get("/healthz")).headers["X-Request-Id"]
    # A load balancer's id is kept, so one id follows the request through both.
    passed = await client.get("/api/nothing", headers={"X-Request-Id": "lb-7f3a.2"})
    assert (passed.status, passed.headers["X-Request-Id"]) == (404, "lb-7f3a.2")
    # One that could forge a log field is replaced.
    forged = await client.get("/healthz", headers={"X-Request-Id": 'x", "level": "CRITICAL'})
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["X-Request-Id"])
    refused = await client.get("/api/sandbox")
    assert refused.status == 401
    assert "X-Request-Id" in refused.headers


async def test_log_lines_are_json_with_the_request_id_and_no_secrets(
    settings: Settings,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    json_log: io.StringIO,
) -> None:
    # As `python -m gateway` runs it: with the gateway's access logger.
    server = GatewayTestServer(create_app(settings))
    await server.start_server(access_log_class=AccessLogger)
    client = await aiohttp_client(server)
    headers = auth("alice")
    started = await client.post("/api/sandbox", headers=headers)
    assert started.status == 201
    secret_code = "console.log('SECRET-CODE-7c1e')"
    ran = await client.post(
        "/api/sandbox/exec", json={"language": "node", "code": secret_code}, headers=headers
    )
    assert ran.status == 200

    text = json_log.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "logger", "message", "request_id"} <= line.keys() for line in lines)
    start_lines = [line for line in lines if line["request_id"] == started.headers["X-Request-Id"]]
    assert any("started sandbox of alice" in line["message"] for line in start_lines)
    access = [line for line in lines if line["logger"] == "aiohttp.access"]
    exec_access = next(line for line in access if line["path"] == "/api/sandbox/exec")
    assert exec_access["request_id"] == ran.headers["X-Request-Id"]
    assert (exec_access["method"], exec_access["status"]) == ("POST", 200)
    assert exec_access["duration_ms"] > 0
    token = headers["Authorization"].removeprefix("Bearer ")
    assert token not in text
    assert "SECRET-CODE-7c1e" not in text
