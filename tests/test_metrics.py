"""/metrics: restricted by configuration, and counting what an operator watches."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import HttpRequests

from .helpers import MakeClient, auth, free_port, poll

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

METRICS_TOKEN = "metrics-token-for-the-tests"
SCRAPE = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample, keyed by its name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics", headers=SCRAPE)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return samples(await response.text())


async def test_without_a_token_configured_metrics_are_not_served(client: TestClient) -> None:
    response = await client.get("/metrics", headers=SCRAPE)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_metrics_need_the_metrics_token_not_a_users(make_client: MakeClient) -> None:
    client = await make_client(metrics_token=METRICS_TOKEN)
    for headers in ({}, auth("alice"), auth("root", admin=True), {"Authorization": "Bearer wrong"}):
        response = await client.get("/metrics", headers=headers)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"
    await scrape(client)


async def test_a_separate_listener_serves_metrics_alone(make_client: MakeClient) -> None:
    port = free_port()
    await make_client(metrics_address=("127.0.0.1", port))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            assert "sandbox_gateway_sandboxes" in await response.text()
        async with session.get(f"http://127.0.0.1:{port}/api/sandbox", headers=auth("alice")) as other:
            assert other.status == 404


async def test_starts_execs_requests_and_sandboxes_are_counted(make_client: MakeClient) -> None:
    client = await make_client(metrics_token=METRICS_TOKEN)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 200
    for code in ("console.log(1)", "process.exit(3)"):
        body = {"language": "node", "code": code}
        assert (await client.post("/api/sandbox/exec", json=body, headers=auth("alice"))).status == 200
    assert (await client.get("/preview/alice/", headers=auth("alice"))).status == 502
    scraped = await scrape(client)
    assert value(scraped, "sandbox_gateway_sandboxes", state="running") == 1
    assert value(scraped, "sandbox_gateway_sandbox_starts_total", result="created") == 1
    assert value(scraped, "sandbox_gateway_sandbox_starts_total", result="existing") == 1
    assert value(scraped, "sandbox_gateway_sandbox_start_seconds_count") == 1
    assert value(scraped, "sandbox_gateway_execs_total", language="node", outcome="ok") == 1
    assert value(scraped, "sandbox_gateway_execs_total", language="node", outcome="error") == 1
    assert value(scraped, "sandbox_gateway_exec_seconds_count", language="node") == 2
    # Routes by template: no user name, no raw path.
    exec_route = {"route": "/api/sandbox/exec", "method": "POST", "status": "200"}
    assert value(scraped, "sandbox_gateway_http_requests_total", **exec_route) == 2
    preview = {"route": "/preview/{user}/{tail}", "method": "GET", "status": "502"}
    assert value(scraped, "sandbox_gateway_http_requests_total", **preview) == 1
    assert not any("alice" in str(labels) for _, labels in scraped)

    assert (await client.delete("/api/sandbox", headers=auth("alice"))).status == 204
    scraped = await scrape(client)
    assert value(scraped, "sandbox_gateway_sandboxes", state="running") == 0
    assert value(scraped, "sandbox_gateway_sandboxes", state="stopped") == 1


async def test_open_terminals_are_a_gauge(make_client: MakeClient) -> None:
    client = await make_client(metrics_token=METRICS_TOKEN)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    ws = await client.ws_connect("/api/sandbox/terminal", headers=auth("alice"))
    assert value(await scrape(client), "sandbox_gateway_open_websockets", kind="terminal") == 1
    await ws.close()

    async def closed() -> bool:
        return value(await scrape(client), "sandbox_gateway_open_websockets", kind="terminal") == 0

    await poll(closed)


async def test_reaper_passes_and_reaped_sandboxes_are_counted(make_client: MakeClient) -> None:
    client = await make_client(metrics_token=METRICS_TOKEN, idle_timeout_s=1, reaper_interval_s=0.2)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201

    async def reaped() -> bool:
        return value(await scrape(client), "sandbox_gateway_sandboxes_reaped_total") == 1

    await poll(reaped, timeout_s=20)
    scraped = await scrape(client)
    assert value(scraped, "sandbox_gateway_reaper_passes_total", result="ok") >= 1
    assert value(scraped, "sandbox_gateway_reaper_passes_total", result="failed") == 0


async def test_docker_errors_are_counted(make_client: MakeClient) -> None:
    client = await make_client(metrics_token=METRICS_TOKEN, docker_host="unix:///nonexistent/docker.sock")
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 503
    scraped = await scrape(client)
    assert value(scraped, "sandbox_gateway_docker_errors_total", code="docker_unavailable") == 1
    assert value(scraped, "sandbox_gateway_sandbox_starts_total", result="failed") == 1


def test_request_durations_fall_in_inclusive_cumulative_buckets() -> None:
    registry = CollectorRegistry()
    requests = HttpRequests(buckets=(0.1, 1.0))
    registry.register(requests)
    for seconds in (0.05, 0.1, 0.5, 3.0):
        requests.count("/r", "GET", 200, seconds)
    requests.count("/r", "POST", 404, 0.01)
    scraped = samples(generate_latest(registry).decode())
    assert value(scraped, "sandbox_gateway_http_requests_total", route="/r", method="GET", status="200") == 4
    assert value(scraped, "sandbox_gateway_http_requests_total", route="/r", method="POST", status="404") == 1
    buckets = {le: value(scraped, "sandbox_gateway_http_request_seconds_bucket", route="/r", le=le)
               for le in ("0.1", "1.0", "+Inf")}  # fmt: skip
    # `le` includes its bound: 0.1 s counts in the 0.1 bucket, and every bucket counts those below.
    assert buckets == {"0.1": 3, "1.0": 4, "+Inf": 5}
    assert value(scraped, "sandbox_gateway_http_request_seconds_count", route="/r") == 5
    assert value(scraped, "sandbox_gateway_http_request_seconds_sum", route="/r") == pytest.approx(3.66)
