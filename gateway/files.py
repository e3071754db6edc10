"""The sandbox's files, through its agent (sandbox-image/agent/sandbox_agent/files.py): what a path may
be, and the files operations. The HTTP API over them is files_api.py; watching is files_watch.py.

The agent acts as the sandbox's user (its files worker is the user's process), so what the user
cannot read or write, these cannot either: there is no check of ours on where a path points, only
on what a path is. Paths are relative to /workspace unless absolute, and are normalised here (`a/../b`
is `b`), so the agent only ever sees absolute, normal paths.
"""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pydantic

from . import agent, agent_protocol
from .agent import AgentAddress, AgentStream
from .errors import AgentFailed, AgentUnavailable, InvalidRequest, PayloadTooLarge
from .schemas import StrictModel

WORKSPACE = "/workspace"
# Linux's own limits: PATH_MAX and NAME_MAX, in bytes.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
# What goes to the agent in one frame of a write: well under its frame limit.
WRITE_CHUNK = 256 * 1024
# A delete or a move across filesystems works before it answers.
SLOW_ANSWER_S = 120.0


class FolderBody(StrictModel):
    path: str
    parents: bool = False


class MoveBody(StrictModel):
    from_: str = pydantic.Field(alias="from")
    to: str
    overwrite: bool = False
    parents: bool = False


def sandbox_path(raw: str | None, name: str = "path", *, default: str | None = None) -> str:
    """An absolute, normalised path inside the sandbox, or InvalidRequest naming what is wrong."""
    if raw is None or raw == "":
        if default is None:
            raise InvalidRequest(f"{name}: required")
        raw = default
    if "\0" in raw:
        raise InvalidRequest(f"{name}: contains a NUL byte")
    try:
        encoded = raw.encode()
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name}: not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidRequest(f"{name}: longer than {MAX_PATH_BYTES} bytes")
    path = posixpath.normpath(posixpath.join(WORKSPACE, raw))
    if path.startswith("//"):
        path = "/" + path.lstrip("/")  # POSIX keeps two leading slashes; Linux means one
    if any(len(part.encode()) > MAX_NAME_BYTES for part in path.split("/")):
        raise InvalidRequest(f"{name}: a name in it is longer than {MAX_NAME_BYTES} bytes")
    return path


def entry_json(raw: dict[str, Any]) -> dict[str, Any]:
    """An entry as the API shows it: the agent's, with its time as the other APIs give times."""
    described = dict(raw)
    modified = described.get("modified")
    if isinstance(modified, int | float):
        described["modified"] = datetime.fromtimestamp(modified, UTC).isoformat()
    return described


def relative_name(raw: str, name: str = "filename") -> str:
    """A relative path below a folder (an uploaded file's name, which may carry its folders):
    never absolute, never climbing out."""
    parts = [part for part in raw.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidRequest(f"{name}: {raw!r} is not a relative file name")
    return "/".join(parts)


async def call(
    address: AgentAddress, op: str, *, answer_timeout_s: float = agent.ANSWER_TIMEOUT_S, **params: Any
) -> dict[str, Any]:
    """A short operation: the agent's answer."""
    async with agent.operation(address, op, answer_timeout_s=answer_timeout_s, **params) as stream:
        return stream.answer


async def stat(address: AgentAddress, path: str) -> dict[str, Any]:
    return entry_json((await call(address, "files.stat", path=path))["entry"])


async def list_folder(address: AgentAddress, path: str, depth: int, max_entries: int) -> dict[str, Any]:
    async with agent.operation(
        address, "files.list", path=path, depth=depth, max_entries=max_entries
    ) as stream:
        entries: list[dict[str, Any]] = []
        while (message := await stream.read_frame()) is not None:
            update = _json(message)
            if update.get("end"):
                return {
                    "path": stream.answer["path"],
                    "entries": entries,
                    "truncated": stream.answer["truncated"],
                }
            entries.extend(entry_json(item) for item in update.get("entries") or [])
    raise AgentUnavailable("the sandbox's agent ended a listing midway")


async def make_folder(address: AgentAddress, body: FolderBody) -> tuple[dict[str, Any], bool]:
    """The folder's entry, and whether it is new (with parents, an existing folder is fine)."""
    answer = await call(address, "files.mkdir", path=sandbox_path(body.path), parents=body.parents)
    return entry_json(answer["entry"]), bool(answer["created"])


async def move(address: AgentAddress, body: MoveBody) -> dict[str, Any]:
    source, target = sandbox_path(body.from_, "from"), sandbox_path(body.to, "to")
    answer = await call(
        address,
        "files.move",
        answer_timeout_s=SLOW_ANSWER_S,
        overwrite=body.overwrite,
        parents=body.parents,
        **{"from": source, "to": target},
    )
    return entry_json(answer["entry"])


async def delete(address: AgentAddress, path: str, recursive: bool) -> None:
    await call(address, "files.delete", answer_timeout_s=SLOW_ANSWER_S, path=path, recursive=recursive)


@dataclass(frozen=True)
class Reading:
    entry: dict[str, Any]
    start: int
    stop: int
    stream: AgentStream

    async def chunks(self) -> AsyncIterator[bytes]:
        """The bytes from start to stop; fewer if the file shrank meanwhile."""
        while (message := await self.stream.read_frame()) is not None:
            kind, payload = message
            if kind == agent_protocol.STDOUT:
                yield payload
            elif _json(message).get("end"):
                return
        raise AgentUnavailable("the sandbox's agent ended a read midway")


@asynccontextmanager
async def read(
    address: AgentAddress, path: str, start: int | None, stop: int | None
) -> AsyncIterator[Reading]:
    async with agent.operation(address, "files.read", path=path, start=start, stop=stop) as stream:
        answer = stream.answer
        yield Reading(entry_json(answer["entry"]), int(answer["start"]), int(answer["stop"]), stream)


@dataclass(frozen=True, kw_only=True)
class WriteOptions:
    parents: bool = False
    overwrite: bool = True
    if_match: str | None = None


async def write(
    address: AgentAddress, path: str, content: AsyncIterator[bytes], options: WriteOptions, max_bytes: int
) -> tuple[dict[str, Any], bool]:
    """Streams `content` into the file at path, which is replaced at the end, whole; (its entry,
    whether it is new). Past max_bytes PayloadTooLarge, and the file stays as it was."""
    async with agent.operation(
        address,
        "files.write",
        path=path,
        parents=options.parents,
        overwrite=options.overwrite,
        if_match=options.if_match,
        max_bytes=max_bytes,
    ) as stream:
        sent = await _send_content(stream, content, max_bytes)
        if sent:
            await stream.send(agent_protocol.STDIN, b"")
        while (message := await stream.read_frame()) is not None:
            answer = _json(message)
            if not answer.get("ok"):
                error = answer.get("error") or {}
                raise AgentFailed(str(error.get("code")), str(error.get("message")))
            return entry_json(answer["entry"]), bool(answer["created"])
    raise AgentUnavailable("the sandbox's agent ended a write midway")


async def _send_content(stream: AgentStream, content: AsyncIterator[bytes], max_bytes: int) -> bool:
    """Whether all of it went; False when the agent stopped taking it (its answer says why)."""
    total = 0
    async for chunk in content:
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"a file of at most {max_bytes} bytes")
        for start in range(0, len(chunk), WRITE_CHUNK):
            try:
                await stream.send(agent_protocol.STDIN, chunk[start : start + WRITE_CHUNK])
            except ConnectionError:
                return False
    return True


@asynccontextmanager
async def archive(address: AgentAddress, path: str, form: str) -> AsyncIterator[AsyncIterator[bytes]]:
    async with agent.operation(address, "files.archive", path=path, format=form) as stream:
        yield _archive_bytes(stream)


async def _archive_bytes(stream: AgentStream) -> AsyncIterator[bytes]:
    while (message := await stream.read_frame()) is not None:
        kind, payload = message
        if kind == agent_protocol.STDOUT:
            yield payload
            continue
        answer = _json(message)
        if answer.get("end"):
            return
        error = answer.get("error") or {}
        raise AgentFailed(str(error.get("code")), str(error.get("message")))
    raise AgentUnavailable("the sandbox's agent ended an archive midway")


def _json(message: tuple[bytes, bytes]) -> dict[str, Any]:
    kind, payload = message
    if kind != agent_protocol.JSON:
        raise AgentUnavailable("the sandbox's agent sent bytes where an answer belongs")
    return agent_protocol.parse_json(payload)
