"""Health, the OpenAPI document, and the error envelope for what no route matches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

import gateway
from gateway.settings import Settings

from .helpers import MakeClient, auth

pytestmark = [pytest.mark.docker, pytest.mark.postgres]


async def test_healthz_reports_docker_and_database(client: TestClient) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "docker": True, "database": True, "egress": True}


async def test_without_docker_the_gateway_runs_and_says_503(make_client: MakeClient) -> None:
    client = await make_client(docker_host="unix:///nonexistent/docker.sock")
    response = await client.get("/healthz")
    assert response.status == 503
    assert await response.json() == {"status": "degraded", "docker": False, "database": True, "egress": True}
    start = await client.post("/api/sandbox", headers=auth("alice"))
    assert start.status == 503
    assert (await start.json())["error"]["code"] == "docker_unavailable"


async def test_openapi_document_is_served_as_committed(client: TestClient) -> None:
    response = await client.get("/api/openapi.json")
    assert response.status == 200
    committed = json.loads((Path(gateway.__file__).parent / "openapi.json").read_text())
    served = await response.json()
    assert served == committed
    assert set(served["paths"]) >= {"/api/sandbox", "/api/sandbox/exec", "/healthz"}


async def test_unknown_path_and_method_get_json_errors(client: TestClient) -> None:
    missing = await client.get("/api/nothing-here")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    wrong_method = await client.put("/api/sandbox")
    assert wrong_method.status == 405
    assert (await wrong_method.json())["error"]["code"] == "method_not_allowed"
    assert set(wrong_method.headers["Allow"].split(",")) == {"GET", "POST", "DELETE"}


async def test_page_and_its_assets_are_served_without_a_token(client: TestClient, settings: Settings) -> None:
    response = await client.get("/", headers={"Host": settings.public_host})
    assert response.status == 200
    page = await response.text()
    assert "<title>sandbox-gateway</title>" in page
    assets = re.findall(r'(?:src|href)="(/static/assets/[^"]+)"', page)
    assert any(a.endswith(".js") for a in assets)
    for asset in assets:
        assert (await client.get(asset)).status == 200


async def test_page_redirects_to_its_public_origin(client: TestClient, settings: Settings) -> None:
    response = await client.get("/", allow_redirects=False)
    assert response.status == 307
    assert response.headers["Location"] == f"{settings.public_origin}/"


async def test_preview_origin_serves_no_page_and_no_api(client: TestClient, settings: Settings) -> None:
    for path in ("/", "/api/sandbox", "/api/openapi.json", "/healthz"):
        response = await client.get(path, headers={"Host": settings.preview_host, **auth("alice")})
        assert response.status == 404, path


async def test_every_api_route_is_in_the_openapi_document(client: TestClient) -> None:
    documented = json.loads((Path(gateway.__file__).parent / "openapi.json").read_text())["paths"]
    missing = [
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/")
        and route.method.lower() not in documented.get(route.resource.canonical, {})
    ]
    assert not missing, missing
