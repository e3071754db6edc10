"""Previews end to end in a real browser: a Vite app made by typing create-vite's own steps into the
page's terminal, shown at the root of the sandbox's own origin with hot reload; the other templates a
user is likely to pick; share links; and the isolation of preview content from the page, the API and
other users' previews."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Frame, Locator, Page, Request, Response, expect

from gateway.settings import Settings
from gateway.tokens import mint_token

from .helpers import auth, poll, running_container_id

pytestmark = [pytest.mark.docker, pytest.mark.postgres, pytest.mark.browser]

NPM_S = 240_000  # create-vite and npm install from the registry, on a shared machine

APP_JSX = """export default function App() {
  return <h1 id="title">%s</h1>;
}
"""

# Preview content that tries to act as the viewer. Every attempt must fail.
PROBE_HTML = """<!doctype html><meta charset="utf-8"><title>probe</title><body><script>
const results = {};
const query = new URLSearchParams(location.search);
const api = query.get("api"), other = query.get("other");
try { results.parent = String(window.parent.document.title); } catch (e) { results.parent = "blocked"; }
try { results.storage = String(sessionStorage.getItem("sandbox-gateway.token")); }
catch (e) { results.storage = "blocked"; }
results.cookie = document.cookie.includes("sandbox_") ? "visible" : "hidden";
try { window.top.location.href = "https://example.org/"; results.navigate = "allowed"; }
catch (e) { results.navigate = "blocked"; }
const read = (url) => fetch(url, { credentials: "include" }).then(
  (r) => r.text().then((t) => (t.includes('"state"') ? "read the API" : "status " + r.status)),
  () => "blocked");
const frameOf = (url) => new Promise((resolve) => {
  const frame = document.createElement("iframe");
  frame.src = url;
  frame.onload = () => {
    try { resolve(String(frame.contentDocument.body.innerHTML.length)); } catch (e) { resolve("blocked"); }
  };
  document.body.append(frame);
});
Promise.all([
  read(api + "/api/sandbox"),
  read("/api/sandbox"),
  other ? read(other + "/") : Promise.resolve("none"),
  other ? frameOf(other + "/") : Promise.resolve("none"),
]).then(([crossOrigin, ownOrigin, otherFetch, otherFrame]) => {
  Object.assign(results, { api: crossOrigin, api_on_preview_origin: ownOrigin, other_fetch: otherFetch,
                           other_frame: otherFrame });
  document.body.dataset.results = JSON.stringify(results);
});
</script></body>
"""


async def run(client: TestClient, code: str, user: str = "alice", stdin: str = "") -> dict[str, Any]:
    response = await client.post(
        "/api/sandbox/exec",
        headers=auth(user),
        json={"language": "bash", "code": code, "stdin": stdin, "timeout_ms": 60_000},
    )
    result: dict[str, Any] = await response.json()
    assert result["exit_code"] == 0, result
    return result


async def sign_in_and_start(page: Page, settings: Settings, user: str = "alice") -> None:
    await page.goto(settings.public_url + "/")
    await page.fill("#token", mint_token(user, settings, 1200))
    await page.click("#sign-in button")
    await page.click("#start")
    await expect(page.locator("#state")).to_have_text("running", timeout=30_000)


async def origin_of(client: TestClient, user: str = "alice") -> str:
    body = await (await client.get("/api/sandbox", headers=auth(user))).json()
    origin: str = body["preview_url"].rstrip("/")
    return origin


async def answering(
    client: TestClient, origin: str, timeout_s: float, user: str = "alice", log: str | None = None
) -> None:
    """Waits until the dev server behind the user's preview origin answers 200 at its root. When it
    does not, the failure shows the last answer, the sandbox's processes and the end of `log`."""
    last = ""

    async def answers() -> bool:
        nonlocal last
        answer = await client.get("/", headers={"Host": origin.split("//", 1)[1], **auth(user)})
        last = f"{answer.status} {(await answer.text())[:300]!r}"
        return answer.status == 200

    try:
        await poll(answers, timeout_s=timeout_s)
    except pytest.fail.Exception:
        tail = f"tail -c 3000 {shlex.quote(log)};" if log else ""
        seen = await client.post(
            "/api/sandbox/exec",
            headers=auth(user),
            json={"language": "bash", "code": f"{tail} ps -eo pid,stat,etime,rss,args", "timeout_ms": 10_000},
        )
        pytest.fail(f"{origin} did not answer 200 within {timeout_s} s; last: {last}\n{await seen.text()}")


async def preview_frame(page: Page, origin: str) -> Frame:
    frame = None

    async def loaded() -> bool:
        nonlocal frame
        frame = next((f for f in page.frames if f.url.startswith(origin + "/")), None)
        return frame is not None

    await poll(loaded, timeout_s=30)
    assert frame is not None
    return frame


async def shown_and_counting(
    page: Page, origin: str, failures: list[str] | None = None
) -> tuple[Frame, Locator]:
    """The page's preview pane shows the template's app, and its counter counts a click.

    Chromium drops the requests it has in flight when this host's network changes (Docker adding or
    removing a bridge or a veth for a sandbox: net::ERR_NETWORK_CHANGED), and a Vite app whose module
    failed to load stays blank: nothing retries an import. A user would press reload, and so does this,
    only then, at most three times; what failed in the dropped load is not the dev server's failing
    (`failures` forgets it)."""
    dropped: list[str] = []
    seen: list[str] = []  # for the failure's message
    page.on("console", lambda message: seen.append(f"{message.type}: {message.text}"[:300]))

    def failed(request: Request) -> None:
        seen.append(f"failed {request.url} {request.failure}")
        if request.failure == "net::ERR_NETWORK_CHANGED" and request.url.startswith(origin + "/"):
            dropped.append(request.url)

    page.on("requestfailed", failed)
    for _ in range(3):
        dropped.clear()
        before = len(failures) if failures is not None else 0
        await page.click("#preview-reload")
        frame = await preview_frame(page, origin)
        counter = frame.locator("button.counter")

        async def shown_or_dropped(counter: Locator = counter) -> bool:
            return bool(dropped) or bool(
                await counter.count() == 1 and re.search(r"Count is 0", await counter.inner_text())
            )

        try:
            await poll(shown_or_dropped, timeout_s=60)
        except pytest.fail.Exception:
            text = "document.body?.innerText ?? null"
            shown = [f"{f.url}: {(await f.evaluate(text))!r:.300}" for f in page.frames]
            pytest.fail(f"the app's counter did not show\nframes: {shown}\nbrowser: {seen[-40:]}")
        if not dropped:
            break
        # Only the dropped load's own failures are forgotten, never what came before it.
        if failures is not None:
            del failures[before:]
    else:
        pytest.fail(f"three loads of the preview lost requests to network changes: {dropped}")
    await counter.click()
    await expect(counter).to_have_text(re.compile(r"Count is 1"))
    return frame, counter


def failed_requests(page: Page) -> list[str]:
    """Every 4xx or 5xx the browser met from now on, in any frame."""
    failures: list[str] = []

    def seen(response: Response) -> None:
        if response.status >= 400:
            failures.append(f"{response.status} {response.url}")

    page.on("response", seen)
    return failures


class Terminal:
    """The page's xterm, as a person uses it: typing, and reading the screen."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.rows = page.locator("#terminal .xterm-rows")

    async def type(self, line: str) -> None:
        await self.page.click("#terminal")
        await self.page.keyboard.type(line)
        await self.page.keyboard.press("Enter")

    async def lines(self) -> list[str]:
        return await self.rows.locator(":scope > div").all_inner_texts()

    async def choose(self, option: str, timeout_s: float = 60) -> None:
        """In one of create-vite's menus, moves to `option` (● marks the current one) and takes it."""

        async def on_option() -> bool:
            lines = [line for line in await self.lines() if "●" in line]
            if lines and re.search(rf"●\s*{re.escape(option)}\s*$", lines[-1]):
                return True
            await self.page.keyboard.press("ArrowDown")
            return False

        await poll(on_option, timeout_s=timeout_s)
        await self.page.keyboard.press("Enter")

    async def answer(self, choices: dict[str, str], timeout_s: float = 120) -> None:
        """Answers create-vite's questions (◆ marks the open one, ◇ the answered ones) until it is
        done: the `choices` given, "No" to installing and starting at once (the guide's own steps
        follow), and the default to any other question a newer create-vite may ask."""
        answered_when_acted = -1

        async def done() -> bool:
            nonlocal answered_when_acted
            lines = await self.lines()
            screen = "\n".join(lines)
            if "Done. Now run" in screen:
                return True
            open_questions = [line.split("◆", 1)[1].strip() for line in lines if "◆" in line]
            answered = screen.count("◇")
            if not open_questions or answered == answered_when_acted:
                return False
            answered_when_acted = answered
            question = open_questions[-1]
            option = next((value for key, value in choices.items() if key in question), None)
            if option is not None:
                await self.choose(option)
            elif "start now" in question:
                await self.page.keyboard.press("ArrowRight")
                await self.page.keyboard.press("Enter")
            else:
                await self.page.keyboard.press("Enter")
            return False

        await poll(done, timeout_s=timeout_s)


async def test_vite_react_typed_in_the_terminal_runs_at_the_root_with_hot_reload(
    page: Page, client: TestClient, settings: Settings, artifacts: Path
) -> None:
    await sign_in_and_start(page, settings)
    await expect(page.locator("#terminal-status")).to_have_text("connected", timeout=15_000)
    terminal = Terminal(page)
    await expect(terminal.rows).to_contain_text("$", timeout=15_000)

    # The set-up guide's steps, typed as a new user types them.
    await terminal.type("npm create vite@latest my-app")

    async def asked_for_a_framework() -> bool:
        screen = "\n".join(await terminal.lines())
        if "Ok to proceed?" in screen and "Select a framework" not in screen:
            await page.keyboard.press("Enter")  # npx installs create-vite first: yes, as a user would
            await expect(terminal.rows).to_contain_text("Select a framework", timeout=NPM_S)
        return "Select a framework" in screen

    await poll(asked_for_a_framework, timeout_s=NPM_S / 1000)
    await terminal.answer({"Select a framework": "React", "Select a variant": "JavaScript"})
    await terminal.type("cd my-app")
    await terminal.type("npm install")
    await expect(terminal.rows).to_contain_text(re.compile(r"added \d+ packages"), timeout=NPM_S)
    await terminal.type("npm run dev -- --host")
    await expect(terminal.rows).to_contain_text("Network:", timeout=60_000)

    # The preview pane: the app at the root of its own origin, every asset loaded.
    failures = failed_requests(page)
    origin = await origin_of(client)
    frame, counter = await shown_and_counting(page, origin, failures)
    assert frame.url == origin + "/"

    # Hot reload over Vite's HMR WebSocket, through the gateway: no reload, and React keeps its state.
    await frame.evaluate("window.__survivesHotReload = 'yes'")
    await run(client, "sed -i 's/Count is/Clicked/' /workspace/my-app/src/App.jsx")
    await expect(counter).to_have_text(re.compile(r"Clicked 1"), timeout=30_000)
    assert await frame.evaluate("window.__survivesHotReload") == "yes"
    assert not failures, failures
    await page.screenshot(path=artifacts / "preview-root-hmr.png")

    # "open in a tab": the same app, logged in on its own through a fresh link.
    async with page.context.expect_page() as opened:
        await page.click("#preview-link")
    tab = await opened.value
    await expect(tab.locator("button.counter")).to_have_text(re.compile(r"Clicked 0"), timeout=30_000)
    assert tab.url == origin + "/"


async def start_template(client: TestClient, docker: aiodocker.Docker, template: str) -> None:
    """A create-vite project of the template, installed and started as a user would in a terminal:
    `npm run dev -- --host`, nothing else."""
    await run(
        client,
        f"npm create --yes vite@latest {template}-app -- --template {template} --no-interactive"
        f" && cd {template}-app && npm install --no-audit --no-fund",
    )
    container = docker.containers.container(await running_container_id(client, "alice"))
    execution = await container.exec(
        ["bash", "-lc", f"cd /workspace/{template}-app && exec npm run dev -- --host > dev.log 2>&1"],
        user="sandbox",
        workdir="/workspace",
    )
    await execution.start(detach=True)


async def serve_site(client: TestClient, docker: aiodocker.Docker, user: str) -> None:
    """A static dev server for /workspace/site on port 5173 of the user's sandbox."""
    container = docker.containers.container(await running_container_id(client, user))
    server = await container.exec(
        ["python3", "-m", "http.server", "5173", "--directory", "/workspace/site"], user="sandbox"
    )
    await server.start(detach=True)


COUNTER_FILES = {"vue": "src/components/HelloWorld.vue", "svelte": "src/lib/Counter.svelte"}


@pytest.mark.parametrize("template", ["vue", "svelte", "vanilla"])
async def test_other_templates_load_every_asset_and_hot_reload(
    page: Page,
    client: TestClient,
    settings: Settings,
    docker: aiodocker.Docker,
    template: str,
    artifacts: Path,
) -> None:
    await sign_in_and_start(page, settings)
    await start_template(client, docker, template)
    failures = failed_requests(page)
    origin = await origin_of(client)
    await answering(client, origin, timeout_s=60, log=f"/workspace/{template}-app/dev.log")
    frame, counter = await shown_and_counting(page, origin, failures)
    await frame.evaluate("window.__survivesHotReload = 'yes'")
    if template in COUNTER_FILES:
        await run(client, f"sed -i 's/Count is/Clicked/' /workspace/{template}-app/{COUNTER_FILES[template]}")
        await expect(counter).to_have_text(re.compile(r"Clicked \d"), timeout=30_000)
    else:
        # Plain JavaScript modules reload the page; its stylesheet is hot-swapped.
        await run(
            client,
            f"echo 'body {{ outline: 7px solid rgb(1, 2, 3) }}' >> /workspace/{template}-app/src/style.css",
        )

        async def restyled() -> bool:
            return bool(await frame.evaluate("getComputedStyle(document.body).outlineWidth === '7px'"))

        await poll(restyled, timeout_s=30)
    assert await frame.evaluate("window.__survivesHotReload") == "yes"
    assert not failures, failures
    await page.screenshot(path=artifacts / f"preview-{template}.png")


async def test_a_share_link_opens_in_a_fresh_browser_until_revoked(
    browser: Browser, client: TestClient, settings: Settings, docker: aiodocker.Docker
) -> None:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    await run(
        client,
        "mkdir -p /workspace/site && echo '<h1 id=hello>shared hello</h1>' > /workspace/site/index.html",
    )
    await serve_site(client, docker, "alice")
    share = await (await client.post("/api/sandbox/shares", headers=auth("alice"), json={})).json()
    stranger = await browser.new_context()
    try:
        page = await stranger.new_page()

        async def shown() -> bool:
            await page.goto(share["url"])
            return await page.locator("#hello").count() == 1

        await poll(shown, timeout_s=30)
        assert page.url == share["preview_url"]
        # The link opens the preview, never the API or the terminal, with the viewer's cookie.
        fetch_api = "(api) => fetch(api + '/api/sandbox', {credentials: 'include'})"
        api = await page.evaluate(fetch_api + ".then(r => r.status, () => 'blocked')", settings.public_origin)
        assert api in ("blocked", 401)
        revoked = await client.delete(f"/api/sandbox/shares/{share['id']}", headers=auth("alice"))
        assert revoked.status == 204

        async def refused() -> bool:
            answer = await page.reload()
            return answer is not None and answer.status == 401

        await poll(refused, timeout_s=5)
        answer = await page.goto(share["url"])
        assert answer is not None
        assert answer.status == 404
    finally:
        await stranger.close()


async def test_a_hostile_preview_reaches_nothing_of_the_viewer_or_other_previews(
    page: Page, client: TestClient, settings: Settings, docker: aiodocker.Docker, artifacts: Path
) -> None:
    """Alice views her own preview in the page, then opens bob's share link in the same browser: bob's
    preview, hostile, tries to read the page, alice's token, the API and alice's preview."""
    await sign_in_and_start(page, settings)
    await run(
        client,
        "mkdir -p /workspace/site && echo '<h1 id=mine>alice private</h1>' > /workspace/site/index.html",
    )
    assert (await client.post("/api/sandbox", headers=auth("bob"))).status == 201
    await run(
        client, "mkdir -p /workspace/site && cat > /workspace/site/probe.html", user="bob", stdin=PROBE_HTML
    )
    for user in ("alice", "bob"):
        await serve_site(client, docker, user)
    alice, bob = await origin_of(client, "alice"), await origin_of(client, "bob")
    await answering(client, alice, timeout_s=30)
    await page.click("#preview-reload")
    own = await preview_frame(page, alice)
    await expect(own.locator("#mine")).to_have_text("alice private", timeout=30_000)
    assert await page.evaluate("sessionStorage.getItem('sandbox-gateway.token')"), (
        "control: the page has a token"
    )

    # Bob's share link, opened in alice's browser, in the page's own preview frame.
    share = await (await client.post("/api/sandbox/shares", headers=auth("bob"), json={})).json()
    await own.goto(share["url"])
    await own.goto(f"{bob}/probe.html?api={settings.public_origin}&other={alice}")
    probe = own.locator("body[data-results]")
    await expect(probe).to_have_count(1, timeout=30_000)
    results = json.loads(await probe.get_attribute("data-results") or "{}")
    assert results == {
        "parent": "blocked",  # another origin: the page's DOM is out of reach
        "storage": "null",  # bob's origin has no token in its storage
        "cookie": "hidden",  # preview cookies are HttpOnly
        "navigate": "blocked",  # the iframe may not navigate the page away
        "api": "blocked",  # the API is another origin, and takes no cookie anyway
        "api_on_preview_origin": "status 404",  # bob's own dev server: the gateway's API is not there
        "other_fetch": "blocked",  # alice's preview refuses another origin's request with her cookie
        "other_frame": "blocked",  # and its DOM is another origin's
    }, results
    await page.screenshot(path=artifacts / "preview-isolation.png")
    await expect(page.locator("#state")).to_have_text("running")
    assert re.match(rf"^{re.escape(settings.public_origin)}/", page.url)
    # Her own preview still opens for her.
    await own.goto(alice + "/")
    await expect(own.locator("#mine")).to_have_text("alice private", timeout=15_000)


async def test_the_path_route_still_serves_a_project_made_with_its_base(
    page: Page, client: TestClient, settings: Settings
) -> None:
    """The page's New project button (base set to $PREVIEW_BASE), on /preview/<user>/ as before."""
    await sign_in_and_start(page, settings)
    created = await client.post(
        "/api/sandbox/projects",
        headers=auth("alice"),
        json={"template": "react", "name": "app", "start": True},
    )
    assert created.status == 201, await created.text()
    await run(client, "cat > /workspace/app/src/App.jsx", stdin=APP_JSX % "Before the edit")
    urls = await (await client.post("/api/sandbox/preview-session", headers=auth("alice"))).json()
    await page.goto(urls["path_login_url"])
    await expect(page.locator("#title")).to_have_text("Before the edit", timeout=60_000)
    assert page.url == urls["path_preview_url"]
    await page.evaluate("window.__survivesHotReload = 'yes'")
    await run(client, "cat > /workspace/app/src/App.jsx", stdin=APP_JSX % "After the edit")
    await expect(page.locator("#title")).to_have_text("After the edit", timeout=30_000)
    assert await page.evaluate("window.__survivesHotReload") == "yes"
