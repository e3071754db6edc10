"""The files API against real sandboxes: every operation and its errors, binary and UTF-8 names,
symlinks pointing out of /workspace (the sandbox user's rights, not the gateway's), atomic and
concurrent writes, uploads, archives, the watch and its coalescing, and isolation between users."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
import zipfile
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway import file_links, preview_sessions
from gateway.keys import DB, PREVIEW_SESSIONS
from gateway.settings import FileSettings

from .helpers import MakeClient, auth, poll

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

FILES = "/api/sandbox/files"
CONTENT = f"{FILES}/content"


@pytest.fixture
async def sandbox(client: TestClient) -> TestClient:
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    return client


async def shell(client: TestClient, code: str, user: str = "alice") -> str:
    response = await client.post(
        "/api/sandbox/exec", headers=auth(user), json={"language": "bash", "code": code}
    )
    assert response.status == 200, await response.text()
    result = await response.json()
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


async def put(
    client: TestClient, path: str, data: bytes, user: str = "alice", status: int = 201, **query: str
) -> Any:
    response = await client.put(CONTENT, params={"path": path, **query}, data=data, headers=auth(user))
    assert response.status == status, await response.text()
    return await response.json()


async def get(client: TestClient, path: str, user: str = "alice", status: int = 200, **headers: str) -> bytes:
    response = await client.get(CONTENT, params={"path": path}, headers={**auth(user), **headers})
    assert response.status == status, await response.text()
    return await response.read()


async def error_of(response: aiohttp.ClientResponse, status: int) -> str:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])


@pytest.mark.runtimes
async def test_write_read_stat_and_list_a_file(sandbox: TestClient) -> None:
    entry = await put(sandbox, "notes/hello.txt", b"hello\n", parents="true")
    assert entry["path"] == "/workspace/notes/hello.txt"
    assert entry["kind"] == "file"
    assert entry["size"] == 6
    assert entry["mode"] == 0o644
    assert await get(sandbox, "notes/hello.txt") == b"hello\n"
    assert await shell(
        sandbox, "cat /workspace/notes/hello.txt; find /workspace/notes/hello.txt -printf '%u\\n'"
    ) == ("hello\nsandbox\n")
    response = await sandbox.get(f"{FILES}/stat", params={"path": "/workspace/notes"}, headers=auth("alice"))
    assert response.status == 200
    assert (await response.json())["kind"] == "folder"
    response = await sandbox.get(FILES, params={"path": "notes"}, headers=auth("alice"))
    listing = await response.json()
    assert [e["name"] for e in listing["entries"]] == ["hello.txt"]
    assert listing["truncated"] is False
    # Replacing it answers 200, and keeps the file's mode.
    await shell(sandbox, "chmod 755 /workspace/notes/hello.txt")
    replaced = await put(sandbox, "notes/hello.txt", b"#!/bin/sh\necho hi\n", status=200)
    assert replaced["mode"] == 0o755
    assert await shell(sandbox, "/workspace/notes/hello.txt") == "hi\n"


async def test_binary_content_range_and_content_type(sandbox: TestClient) -> None:
    data = bytes(range(256)) * 1000
    await put(sandbox, "blob.bin", data)
    assert await get(sandbox, "blob.bin") == data
    response = await sandbox.get(
        CONTENT, params={"path": "blob.bin"}, headers={**auth("alice"), "Range": "bytes=10-19"}
    )
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert await response.read() == data[10:20]
    response = await sandbox.get(
        CONTENT, params={"path": "blob.bin"}, headers={**auth("alice"), "Range": "bytes=-5"}
    )
    assert await response.read() == data[-5:]
    response = await sandbox.get(
        CONTENT, params={"path": "blob.bin"}, headers={**auth("alice"), "Range": "bytes=999999-"}
    )
    assert await error_of(response, 416) == "range_not_satisfiable"
    await put(sandbox, "empty", b"")
    assert await get(sandbox, "empty") == b""
    response = await sandbox.get(
        CONTENT, params={"path": "empty"}, headers={**auth("alice"), "Range": "bytes=0-"}
    )
    assert await error_of(response, 416) == "range_not_satisfiable"
    assert response.headers["Content-Range"] == "bytes */0"
    await put(sandbox, "page.html", b"<script>alert(1)</script>")
    response = await sandbox.get(
        CONTENT, params={"path": "page.html", "download": "true"}, headers=auth("alice")
    )
    assert response.headers["Content-Type"].startswith("text/html")
    # A user's page is never active on the gateway's origin.
    assert "sandbox" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Disposition"].startswith("attachment;")


async def test_names_with_spaces_and_utf8(sandbox: TestClient) -> None:
    name = "dossier été/naïve file ✓.txt"
    await put(sandbox, name, "ça marche\n".encode(), parents="true")
    assert await get(sandbox, name) == "ça marche\n".encode()
    assert await shell(sandbox, "cat '/workspace/dossier été/naïve file ✓.txt'") == "ça marche\n"
    response = await sandbox.get(FILES, params={"path": "dossier été"}, headers=auth("alice"))
    assert [e["name"] for e in (await response.json())["entries"]] == ["naïve file ✓.txt"]


async def test_folders_move_and_delete(sandbox: TestClient) -> None:
    response = await sandbox.post(
        f"{FILES}/folders", headers=auth("alice"), json={"path": "a/b", "parents": True}
    )
    assert response.status == 201
    response = await sandbox.post(f"{FILES}/folders", headers=auth("alice"), json={"path": "a/b"})
    assert await error_of(response, 409) == "exists"
    await put(sandbox, "a/b/c.txt", b"c")
    response = await sandbox.post(
        f"{FILES}/move", headers=auth("alice"), json={"from": "a/b/c.txt", "to": "a/d.txt"}
    )
    assert response.status == 200
    assert (await response.json())["path"] == "/workspace/a/d.txt"
    await put(sandbox, "a/e.txt", b"e")
    response = await sandbox.post(
        f"{FILES}/move", headers=auth("alice"), json={"from": "a/d.txt", "to": "a/e.txt"}
    )
    assert await error_of(response, 409) == "exists"
    response = await sandbox.post(
        f"{FILES}/move", headers=auth("alice"), json={"from": "a/d.txt", "to": "a/e.txt", "overwrite": True}
    )
    assert response.status == 200
    assert await get(sandbox, "a/e.txt") == b"c"
    response = await sandbox.post(
        f"{FILES}/move", headers=auth("alice"), json={"from": "a", "to": "a/b/inside"}
    )
    assert await error_of(response, 400) == "bad_path"
    # A folder goes only when asked to be recursive.
    response = await sandbox.delete(FILES, params={"path": "a"}, headers=auth("alice"))
    assert await error_of(response, 409) == "is_a_folder"
    response = await sandbox.delete(FILES, params={"path": "a", "recursive": "true"}, headers=auth("alice"))
    assert response.status == 204
    response = await sandbox.get(f"{FILES}/stat", params={"path": "a"}, headers=auth("alice"))
    assert await error_of(response, 404) == "not_found"
    response = await sandbox.delete(
        FILES, params={"path": "/workspace", "recursive": "true"}, headers=auth("alice")
    )
    assert await error_of(response, 403) == "forbidden"


async def test_recursive_listing_is_bounded(sandbox: TestClient) -> None:
    await shell(sandbox, "mkdir -p /workspace/t/x/y/z && touch /workspace/t/top /workspace/t/x/y/z/deep")
    response = await sandbox.get(FILES, params={"path": "t", "recursive": "true"}, headers=auth("alice"))
    paths = [e["path"] for e in (await response.json())["entries"]]
    assert paths == [
        "/workspace/t/x",
        "/workspace/t/x/y",
        "/workspace/t/x/y/z",
        "/workspace/t/x/y/z/deep",
        "/workspace/t/top",
    ]
    response = await sandbox.get(FILES, params={"path": "t", "depth": "2"}, headers=auth("alice"))
    assert [e["path"] for e in (await response.json())["entries"]] == [
        "/workspace/t/x",
        "/workspace/t/x/y",
        "/workspace/t/top",
    ]
    response = await sandbox.get(FILES, params={"path": "t", "depth": "0"}, headers=auth("alice"))
    assert await error_of(response, 400) == "invalid_request"


async def test_errors_have_the_envelope_and_the_right_status(sandbox: TestClient) -> None:
    cases: list[tuple[str, str, dict[str, str], int, str]] = [
        ("GET", CONTENT, {"path": "nope.txt"}, 404, "not_found"),
        ("GET", CONTENT, {"path": "/workspace"}, 409, "is_a_folder"),
        ("GET", CONTENT, {"path": "a\0b"}, 400, "invalid_request"),
        ("GET", CONTENT, {"path": "x" * 5000}, 400, "invalid_request"),
        ("GET", CONTENT, {"path": "y" * 300}, 400, "invalid_request"),
        ("GET", CONTENT, {}, 400, "invalid_request"),
        ("GET", CONTENT, {"path": "/etc/shadow"}, 403, "forbidden"),
        # Root's processes (tini, the agent) are not the user's to read, through the API either.
        ("GET", CONTENT, {"path": "/proc/1/environ"}, 403, "forbidden"),
        ("GET", CONTENT, {"path": "/dev/zero"}, 400, "bad_path"),
        ("GET", FILES, {"path": "/etc/passwd"}, 409, "not_a_folder"),
        ("GET", FILES, {"path": "/root"}, 403, "forbidden"),
        ("GET", FILES, {"path": "none", "recursive": "maybe"}, 400, "invalid_request"),
        ("DELETE", FILES, {"path": "/etc/hostname"}, 403, "forbidden"),
        ("PUT", CONTENT, {"path": "/etc/evil"}, 403, "forbidden"),
        ("PUT", CONTENT, {"path": "missing/folder/f"}, 404, "not_found"),
        ("PUT", CONTENT, {"path": "/workspace"}, 409, "is_a_folder"),
        ("GET", f"{FILES}/archive", {"path": "none"}, 404, "not_found"),
        ("GET", f"{FILES}/archive", {"format": "rar"}, 400, "invalid_request"),
    ]
    for method, url, query, status, code in cases:
        response = await sandbox.request(
            method, url, params=query, headers=auth("alice"), data=b"x" if method == "PUT" else None
        )
        assert await error_of(response, status) == code, (method, url, query)
    await put(sandbox, "file", b"f")
    response = await sandbox.put(CONTENT, params={"path": "file/inside"}, data=b"x", headers=auth("alice"))
    assert await error_of(response, 409) == "not_a_folder"
    response = await sandbox.put(
        CONTENT, params={"path": "file", "overwrite": "false"}, data=b"x", headers=auth("alice")
    )
    assert await error_of(response, 409) == "exists"
    response = await sandbox.post(
        f"{FILES}/move", headers=auth("alice"), json={"from": "file", "to": "g", "extra": 1}
    )
    assert await error_of(response, 400) == "invalid_request"


async def test_a_write_over_the_size_cap_is_413_and_leaves_the_file(make_client: MakeClient) -> None:
    client = await make_client(files=replace(FileSettings(), max_write_bytes=1000))
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    await put(client, "kept.txt", b"old")
    response = await client.put(CONTENT, params={"path": "kept.txt"}, data=b"x" * 1001, headers=auth("alice"))
    assert await error_of(response, 413) == "payload_too_large"

    async def chunked() -> Any:
        for _ in range(20):
            yield b"y" * 100

    response = await client.put(CONTENT, params={"path": "kept.txt"}, data=chunked(), headers=auth("alice"))
    assert await error_of(response, 413) == "payload_too_large"
    assert await get(client, "kept.txt") == b"old"
    # No temporary file is left behind.
    assert await shell(client, "ls -A /workspace") == "kept.txt\n"


async def test_if_match_guards_a_save_against_a_change_on_disk(sandbox: TestClient) -> None:
    entry = await put(sandbox, "doc.txt", b"v1")
    await shell(sandbox, "sleep 0.01; echo v2 > /workspace/doc.txt")
    response = await sandbox.put(
        CONTENT,
        params={"path": "doc.txt"},
        data=b"mine",
        headers={**auth("alice"), "If-Match": entry["etag"]},
    )
    assert await error_of(response, 412) == "precondition_failed"
    assert await get(sandbox, "doc.txt") == b"v2\n"
    current = await sandbox.get(f"{FILES}/stat", params={"path": "doc.txt"}, headers=auth("alice"))
    etag = (await current.json())["etag"]
    await put(sandbox, "doc.txt", b"mine", status=200, **{})
    assert etag != entry["etag"]


@pytest.mark.runtimes
async def test_symlinks_out_of_the_workspace_follow_the_users_rights(sandbox: TestClient) -> None:
    await shell(
        sandbox,
        "ln -s /etc/shadow /workspace/shadow; ln -s /etc/hostname /workspace/host; "
        "ln -s /usr/bin /workspace/bin; ln -s /nowhere /workspace/dangling",
    )
    response = await sandbox.get(CONTENT, params={"path": "shadow"}, headers=auth("alice"))
    assert await error_of(response, 403) == "forbidden"
    assert await get(sandbox, "host") == (await shell(sandbox, "cat /etc/hostname")).encode()
    # Writing through a link writes its target, as the user: /etc is not theirs.
    response = await sandbox.put(CONTENT, params={"path": "host"}, data=b"pwned", headers=auth("alice"))
    assert await error_of(response, 403) == "forbidden"
    response = await sandbox.get(FILES, headers=auth("alice"))
    entries = {e["name"]: e for e in (await response.json())["entries"]}
    assert entries["bin"]["kind"] == "symlink"
    assert entries["bin"]["target_kind"] == "folder"
    assert entries["dangling"]["target_kind"] is None
    assert entries["dangling"]["target"] == "/nowhere"
    assert entries["shadow"]["target_kind"] == "file"
    # Deleting a link deletes the link, never what it points to.
    response = await sandbox.delete(FILES, params={"path": "bin"}, headers=auth("alice"))
    assert response.status == 204
    assert await shell(sandbox, "test -d /usr/bin && echo there") == "there\n"


async def test_concurrent_writes_to_one_file_one_wins_whole(sandbox: TestClient) -> None:
    bodies = [bytes([65 + n]) * 300_000 for n in range(6)]
    results = await asyncio.gather(
        *(
            sandbox.put(CONTENT, params={"path": "race.bin"}, data=body, headers=auth("alice"))
            for body in bodies
        )
    )
    assert all(r.status in (200, 201) for r in results)
    content = await get(sandbox, "race.bin")
    assert content in bodies

    # Meanwhile a reader only ever sees one whole version.
    async def reader() -> None:
        for _ in range(20):
            assert await get(sandbox, "race.bin") in bodies

    await asyncio.gather(reader(), *(put(sandbox, "race.bin", body, status=200) for body in bodies))


@pytest.mark.runtimes
async def test_upload_several_files_and_download_a_folder(sandbox: TestClient) -> None:
    # As browsers send them: file names unquoted (aiohttp's client would percent-encode them).
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("file", b"one", filename="one.txt")
    form.add_field("file", b"\x00\x01binary", filename="src/lib/two.bin")
    form.add_field("file", "é".encode(), filename="ünï.txt")
    response = await sandbox.post(f"{FILES}/upload", params={"path": "up"}, data=form, headers=auth("alice"))
    assert response.status == 201, await response.text()
    assert sorted(f["path"] for f in (await response.json())["files"]) == [
        "/workspace/up/one.txt",
        "/workspace/up/src/lib/two.bin",
        "/workspace/up/ünï.txt",
    ]
    assert await get(sandbox, "up/src/lib/two.bin") == b"\x00\x01binary"
    bad = aiohttp.FormData(quote_fields=False)
    bad.add_field("file", b"x", filename="../../escape.txt")
    response = await sandbox.post(f"{FILES}/upload", params={"path": "up"}, data=bad, headers=auth("alice"))
    assert await error_of(response, 400) == "invalid_request"

    response = await sandbox.get(f"{FILES}/archive", params={"path": "up"}, headers=auth("alice"))
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/zip"
    assert "up.zip" in response.headers["Content-Disposition"]
    archive = zipfile.ZipFile(io.BytesIO(await response.read()))
    assert archive.read("up/src/lib/two.bin") == b"\x00\x01binary"
    assert archive.read("up/ünï.txt") == "é".encode()
    response = await sandbox.get(
        f"{FILES}/archive", params={"path": "up", "format": "tar"}, headers=auth("alice")
    )
    with tarfile.open(fileobj=io.BytesIO(await response.read())) as tar:
        member = tar.extractfile("up/one.txt")
        assert member is not None
        assert member.read() == b"one"


async def test_a_download_link_works_once_for_its_path_without_a_token(sandbox: TestClient) -> None:
    await put(sandbox, "dl/ünï file.txt", b"\x00link bytes", parents="true")
    await put(sandbox, "dl/inner/two.txt", b"two", parents="true")

    async def link(path: str, **body: str) -> str:
        response = await sandbox.post(
            f"{FILES}/download-link", json={"path": path, **body}, headers=auth("alice")
        )
        assert response.status == 201, await response.text()
        return str((await response.json())["url"])

    # A file: its bytes as an attachment, with no Authorization header; then never again.
    url = await link("dl/ünï file.txt")
    assert url.startswith(f"{FILES}/download?ticket=")
    response = await sandbox.get(url)
    assert response.status == 200, await response.text()
    assert await response.read() == b"\x00link bytes"
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert "sandbox" in response.headers["Content-Security-Policy"]
    assert await error_of(await sandbox.get(url), 401) == "unauthorized"

    # A folder: an archive, zip unless asked for a tar.
    response = await sandbox.get(await link("dl"))
    assert response.headers["Content-Type"] == "application/zip"
    assert zipfile.ZipFile(io.BytesIO(await response.read())).read("dl/inner/two.txt") == b"two"
    response = await sandbox.get(await link("dl", format="tar"))
    with tarfile.open(fileobj=io.BytesIO(await response.read())) as archive:
        assert "dl/inner/two.txt" in archive.getnames()

    # Asked for what is not there, or not the user's to read: said at once, no link.
    missing = await sandbox.post(f"{FILES}/download-link", json={"path": "nope"}, headers=auth("alice"))
    assert await error_of(missing, 404) == "not_found"
    shadow = await sandbox.post(f"{FILES}/download-link", json={"path": "/etc/shadow"}, headers=auth("alice"))
    assert await error_of(shadow, 403) == "forbidden"
    bad = await sandbox.post(
        f"{FILES}/download-link", json={"path": "dl", "format": "rar"}, headers=auth("alice")
    )
    assert await error_of(bad, 400) == "invalid_request"
    anonymous = await sandbox.post(f"{FILES}/download-link", json={"path": "dl"})
    assert await error_of(anonymous, 401) == "unauthorized"

    # Forged, tampered or expired tickets open nothing.
    key = sandbox.app[PREVIEW_SESSIONS].key
    expired, _ = file_links.sign("alice", "/workspace/dl/inner/two.txt", "file", key, lifetime_s=-5)
    forged, _ = file_links.sign("alice", "/workspace/dl/inner/two.txt", "file", b"not the key" * 4)
    valid = (await link("dl/inner/two.txt")).split("ticket=", 1)[1]
    head, claims, signature = valid.split(".")
    for ticket in (expired, forged, f"{head}.{claims}x.{signature}", "", "garbage"):
        response = await sandbox.get(f"{FILES}/download", params={"ticket": ticket})
        assert await error_of(response, 401) == "unauthorized", ticket
    # A preview login ticket, signed with the same key, is not a download link.
    preview, _ = file_links.sign("alice", "/workspace/dl/inner/two.txt", "file", key)
    as_preview = preview_sessions.sign("alice", preview_sessions.TICKET_AUDIENCE, 60, key)
    assert await error_of(await sandbox.get(f"{FILES}/download", params={"ticket": as_preview}), 401)
    assert (await sandbox.get(f"{FILES}/download", params={"ticket": preview})).status == 200


async def test_another_user_sees_only_their_own_files(sandbox: TestClient) -> None:
    await put(sandbox, "secret.txt", b"alice's")
    assert (await sandbox.post("/api/sandbox", headers=auth("bob"))).status == 201
    response = await sandbox.get(CONTENT, params={"path": "secret.txt"}, headers=auth("bob"))
    assert await error_of(response, 404) == "not_found"
    response = await sandbox.get(CONTENT, params={"path": "secret.txt"})
    assert response.status == 401


async def test_a_stopped_sandbox_says_so(client: TestClient) -> None:
    response = await client.get(FILES, headers=auth("carol"))
    assert response.status == 409, await response.text()


async def watch(client: TestClient, path: str = "/workspace") -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect(
        f"{FILES}/watch", params={"path": path}, headers=auth("alice"), protocols=["sandbox-files.v1"]
    )
    ready = await ws.receive_json(timeout=10)
    assert ready["type"] == "ready", ready
    return ws


async def changes_until(
    ws: aiohttp.ClientWebSocketResponse, wanted: Any, timeout_s: float = 10
) -> list[list[dict[str, Any]]]:
    """Batches until `wanted(all changes so far)` holds."""
    batches: list[list[dict[str, Any]]] = []
    deadline = time.monotonic() + timeout_s
    while not wanted([c for batch in batches for c in batch]):
        left = deadline - time.monotonic()
        assert left > 0, f"no such change in {batches}"
        message = await ws.receive_json(timeout=left)
        assert message["type"] == "changes"
        batches.append(message["changes"])
    return batches


def has(event: str, path: str) -> Any:
    return lambda changes: any(c["event"] == event and c["path"] == path for c in changes)


@pytest.mark.runtimes
async def test_watch_reports_creates_modifies_moves_and_deletes(sandbox: TestClient) -> None:
    ws = await watch(sandbox)
    await shell(sandbox, "mkdir -p /workspace/w/sub && echo 1 > /workspace/w/sub/f.txt")
    await changes_until(ws, has("created", "/workspace/w/sub/f.txt"))
    await shell(sandbox, "sleep 0.2; echo 2 >> /workspace/w/sub/f.txt")
    await changes_until(ws, has("modified", "/workspace/w/sub/f.txt"))
    await shell(sandbox, "sleep 0.2; mv /workspace/w/sub/f.txt /workspace/w/g.txt")
    batches = await changes_until(ws, has("moved", "/workspace/w/g.txt"))
    moved = next(c for b in batches for c in b if c["event"] == "moved")
    assert moved["from"] == "/workspace/w/sub/f.txt"
    # A folder moved in the tree is still watched under its new name.
    await shell(
        sandbox,
        "sleep 0.2; mv /workspace/w/sub /workspace/w/renamed; sleep 0.2; touch /workspace/w/renamed/new",
    )
    await changes_until(ws, has("created", "/workspace/w/renamed/new"))
    await shell(sandbox, "sleep 0.2; rm /workspace/w/g.txt")
    await changes_until(ws, has("deleted", "/workspace/w/g.txt"))
    # A write through the API is one change of the file; its temporary file never shows.
    await asyncio.sleep(0)
    await put(sandbox, "w/api.txt", b"x")
    batches = await changes_until(ws, has("modified", "/workspace/w/api.txt"))
    assert not any(".sgw-" in c["path"] for b in batches for c in b)
    await ws.close()


async def test_watch_coalesces_a_burst(sandbox: TestClient) -> None:
    ws = await watch(sandbox)
    started = time.monotonic()
    await shell(
        sandbox,
        "mkdir -p /workspace/burst && cd /workspace/burst && for i in $(seq 3000); do echo $i > f$i; done",
    )
    batches = await changes_until(
        ws,
        lambda cs: (
            any(c["path"] in ("/workspace/burst", "/workspace") and c["event"] == "changed" for c in cs)
            or len({c["path"] for c in cs}) >= 3001
        ),
    )
    elapsed = time.monotonic() - started
    messages = len(batches)
    # Thousands of events, a handful of messages: at most about ten a second.
    assert messages <= 10 * elapsed + 3, (messages, elapsed)
    assert all(len(b) <= 256 for b in batches)
    await ws.close()


async def test_watch_latency_and_errors(sandbox: TestClient) -> None:
    ws = await watch(sandbox)
    await shell(sandbox, "touch /workspace/lat")
    await changes_until(ws, has("created", "/workspace/lat"))
    await ws.close()
    ws = await sandbox.ws_connect(
        f"{FILES}/watch", params={"path": "nope"}, headers=auth("alice"), protocols=["sandbox-files.v1"]
    )
    message = await ws.receive(timeout=10)
    assert message.type == aiohttp.WSMsgType.CLOSE, message
    assert message.data == 4004, message
    response = await sandbox.get(
        f"{FILES}/watch", headers={**auth("alice"), "Origin": "https://evil.example"}
    )
    assert response.status in (400, 403)


async def test_writes_and_moves_count_as_activity(make_client: MakeClient) -> None:
    client = await make_client(activity_interval_s=0.2)
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    for step in ("write", "move"):
        async with client.app[DB].acquire() as conn:
            await conn.execute("UPDATE sessions SET last_activity = '2000-01-01' WHERE user_id = 'alice'")
        if step == "write":
            await put(client, "active.txt", b"x")
        else:
            response = await client.post(
                f"{FILES}/move", headers=auth("alice"), json={"from": "active.txt", "to": "moved.txt"}
            )
            assert response.status == 200
        async with client.app[DB].acquire() as conn:
            assert await conn.fetchval(
                "SELECT last_activity > '2001-01-01' FROM sessions WHERE user_id = 'alice'"
            )


async def test_a_files_worker_the_user_killed_is_replaced(sandbox: TestClient) -> None:
    await put(sandbox, "kept.txt", b"still here")
    # The workers are the user's processes: the user may kill them, and loses nothing by it.
    assert await shell(sandbox, "pkill -9 -f 'sandbox_agent[.]files_worker' && echo killed") == "killed\n"
    assert await get(sandbox, "kept.txt") == b"still here"


async def test_streams_and_watches_are_bounded_per_user(make_client: MakeClient) -> None:
    client = await make_client(
        files=replace(FileSettings(), max_streams_per_user=2, max_watches_per_sandbox=2)
    )
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    release = asyncio.Event()

    async def slow_body() -> Any:
        yield b"a"
        await release.wait()

    uploads = []
    for n in range(2):
        upload = client.put(CONTENT, params={"path": f"slow{n}"}, data=slow_body(), headers=auth("alice"))
        uploads.append(asyncio.ensure_future(upload))

        async def writing(count: int = n + 1) -> bool:
            # Each upload in flight has its temporary file in the sandbox.
            listed = await shell(client, "ls -A /workspace | grep -c '^.sgw-' || true")
            return listed.strip() == str(count)

        await poll(writing)
    response = await client.get(CONTENT, params={"path": "/etc/hostname"}, headers=auth("alice"))
    assert await error_of(response, 429) == "too_many_requests"
    # Another user is not held up by alice's streams.
    assert (await client.post("/api/sandbox", headers=auth("bob"))).status == 201
    assert await get(client, "/etc/hostname", user="bob")
    release.set()
    assert [r.status for r in await asyncio.gather(*uploads)] == [201, 201]

    sockets = [await watch(client) for _ in range(2)]
    third = await client.ws_connect(f"{FILES}/watch", headers=auth("alice"), protocols=["sandbox-files.v1"])
    message = await third.receive(timeout=10)
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert message.data == 4029
    for ws in sockets:
        await ws.close()


async def test_a_download_the_client_drops_frees_its_slot(make_client: MakeClient) -> None:
    client = await make_client(files=replace(FileSettings(), max_streams_per_user=1))
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    await shell(client, "head -c 50000000 /dev/urandom > /workspace/big.bin")
    response = await client.get(CONTENT, params={"path": "big.bin"}, headers=auth("alice"))
    assert response.status == 200
    await response.content.read(65536)
    response.close()  # gone midway, with most of the file unsent

    async def free() -> bool:
        small = await client.get(CONTENT, params={"path": "/etc/hostname"}, headers=auth("alice"))
        return small.status == 200

    await poll(free)
