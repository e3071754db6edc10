"""The files API (README "Files"): read, write, list, stat, make folders, move, delete, upload and
download as an archive, in the caller's own sandbox, as its user (files.py). Watching: files_watch.py.

Bodies stream both ways: a write's body goes to the agent as it arrives and a read's bytes to the
client as the agent sends them, each side waiting for the other, so a large file never sits in the
gateway's memory.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Literal
from urllib.parse import quote, urlencode

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from . import db, file_links, files
from .errors import (
    AgentFailed,
    AgentUnavailable,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)
from .files import FolderBody, MoveBody, WriteOptions, sandbox_path
from .keys import DB, FILE_STREAMS, PREVIEW_SESSIONS, SANDBOXES, SETTINGS, USER
from .schemas import StrictModel, check_identity_coding, parse_body

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
# A body that sends nothing for this long is abandoned (the file stays as it was).
BODY_IDLE_S = 60.0
# Only the built-in table: the host's /etc/mime.types would make the answer depend on the machine.
TYPES = mimetypes.MimeTypes(filenames=())
# A user's file is data, never a page of ours: a browser shown one runs no script and sniffs nothing.
CONTENT_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, no-cache",
}
ARCHIVE_TYPES = {"zip": "application/zip", "tar": "application/x-tar"}
DOWNLOAD_PATH = "/api/sandbox/files/download"


def _flag(request: web.Request, name: str, default: bool = False) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw not in ("true", "false"):
        raise InvalidRequest(f"{name}: must be true or false")
    return raw == "true"


def _path(request: web.Request, default: str | None = None) -> str:
    return sandbox_path(request.query.get("path"), default=default)


async def list_folder(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS].files
    path = _path(request, default=files.WORKSPACE)
    recursive = _flag(request, "recursive")
    raw_depth = request.query.get("depth")
    if raw_depth is None:
        depth = min(16, settings.max_list_depth) if recursive else 1
    elif not raw_depth.isdigit() or not 1 <= int(raw_depth) <= settings.max_list_depth:
        raise InvalidRequest(f"depth: an integer from 1 to {settings.max_list_depth}")
    else:
        depth = int(raw_depth)
    address = await request.app[SANDBOXES].agent(request[USER])
    return web.json_response(await files.list_folder(address, path, depth, settings.max_list_entries))


async def stat(request: web.Request) -> web.Response:
    address = await request.app[SANDBOXES].agent(request[USER])
    described = await files.stat(address, _path(request))
    return web.json_response(described, headers={"ETag": described["etag"]})


async def make_folder(request: web.Request) -> web.Response:
    body = await parse_body(request, FolderBody)
    address = await request.app[SANDBOXES].agent(request[USER])
    described, created = await files.make_folder(address, body)
    return web.json_response(described, status=201 if created else 200)


async def move(request: web.Request) -> web.Response:
    body = await parse_body(request, MoveBody)
    address = await request.app[SANDBOXES].agent(request[USER])
    return web.json_response(await files.move(address, body))


async def delete(request: web.Request) -> web.Response:
    path = _path(request)
    recursive = _flag(request, "recursive")
    address = await request.app[SANDBOXES].agent(request[USER])
    await files.delete(address, path, recursive)
    return web.Response(status=204)


def _content_type(name: str) -> str:
    guessed, encoding = TYPES.guess_type(name, strict=False)
    if guessed is None or encoding is not None:
        return "application/octet-stream"  # a .tar.gz is a gzip file to a browser, not a tar
    return guessed


def _requested_range(request: web.Request) -> slice | None:
    if "Range" not in request.headers:
        return None
    try:
        wanted = request.http_range
    except ValueError:
        return None  # a range we do not serve (several, or malformed): the whole file, as RFC 9110 allows
    return wanted if wanted.start is not None or wanted.stop is not None else None


def _disposition(kind: str, name: str) -> str:
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"


async def read(request: web.Request) -> web.StreamResponse:
    return await _send_file(request, request[USER], _path(request), download=_flag(request, "download"))


async def _send_file(request: web.Request, user: str, path: str, *, download: bool) -> web.StreamResponse:
    wanted = _requested_range(request)
    async with request.app[FILE_STREAMS].slot(user):
        address = await request.app[SANDBOXES].agent(user)
        start, stop = (wanted.start, wanted.stop) if wanted else (None, None)
        async with files.read(address, path, start, stop) as reading:
            described = reading.entry
            size = int(described["size"])
            headers = {
                **CONTENT_HEADERS,
                "Content-Type": _content_type(described["name"]),
                "ETag": described["etag"],
                "Last-Modified": format_datetime(datetime.fromisoformat(described["modified"]), usegmt=True),
                "Accept-Ranges": "bytes",
            }
            if download:
                headers["Content-Disposition"] = _disposition("attachment", described["name"])
            status = 200
            if wanted is not None:
                if reading.start >= reading.stop:  # past the end (any range of an empty file is)
                    return web.json_response(
                        {"error": {"code": "range_not_satisfiable", "message": f"the file has {size} bytes"}},
                        status=416,
                        headers={"Content-Range": f"bytes */{size}"},
                    )
                status = 206
                headers["Content-Range"] = f"bytes {reading.start}-{reading.stop - 1}/{size}"
            length = reading.stop - reading.start
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = length
            await response.prepare(request)
            sent = 0
            try:
                async for chunk in reading.chunks():
                    await response.write(chunk)
                    sent += len(chunk)
            except ConnectionError:
                return response  # the client went: nothing to finish
            if sent != length and request.transport is not None:
                # The file shrank while it was read: the client must see a cut, not a short file.
                log.info("a read of %s ended after %d of %d bytes", path, sent, length)
                request.transport.close()
                return response
            await response.write_eof()
            return response


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    while True:
        try:
            async with asyncio.timeout(BODY_IDLE_S):
                chunk = await request.content.readany()
        except TimeoutError:
            raise RequestTimeout(f"body: nothing came for {BODY_IDLE_S:g} s") from None
        except web.RequestPayloadError:
            raise InvalidRequest("body: cut short before its announced end") from None
        if not chunk:
            return
        yield chunk


async def write(request: web.Request) -> web.Response:
    path = _path(request)
    options = WriteOptions(
        parents=_flag(request, "parents"),
        overwrite=_flag(request, "overwrite", default=True),
        if_match=request.headers.get("If-Match"),
    )
    check_identity_coding(request)
    limit = request.app[SETTINGS].files.max_write_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"a file of at most {limit} bytes")
    user = request[USER]
    async with request.app[FILE_STREAMS].slot(user):
        address = await request.app[SANDBOXES].agent(user)
        described, created = await files.write(address, path, _body_chunks(request), options, limit)
    return web.json_response(described, status=201 if created else 200, headers={"ETag": described["etag"]})


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        try:
            async with asyncio.timeout(BODY_IDLE_S):
                chunk = await part.read_chunk(READ_CHUNK)
        except TimeoutError:
            raise RequestTimeout(f"body: nothing came for {BODY_IDLE_S:g} s") from None
        if not chunk:
            return
        yield chunk


async def upload(request: web.Request) -> web.Response:
    """multipart/form-data, each file part written under ?path= (a folder, made if need be) by its
    file name, which may carry folders of its own (a dropped folder's files)."""
    folder = _path(request, default=files.WORKSPACE)
    check_identity_coding(request)
    if not request.content_type.startswith("multipart/form-data"):
        raise InvalidRequest("body: must be multipart/form-data")
    settings = request.app[SETTINGS].files
    user = request[USER]
    written: list[dict[str, Any]] = []
    async with request.app[FILE_STREAMS].slot(user):
        address = await request.app[SANDBOXES].agent(user)
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.filename is None:
                    raise InvalidRequest("body: every part must be a file, with a file name")
                if len(written) >= settings.max_upload_files:
                    raise InvalidRequest(f"body: at most {settings.max_upload_files} files in an upload")
                target = sandbox_path(f"{folder}/{files.relative_name(part.filename)}", "filename")
                options = WriteOptions(parents=True, overwrite=True)
                described, _ = await files.write(
                    address, target, _part_chunks(part), options, settings.max_write_bytes
                )
                written.append(described)
        except (ValueError, AssertionError, HttpProcessingError) as err:
            # aiohttp's multipart reader refuses a malformed body with these.
            raise InvalidRequest(f"body: not a valid multipart body ({err})") from None
    if not written:
        raise InvalidRequest("body: no file in the upload")
    return web.json_response({"files": written}, status=201)


async def archive(request: web.Request) -> web.StreamResponse:
    path = _path(request, default=files.WORKSPACE)
    form = request.query.get("format", "zip")
    if form not in ARCHIVE_TYPES:
        raise InvalidRequest("format: zip or tar")
    return await _send_archive(request, request[USER], path, form)


async def _send_archive(request: web.Request, user: str, path: str, form: str) -> web.StreamResponse:
    name = path.rstrip("/").rsplit("/", 1)[-1] or "root"
    async with request.app[FILE_STREAMS].slot(user):
        address = await request.app[SANDBOXES].agent(user)
        async with files.archive(address, path, form) as content:
            headers = {
                "Content-Type": ARCHIVE_TYPES[form],
                "Content-Disposition": _disposition("attachment", f"{name}.{form}"),
                "Cache-Control": "no-store",
            }
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            try:
                async for chunk in content:
                    await response.write(chunk)
            except ConnectionError:
                return response  # the client went: the agent's worker ends with the operation
            except (AgentFailed, AgentUnavailable) as err:
                # Too late for a status: the client must see a cut, not a short archive.
                log.info("an archive of %s failed midway: %s", path, err.message)
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            return response


class DownloadLinkBody(StrictModel):
    path: str
    # How a folder is sent; a file is sent as it is.
    format: Literal["zip", "tar"] = "zip"


async def download_link(request: web.Request) -> web.Response:
    """POST {path, format?}: a one-use, one-minute link that downloads the file, or the folder as an
    archive, with no token (file_links.py): what a browser can save to disk as it streams."""
    body = await parse_body(request, DownloadLinkBody)
    path = sandbox_path(body.path)
    user = request[USER]
    address = await request.app[SANDBOXES].agent(user)
    # Said now, while the page can show it, rather than as a failed download: the path must be there
    # and the sandbox's user must be able to read it.
    described = await files.stat(address, path)
    form: file_links.Form
    if described["kind"] == "folder":
        await files.list_folder(address, path, 1, 1)
        form = body.format
    else:
        async with files.read(address, path, 0, 0) as reading:
            described, form = reading.entry, "file"
    token, expires = file_links.sign(user, path, form, request.app[PREVIEW_SESSIONS].key)
    return web.json_response(
        {
            "url": f"{DOWNLOAD_PATH}?{urlencode({'ticket': token})}",
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
            "entry": described,
        },
        status=201,
    )


async def download(request: web.Request) -> web.StreamResponse:
    """GET ?ticket=: what a download link allows, once. A public route: the ticket authenticates."""
    link = file_links.verified(request.query.get("ticket", ""), request.app[PREVIEW_SESSIONS].key)
    if link is None:
        raise Unauthorized("the download link is invalid or has expired: download from the page again")
    async with db.connection(request.app[DB]) as conn:
        if not await db.use_ticket(conn, link.id, link.expires):
            raise Unauthorized("this download link was used already: download from the page again")
    if link.form == "file":
        return await _send_file(request, link.user, link.path, download=True)
    return await _send_archive(request, link.user, link.path, link.form)
