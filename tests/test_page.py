"""The page in a real browser (headless Chromium driven by Playwright) against a real gateway."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Page, expect

from gateway.settings import Settings
from gateway.tokens import mint_token

pytestmark = [pytest.mark.docker, pytest.mark.postgres, pytest.mark.browser]


async def sign_in(page: Page, client: TestClient, settings: Settings, user: str = "alice") -> None:
    await page.goto(str(client.make_url("/")))
    await page.fill("#token", mint_token(user, settings, 600))
    await page.click("#sign-in button")
    await expect(page.locator("#user")).to_have_text(user)


async def test_sign_in_start_type_in_the_terminal_and_run_code(
    page: Page, client: TestClient, settings: Settings, artifacts: Path
) -> None:
    await sign_in(page, client, settings)
    await expect(page.locator("#state")).to_have_text("none")

    await page.click("#start")
    await expect(page.locator("#state")).to_have_text("running", timeout=30_000)
    await expect(page.locator("#terminal-status")).to_have_text("connected", timeout=10_000)

    # The terminal: what is typed reaches bash, and its output comes back.
    rows = page.locator("#terminal .xterm-rows")
    await expect(rows).to_contain_text("$", timeout=10_000)
    await page.click("#terminal")
    await page.keyboard.type("echo hello-$RANDOM\n")
    # The echoed output: the command line itself shows "$RANDOM", not digits.
    await expect(rows).to_contain_text(re.compile(r"hello-\d+"), timeout=10_000)

    # The editor and Run.
    await page.select_option("#language", "python")
    await page.click("#editor .cm-content")
    await page.keyboard.press("Control+A")
    await page.keyboard.press("Delete")
    await page.keyboard.type("import sys\nprint('sum', 6 * 7)\nprint('warn', file=sys.stderr)\nsys.exit(3)")
    await page.click("#run")
    await expect(page.locator("#stdout")).to_have_text("sum 42\n", timeout=15_000)
    await expect(page.locator("#stderr")).to_have_text("warn\n")
    await expect(page.locator("#run-status")).to_contain_text("exit code 3")

    await page.screenshot(path=artifacts / "page.png")

    # Stop: the state follows, and the terminal says why it closed.
    await page.click("#stop")
    await expect(page.locator("#state")).to_have_text("stopped", timeout=15_000)
    await expect(page.locator("#terminal-status")).to_contain_text("4000", timeout=10_000)


async def test_development_token_in_the_fragment_signs_in_and_leaves_the_url(
    page: Page, client: TestClient, settings: Settings
) -> None:
    token = mint_token("carol", settings, 600)
    await page.goto(str(client.make_url("/")) + f"#token={token}")
    await expect(page.locator("#user")).to_have_text("carol")
    assert "token" not in page.url


async def test_a_refused_token_signs_out_with_a_message(
    page: Page, client: TestClient, settings: Settings
) -> None:
    await page.goto(str(client.make_url("/")))
    expired = mint_token("alice", settings, -60)
    await page.fill("#token", expired)
    await page.click("#sign-in button")
    await expect(page.locator("#notice")).to_contain_text("sign in again")
    await expect(page.locator("#sign-in")).to_be_visible()


async def test_the_terminal_reattaches_after_a_reload_with_its_shell_and_screen(
    page: Page, client: TestClient, settings: Settings
) -> None:
    await sign_in(page, client, settings)
    await page.click("#start")
    await expect(page.locator("#terminal-status")).to_have_text("connected", timeout=30_000)
    rows = page.locator("#terminal .xterm-rows")
    await expect(rows).to_contain_text("$", timeout=10_000)
    await page.click("#terminal")
    # A variable only this shell has, and a job that keeps printing.
    await page.keyboard.type("MINE=kept-$((6*7)); echo marker-$((6*7))\n")
    await expect(rows).to_contain_text("marker-42", timeout=10_000)

    await page.reload()
    # The page comes back to the same terminal by itself, and the replay redraws its screen.
    await expect(page.locator("#terminal-status")).to_have_text("connected", timeout=15_000)
    await expect(rows).to_contain_text("marker-42", timeout=10_000)
    await page.click("#terminal")
    await page.keyboard.type("echo still-$MINE\n")
    await expect(rows).to_contain_text("still-kept-42", timeout=10_000)
