"""A ready-made Vite project (POST /api/sandbox/projects) under each runtime: created with npm from the
registry, its dev server started, its page and modules served through the preview, and a change to a
file pushed over Vite's HMR WebSocket through the gateway."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from gateway.settings import Settings

from .helpers import auth, poll

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

# create-vite and npm install from the registry, on a shared machine, under gVisor's ptrace platform.
CREATE_TIMEOUT_S = 300
# Since Vite 6.0.9 the HMR socket must carry the token its client script was served with.
WS_TOKEN = re.compile(r'const wsToken = "([^"]*)"')


@pytest.mark.runtimes
async def test_vite_project_is_served_and_hot_updated_through_the_preview(
    client: TestClient, settings: Settings, preview_http: aiohttp.ClientSession
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    created = await client.post(
        "/api/sandbox/projects",
        headers=auth("alice"),
        json={"template": "vanilla", "name": "app", "start": True},
        timeout=aiohttp.ClientTimeout(total=CREATE_TIMEOUT_S),
    )
    assert created.status == 201, await created.text()
    base = "/preview/alice/"
    headers = {"Host": settings.preview_host, **auth("alice")}

    async def page_served() -> bool:
        async with preview_http.get(base, headers=headers) as response:
            return response.status == 200 and f"{base}@vite/client" in await response.text()

    await poll(page_served, timeout_s=60, interval_s=0.5)
    async with preview_http.get(f"{base}@vite/client", headers=headers) as response:
        assert response.status == 200
        token = WS_TOKEN.search(await response.text())
    for module in ("src/main.js", "src/counter.js"):
        async with preview_http.get(f"{base}{module}", headers=headers) as response:
            assert response.status == 200, module
            assert "javascript" in response.headers["Content-Type"]

    query = f"?token={token.group(1)}" if token else ""
    ws = await preview_http.ws_connect(
        f"{base}{query}",
        headers={**headers, "Origin": settings.preview_origin},
        protocols=["vite-hmr"],
    )
    try:
        assert ws.protocol == "vite-hmr"
        assert json.loads(await ws.receive_str(timeout=10))["type"] == "connected"
        changed = await client.post(
            "/api/sandbox/exec",
            headers=auth("alice"),
            json={"language": "bash", "code": "echo '// changed' >> /workspace/app/src/counter.js"},
        )
        assert (await changed.json())["exit_code"] == 0
        # counter.js accepts no hot update itself, so Vite tells the page to reload, over this socket.
        while True:
            message = await ws.receive(timeout=30)
            assert message.type == WSMsgType.TEXT, message
            payload = json.loads(message.data)
            if payload["type"] in ("update", "full-reload"):
                break
            assert payload["type"] in ("ping", "custom"), payload
    finally:
        await ws.close()
    async with preview_http.get(f"{base}src/counter.js", headers=headers) as response:
        assert "// changed" in await response.text()
