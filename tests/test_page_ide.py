"""The page as a small IDE, in a real browser against a real gateway and sandbox: the file tree
following the terminal's changes, tabs that save with If-Match and notice changes on disk, Run of the
current file streamed, terminal tabs and open files back after a reload, upload by drag and drop,
download of a folder, and the stopped state at 1280x800."""

from __future__ import annotations

import asyncio
import io
import re
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Locator, Page, expect

from gateway.settings import Settings
from gateway.tokens import mint_token

from .helpers import auth

pytestmark = [pytest.mark.docker, pytest.mark.postgres, pytest.mark.browser]

CONTENT = "/api/sandbox/files/content"
SERVER_JS = b"""const http = require("http");
const port = 3000;

http.createServer((req, res) => res.end("hello"))
  .listen(port, () => console.log(`listening on ${port}`));
"""


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """The size the page must stay usable at; an uncaught error of the page's scripts fails the test."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    errors: list[str] = []
    try:
        page = await context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
    finally:
        await context.close()
    assert not errors, errors


async def started(page: Page, client: TestClient, settings: Settings, user: str = "alice") -> None:
    await page.goto(str(client.make_url("/")))
    await page.fill("#token", mint_token(user, settings, 1200))
    await page.click("#sign-in button")
    await expect(page.locator("#stopped-message")).to_contain_text("no sandbox yet")
    await page.click("#start-again")
    await expect(page.locator("#state")).to_have_text("running", timeout=30_000)
    await expect(page.locator("#stopped")).to_be_hidden()
    await expect(page.locator("#terminal-status")).to_have_text("connected", timeout=10_000)


def active_terminal(page: Page) -> Locator:
    return page.locator("#terminal .terminal-pane[data-active] .xterm-rows")


async def type_in_terminal(page: Page, line: str) -> None:
    await page.click("#terminal .terminal-pane[data-active]")
    await page.keyboard.type(line + "\n")


def row(page: Page, path: str) -> Locator:
    return page.locator(f'#files .row[data-path="{path}"]')


def tab(page: Page, path: str) -> Locator:
    return page.locator(f'#tabs .tab[data-path="{path}"]')


async def answer(page: Page, text: str | None = None) -> None:
    """The page's own dialog: type a name (when it asks one) and confirm."""
    await expect(page.locator("#dialog")).to_be_visible()
    if text is not None:
        await page.fill("#dialog-input", text)
    await page.click("#dialog-confirm")
    await expect(page.locator("#dialog")).to_be_hidden()


async def file_text(client: TestClient, path: str, user: str = "alice") -> str:
    response = await client.get(CONTENT, params={"path": path}, headers=auth(user))
    assert response.status == 200, await response.text()
    return await response.text()


async def replace_editor_text(page: Page, text: str) -> None:
    await page.click("#editor .cm-content")
    await page.keyboard.press("Control+A")
    await page.keyboard.press("Delete")
    await page.keyboard.type(text)


async def test_a_file_made_in_the_tree_is_edited_saved_run_and_follows_the_disk(
    page: Page, client: TestClient, settings: Settings, artifacts: Path
) -> None:
    await started(page, client, settings)
    await expect(page.locator("#files-empty")).to_be_visible(timeout=10_000)

    # New file, with a space and UTF-8 in its name: a tab opens on it.
    path = "/workspace/hé llo.py"
    await page.click("#new-file")
    await answer(page, "hé llo.py")
    await expect(row(page, path)).to_be_visible()
    await expect(tab(page, path)).to_have_attribute("aria-selected", "true")

    # Typed, the tab is dirty; Ctrl-S saves it and the marker goes.
    await replace_editor_text(page, "import sys\nprint('saved', 6 * 7)\nprint('to err', file=sys.stderr)\n")
    await expect(tab(page, path).locator(".dirty")).to_be_visible()
    await page.keyboard.press("Control+S")
    await expect(tab(page, path).locator(".dirty")).to_be_hidden(timeout=10_000)
    assert "print('saved', 6 * 7)" in await file_text(client, path)
    await type_in_terminal(page, "cat 'hé llo.py' | head -2 | tail -1 | tr a-z A-Z")
    await expect(active_terminal(page)).to_contain_text("PRINT('SAVED', 6 * 7)", timeout=10_000)

    # Run runs the saved file as a process; stdout and stderr stream into their panes.
    await page.click("#run")
    await expect(page.locator("#stdout")).to_have_text("saved 42\n", timeout=15_000)
    await expect(page.locator("#stderr")).to_have_text("to err\n")
    await expect(page.locator("#run-status")).to_contain_text("exit code 0")

    # What the terminal makes appears in the tree by itself (the watch).
    await type_in_terminal(page, "mkdir -p made/deeper && echo hi > made/deeper/from-terminal.txt")
    await expect(row(page, "/workspace/made")).to_be_visible(timeout=10_000)
    await row(page, "/workspace/made").click()
    await row(page, "/workspace/made/deeper").click()
    await expect(row(page, "/workspace/made/deeper/from-terminal.txt")).to_be_visible(timeout=10_000)
    await type_in_terminal(page, "rm made/deeper/from-terminal.txt")
    await expect(row(page, "/workspace/made/deeper/from-terminal.txt")).to_be_hidden(timeout=10_000)

    # A tab without edits follows its file when it changes on disk.
    await type_in_terminal(page, "echo \"print('from disk')\" > 'hé llo.py'")
    await expect(page.locator("#editor .cm-content")).to_have_text("print('from disk')", timeout=10_000)
    await expect(page.locator("#file-notice")).to_be_hidden()

    # With unsaved edits, a change on disk is a notice, and Ctrl-S does not overwrite it (If-Match).
    await replace_editor_text(page, "print('mine')")
    await type_in_terminal(page, "echo \"print('theirs')\" > 'hé llo.py'")
    await expect(page.locator("#file-notice")).to_contain_text("changed on disk", timeout=10_000)
    await expect(tab(page, path)).to_have_class(re.compile("conflict"))
    await page.screenshot(path=artifacts / "page-ide-changed-on-disk.png")
    await page.click("#editor .cm-content")
    await page.keyboard.press("Control+S")
    await expect(page.locator("#file-notice")).to_be_visible()
    assert await file_text(client, path) == "print('theirs')\n"
    # The user chooses: theirs (reload), then, after another edit and change, theirs again.
    await page.click("#reload-from-disk")
    await expect(page.locator("#editor .cm-content")).to_have_text("print('theirs')")
    await expect(page.locator("#file-notice")).to_be_hidden()
    await replace_editor_text(page, "print('mine at last')")
    await type_in_terminal(page, "echo \"print('theirs again')\" > 'hé llo.py'")
    await page.click("#overwrite", timeout=10_000)
    await expect(page.locator("#file-notice")).to_be_hidden()
    assert await file_text(client, path) == "print('mine at last')"


async def test_terminal_tabs_and_open_files_come_back_after_a_reload(
    page: Page, client: TestClient, settings: Settings, artifacts: Path
) -> None:
    await started(page, client, settings)
    await type_in_terminal(page, "FIRST=one-$((6*7)); echo first-$((6*7))")
    await expect(active_terminal(page)).to_contain_text("first-42", timeout=10_000)
    await page.click("#new-terminal")
    await expect(page.locator("#terminal-tabs .tab")).to_have_count(2)
    await expect(page.locator("#terminal-status")).to_have_text("connected", timeout=10_000)
    await type_in_terminal(page, "echo second-$((6*7)) > notes.md; cat notes.md")
    await expect(active_terminal(page)).to_contain_text("second-42", timeout=10_000)
    await row(page, "/workspace/notes.md").click(timeout=10_000)
    await expect(tab(page, "/workspace/notes.md")).to_be_visible()

    await page.reload()
    # Both terminals, each with its own shell and screen, and the file's tab.
    await expect(page.locator("#terminal-tabs .tab")).to_have_count(2, timeout=15_000)
    await expect(page.locator("#terminal-status")).to_have_text("connected", timeout=15_000)
    await expect(active_terminal(page)).to_contain_text("second-42", timeout=10_000)
    await expect(tab(page, "/workspace/notes.md")).to_be_visible(timeout=10_000)
    await page.screenshot(path=artifacts / "page-ide-after-reload.png")
    await page.locator("#terminal-tabs .tab").first.click()
    await expect(active_terminal(page)).to_contain_text("first-42", timeout=10_000)
    await type_in_terminal(page, "echo still-$FIRST")
    await expect(active_terminal(page)).to_contain_text("still-one-42", timeout=10_000)
    terminals = await (await client.get("/api/sandbox/terminals", headers=auth("alice"))).json()
    assert len(terminals["terminals"]) == 2

    # Closing a tab ends its terminal.
    await page.locator("#terminal-tabs .tab").nth(1).locator(".close").click()
    await expect(page.locator("#terminal-tabs .tab")).to_have_count(1)
    for _ in range(50):
        terminals = await (await client.get("/api/sandbox/terminals", headers=auth("alice"))).json()
        if len(terminals["terminals"]) == 1:
            break
        await page.wait_for_timeout(100)
    assert len(terminals["terminals"]) == 1


async def test_drop_upload_rename_delete_and_download_a_folder(
    page: Page, client: TestClient, settings: Settings, artifacts: Path
) -> None:
    await started(page, client, settings)
    made = await client.post(
        "/api/sandbox/files/folders", json={"path": "site", "parents": True}, headers=auth("alice")
    )
    assert made.status == 201
    await expect(row(page, "/workspace/site")).to_be_visible(timeout=10_000)

    # Two files dropped on the folder, as a desktop's file manager drops them.
    transfer = await page.evaluate_handle(
        """() => {
            const transfer = new DataTransfer();
            transfer.items.add(new File(["<h1>hi</h1>"], "index.html", { type: "text/html" }));
            transfer.items.add(new File([new Uint8Array([0, 159, 255, 1])], "blob.bin"));
            return transfer;
        }"""
    )
    target = row(page, "/workspace/site")
    await target.dispatch_event("dragenter", {"dataTransfer": transfer})
    await target.dispatch_event("dragover", {"dataTransfer": transfer})
    await target.dispatch_event("drop", {"dataTransfer": transfer})
    # The folder opens on what came in.
    await expect(row(page, "/workspace/site/index.html")).to_be_visible(timeout=10_000)
    await expect(row(page, "/workspace/site/blob.bin")).to_be_visible()
    await page.screenshot(path=artifacts / "page-ide-dropped.png")
    blob = await client.get(CONTENT, params={"path": "site/blob.bin"}, headers=auth("alice"))
    assert await blob.read() == bytes([0, 159, 255, 1])

    # Download of the folder: one zip with both.
    await row(page, "/workspace/site").click()  # selected (and closed again)
    async with page.expect_download() as waiting:
        await page.click("#download")
    download = await waiting.value
    assert download.suggested_filename == "site.zip"
    saved = await download.path()
    with zipfile.ZipFile(io.BytesIO(await asyncio.to_thread(saved.read_bytes))) as archive:
        names = set(archive.namelist())
        assert {"site/index.html", "site/blob.bin"} <= names or {"index.html", "blob.bin"} <= names, names

    # Rename a file that is open: its tab follows.
    await row(page, "/workspace/site").click()
    await row(page, "/workspace/site/index.html").click()
    await expect(tab(page, "/workspace/site/index.html")).to_be_visible()
    await page.click("#rename")
    await answer(page, "home.html")
    await expect(row(page, "/workspace/site/home.html")).to_have_attribute(
        "aria-selected", "true", timeout=10_000
    )
    await expect(tab(page, "/workspace/site/home.html")).to_be_visible()
    assert await file_text(client, "site/home.html") == "<h1>hi</h1>"
    # A file downloads as itself (through a one-use link: the browser streams it to disk).
    async with page.expect_download() as waiting:
        await page.click("#download")
    download = await waiting.value
    assert download.suggested_filename == "home.html"
    saved = await download.path()
    assert await asyncio.to_thread(saved.read_bytes) == b"<h1>hi</h1>"

    # Delete asks first; cancelled, nothing goes; confirmed, the folder goes.
    await row(page, "/workspace/site").click()
    await page.click("#delete")
    await expect(page.locator("#dialog")).to_contain_text("everything in it")
    await page.keyboard.press("Escape")
    await expect(page.locator("#dialog")).to_be_hidden()
    kept = await client.get("/api/sandbox/files/stat", params={"path": "site"}, headers=auth("alice"))
    assert kept.status == 200
    await page.click("#delete")
    await answer(page)
    await expect(row(page, "/workspace/site")).to_be_hidden(timeout=10_000)
    gone = await client.get("/api/sandbox/files/stat", params={"path": "site"}, headers=auth("alice"))
    assert gone.status == 404
    await expect(page.locator("#file-notice")).to_contain_text("deleted on disk")


async def test_a_stopped_sandbox_says_so_and_starts_again_at_1280_by_800(
    page: Page, client: TestClient, settings: Settings, artifacts: Path
) -> None:
    await started(page, client, settings)
    await client.put(
        CONTENT,
        params={"path": "app/server.js", "parents": "true"},
        data=SERVER_JS,
        headers=auth("alice"),
    )
    await client.put(CONTENT, params={"path": "app/README.md"}, data=b"# app\n", headers=auth("alice"))
    await row(page, "/workspace/app").click(timeout=10_000)
    await row(page, "/workspace/app/server.js").click()
    await type_in_terminal(page, "ls -l app")
    await expect(active_terminal(page)).to_contain_text("server.js", timeout=10_000)
    await page.click("#run")
    await expect(page.locator("#stdout")).to_contain_text("listening on 3000", timeout=15_000)
    await expect(page.locator("#run")).to_have_text("Stop")
    # The port picker offers what listens; the preview shows it at that port's own origin.
    await page.focus("#preview-port")
    await expect(page.locator('#preview-port option[value="3000"]')).to_have_count(1, timeout=10_000)
    await page.select_option("#preview-port", "3000")
    await expect(page.frame_locator("#preview").locator("body")).to_have_text("hello", timeout=15_000)

    # Usable at 1280x800: nothing wider than the window, every pane's controls in view.
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1280, width
    for selector in [
        "#files",
        "#new-file",
        "#download",
        "#tabs",
        "#run",
        "#editor",
        "#stdout",
        "#terminal",
        "#new-terminal",
        "#preview-port",
        "#preview",
        "#stop",
    ]:
        box = await page.locator(selector).bounding_box()
        assert box, selector
        assert box["x"] >= 0, (selector, box)
        assert box["x"] + box["width"] <= 1280, (selector, box)
        assert box["y"] + min(box["height"], 20) <= 800, (selector, box)
    await page.screenshot(path=artifacts / "page-ide.png")

    # Stop ends the run with the sandbox; the page says the sandbox is stopped, and Start is there.
    await page.click("#stop")
    await expect(page.locator("#stopped")).to_be_visible(timeout=15_000)
    await expect(page.locator("#stopped-message")).to_contain_text("stopped")
    await expect(page.locator("#run")).to_have_text("Run", timeout=15_000)
    await page.click("#start-again")
    await expect(page.locator("#stopped")).to_be_hidden(timeout=30_000)
    await expect(row(page, "/workspace/app")).to_be_visible(timeout=10_000)
    await expect(page.locator("#terminal-status")).to_have_text("connected", timeout=10_000)
