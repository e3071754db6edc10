"""Preview end to end in a real browser: a Vite React project created through the API, hot reload
through the gateway's WebSocket relay, and the isolation of preview content from the page and API."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Frame, Page, expect

from gateway.settings import Settings
from gateway.tokens import mint_token

from .helpers import auth, poll

pytestmark = [pytest.mark.docker, pytest.mark.postgres, pytest.mark.browser]

APP_JSX = """export default function App() {
  return <h1 id="title">%s</h1>;
}
"""

# Preview content that tries to act as the viewer. Every attempt must fail.
PROBE_HTML = """<!doctype html><meta charset="utf-8"><title>probe</title><body><script>
const results = {};
const api = new URLSearchParams(location.search).get("api");
try { results.parent = String(window.parent.document.title); } catch (e) { results.parent = "blocked"; }
try { results.storage = String(sessionStorage.getItem("sandbox-gateway.token")); }
catch (e) { results.storage = "blocked"; }
results.cookie = document.cookie.includes("sandbox_preview") ? "visible" : "hidden";
try { window.top.location.href = "https://example.org/"; results.navigate = "allowed"; }
catch (e) { results.navigate = "blocked"; }
Promise.all([
  fetch(api + "/api/sandbox", { credentials: "include" }).then(r => "status " + r.status, () => "blocked"),
  fetch("/api/sandbox", { credentials: "include" }).then(r => "status " + r.status, () => "blocked"),
]).then(([crossOrigin, ownOrigin]) => {
  results.api = crossOrigin;
  results.api_on_preview_origin = ownOrigin;
  document.body.dataset.results = JSON.stringify(results);
});
</script></body>
"""


async def run(client: TestClient, code: str, stdin: str = "", timeout_ms: int = 60_000) -> dict[str, Any]:
    response = await client.post(
        "/api/sandbox/exec",
        headers=auth("alice"),
        json={"language": "bash", "code": code, "stdin": stdin, "timeout_ms": timeout_ms},
    )
    result: dict[str, Any] = await response.json()
    assert result["exit_code"] == 0, result
    return result


async def preview_frame(page: Page) -> Frame:
    frame = None

    async def loaded() -> bool:
        nonlocal frame
        frame = next((f for f in page.frames if "/preview/alice/" in f.url), None)
        return frame is not None

    await poll(loaded, timeout_s=30)
    assert frame is not None
    return frame


async def test_vite_react_hot_reload_and_isolation(
    page: Page, client: TestClient, settings: Settings, artifacts: Path
) -> None:
    await page.goto(settings.public_url + "/")
    await page.fill("#token", mint_token("alice", settings, 600))
    await page.click("#sign-in button")
    await page.click("#start")
    await expect(page.locator("#state")).to_have_text("running", timeout=30_000)

    created = await client.post(
        "/api/sandbox/projects",
        headers=auth("alice"),
        json={"template": "react", "name": "app", "start": True},
    )
    assert created.status == 201, await created.text()
    await run(client, "cat > /workspace/app/src/App.jsx", stdin=APP_JSX % "Before the edit")

    # The page asks for a preview session; the iframe logs in on the preview origin and shows the app.
    await page.click("#preview-reload")
    frame = await preview_frame(page)
    await expect(frame.locator("#title")).to_have_text("Before the edit", timeout=60_000)
    assert frame.url.startswith(settings.preview_origin)

    # Hot reload: the edit arrives over Vite's HMR WebSocket, through the gateway, without a reload.
    await frame.evaluate("window.__survivesHotReload = 'yes'")
    await run(client, "cat > /workspace/app/src/App.jsx", stdin=APP_JSX % "After the edit")
    await expect(frame.locator("#title")).to_have_text("After the edit", timeout=30_000)
    assert await frame.evaluate("window.__survivesHotReload") == "yes"
    await page.screenshot(path=artifacts / "preview-hmr.png")

    # Isolation: preview content tries to use the viewer's credentials and to reach the page.
    assert await page.evaluate("sessionStorage.getItem('sandbox-gateway.token')"), (
        "control: the page has a token"
    )
    await run(client, "cat > /workspace/app/public/probe.html", stdin=PROBE_HTML)
    await frame.goto(f"{settings.preview_origin}/preview/alice/probe.html?api={settings.public_origin}")
    probe = frame.locator("body[data-results]")
    await expect(probe).to_have_count(1, timeout=15_000)
    results = json.loads(await probe.get_attribute("data-results") or "{}")
    assert results == {
        "parent": "blocked",  # another origin: the page's DOM is out of reach
        "storage": "null",  # the preview origin's own storage holds no token
        "cookie": "hidden",  # the preview cookie is HttpOnly
        "navigate": "blocked",  # the iframe may not navigate the page away
        "api": "blocked",  # the API is another origin, and takes no cookie anyway
        "api_on_preview_origin": "status 404",  # the preview origin serves no API
    }
    await expect(page.locator("#state")).to_have_text("running")
    assert re.match(rf"^{re.escape(settings.public_origin)}/", page.url)
