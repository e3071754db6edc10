"""The files operations: the sandbox's files as its user sees them (the gateway's files API).

  files.stat     J {"path"} -> J {"ok": true, "entry": {...}}
  files.list     J {"path", "depth", "max_entries"} -> J {"ok": true, "path", "truncated"}, then
                 J {"entries": [...]} in pieces, then J {"end": true}
  files.mkdir    J {"path", "parents"} -> J {"ok": true, "entry", "created"}
  files.move     J {"from", "to", "overwrite", "parents"} -> J {"ok": true, "entry"}
  files.delete   J {"path", "recursive"} -> J {"ok": true}
  files.read     J {"path", "start"?, "stop"?} -> J {"ok": true, "entry", "start", "stop"}, then 1 frames
                 of the bytes from start to stop (a slice: stop excluded, negative start from the end),
                 then J {"end": true}
  files.write    J {"path", "parents", "overwrite", "if_match"?, "max_bytes"} -> J {"ok": true}, then
                 0 frames of the content, an empty one at its end; the agent answers J {"ok": true,
                 "entry", "created"} once the file is in place, or J {"ok": false, "error"}
  files.archive  J {"path", "format": "tar" | "zip"} -> J {"ok": true}, then 1 frames, J {"end": true}
  files.watch    (files_watch.py)

Paths come absolute and normalised from the gateway. Everything that resolves a path runs in a files
worker (files_worker.py, the user's process); the agent only moves bytes through the descriptors a
worker opened, after checking that they are regular files (a worker is the user's to tamper with, and
a pipe or a socket could block the agent's threads). A write goes to a temporary file next to the
target and is renamed over it at the end, so a reader sees the old file or the new one, never half;
a write cut short leaves the old file as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import stat
import sys
from collections.abc import AsyncIterator
from typing import Any

from . import protocol, spawn
from .protocol import OpError
from .server import Connection

# Workers at once for the short operations, and how long an idle one is kept: the first call after
# that starts a new one (a few tens of milliseconds).
MAX_WORKERS = 4
WORKER_IDLE_S = 60.0
# A short operation (a listing, a recursive delete) that takes longer has its worker killed.
CALL_TIMEOUT_S = 120.0
# A worker's reply: a listing of the largest size the gateway may ask for.
MAX_REPLY = 64 * 1024 * 1024
CHUNK = 256 * 1024
LIST_PIECE = 500
MAX_ARCHIVES = 4
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_PROGRAM = (
    f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
    "from sandbox_agent.files_worker import main; main()"
)


class Worker:
    """One files worker for short operations: a blocking socket, used from one thread at a time."""

    def __init__(self, sock: socket.socket, tag: int) -> None:
        self.sock, self.tag = sock, tag
        self.idle_timer: asyncio.TimerHandle | None = None

    def call(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        self.sock.sendall(protocol.json_frame(request))
        header, fds = b"", []
        while len(header) < protocol.HEADER.size:
            data, received, _, _ = socket.recv_fds(
                self.sock, protocol.HEADER.size - len(header), 1, socket.MSG_CMSG_CLOEXEC
            )
            fds.extend(received)
            if not data:
                raise ConnectionError("the files worker ended")
            header += data
        try:
            return self._read_reply(header), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _read_reply(self, header: bytes) -> dict[str, Any]:
        kind, length = protocol.HEADER.unpack(header)
        if kind != protocol.JSON or length > MAX_REPLY:
            raise protocol.ProtocolError("a malformed reply from the files worker")
        payload = bytearray()
        while len(payload) < length:
            chunk = self.sock.recv(min(length - len(payload), 1024 * 1024))
            if not chunk:
                raise ConnectionError("the files worker ended inside a reply")
            payload += chunk
        return protocol.parse_json(bytes(payload))

    def alive(self) -> bool:
        """False once the worker is gone (the user may kill it): its socket reads as ended. An idle
        worker sends nothing, so anything readable is its end."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            # (A socket with a timeout waits for data before any recv: hence the select first.)
            return not readable or self.sock.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def end(self) -> None:
        self.sock.close()  # the worker reads its end and exits
        spawn.kill_tagged(self.tag)


async def start_worker() -> tuple[socket.socket, int]:
    """A new files worker as the user; the agent's end of its socket, and its tag."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tag = spawn.new_tag()
    try:
        await spawn.spawn(
            [sys.executable, "-IS", "-c", WORKER_PROGRAM],
            tag=tag,
            env=spawn.base_environment(),
            stdin=theirs,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as err:
        ours.close()
        raise OpError("files_failed", f"could not start the files worker: {err}") from None
    finally:
        theirs.close()
    return ours, tag


class Workers:
    """The pool of files workers for short operations, started on demand and ended when idle."""

    def __init__(self) -> None:
        self._idle: list[Worker] = []
        self._count = 0
        self._freed = asyncio.Condition()

    async def call(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """The worker's reply, or OpError with the code it gave; the descriptors that came with it
        are the caller's to close."""
        worker = await self._take()
        try:
            reply, fds = await asyncio.to_thread(worker.call, request)
        except (OSError, protocol.ProtocolError) as err:
            # A broken worker (killed by the user, or too slow) is ended, never given back.
            await self._lose(worker)
            raise OpError("files_failed", f"the files worker failed: {err!r}") from None
        except BaseException:
            await self._lose(worker)
            raise
        await self._give_back(worker)
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            error = reply.get("error") or {}
            raise OpError(str(error.get("code", "files_failed")), str(error.get("message", "refused")))
        return reply, fds

    async def _take(self) -> Worker:
        async with self._freed:
            while not self._idle and self._count >= MAX_WORKERS:
                await self._freed.wait()
            while self._idle:
                worker = self._idle.pop()
                if worker.idle_timer is not None:
                    worker.idle_timer.cancel()
                if worker.alive():
                    return worker
                worker.end()  # killed while idle: a new one takes its place
                self._count -= 1
            self._count += 1
        try:
            sock, tag = await start_worker()
        except BaseException:
            async with self._freed:
                self._count -= 1
                self._freed.notify()
            raise
        sock.settimeout(CALL_TIMEOUT_S)
        return Worker(sock, tag)

    async def _give_back(self, worker: Worker) -> None:
        async with self._freed:
            worker.idle_timer = asyncio.get_running_loop().call_later(WORKER_IDLE_S, self._retire, worker)
            self._idle.append(worker)
            self._freed.notify()

    async def _lose(self, worker: Worker) -> None:
        worker.end()
        async with self._freed:
            self._count -= 1
            self._freed.notify()

    def _retire(self, worker: Worker) -> None:
        if worker in self._idle:
            self._idle.remove(worker)
            self._count -= 1
            worker.end()

    def end_all(self) -> None:
        for worker in self._idle:
            worker.end()
        self._idle.clear()


def _regular(fd: int) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OpError("files_failed", "the files worker passed something that is not a regular file")


def _one_fd(fds: list[int]) -> int:
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OpError("files_failed", "the files worker passed no file")
    _regular(fds[0])
    return fds[0]


async def short(workers: Workers, op: str, connection: Connection, request: dict[str, Any]) -> None:
    """stat, mkdir, move, delete: the worker's answer is the answer."""
    reply, fds = await workers.call({**request, "op": op})
    for fd in fds:
        os.close(fd)
    await connection.send_json(reply)


async def list_folder(workers: Workers, connection: Connection, request: dict[str, Any]) -> None:
    reply, fds = await workers.call({**request, "op": "list"})
    for fd in fds:
        os.close(fd)
    entries = reply.get("entries") or []
    await connection.send_json(
        {"ok": True, "path": reply.get("path"), "truncated": bool(reply.get("truncated"))}
    )
    for start in range(0, len(entries), LIST_PIECE):
        await connection.send_json({"entries": entries[start : start + LIST_PIECE]})
    await connection.send_json({"end": True})


def _range(request: dict[str, Any], size: int) -> tuple[int, int]:
    start, stop = request.get("start"), request.get("stop")
    for value in (start, stop):
        if value is not None and not isinstance(value, int):
            raise OpError("bad_request", "start and stop must be integers")
    first, last, _ = slice(start, stop).indices(size)
    return first, max(first, last)


async def read(workers: Workers, connection: Connection, request: dict[str, Any]) -> None:
    reply, fds = await workers.call({"op": "open_read", "path": request.get("path")})
    fd = _one_fd(fds)
    try:
        described = reply["entry"]
        start, stop = _range(request, int(described["size"]))
        await connection.send_json({"ok": True, "entry": described, "start": start, "stop": stop})
        position = start
        while position < stop:
            data = await asyncio.to_thread(os.pread, fd, min(CHUNK, stop - position), position)
            if not data:
                break  # it shrank under us: the gateway sees the bytes end early
            await connection.send(protocol.frame(protocol.STDOUT, data))
            position += len(data)
        await connection.send_json({"end": True, "sent": position - start})
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def write(workers: Workers, connection: Connection, request: dict[str, Any]) -> None:
    max_bytes = request.get("max_bytes")
    if not isinstance(max_bytes, int) or max_bytes < 0:
        raise OpError("bad_request", "max_bytes must be a non-negative integer")
    conditions = {k: request.get(k) for k in ("path", "parents", "overwrite", "if_match")}
    opened, fds = await workers.call({**conditions, "op": "open_write"})
    fd = _one_fd(fds)
    temp = {"temp": opened["temp"], "path": opened["path"]}
    committed = False
    try:
        await connection.send_json({"ok": True})
        written = await _receive_content(connection, fd, max_bytes)
        os.close(fd)
        fd = -1
        if written is None:
            return  # the gateway went: the write is abandoned, the old file stays
        reply, more = await workers.call({**conditions, **temp, "op": "commit_write"})
        committed = True
        for extra in more:
            os.close(extra)
        await connection.send_json({"ok": True, "entry": reply["entry"], "created": opened["created"]})
    except OpError as err:
        await connection.send_json(protocol.error_message(err.code, err.message))
    finally:
        if fd >= 0:
            os.close(fd)
        if not committed:
            with contextlib.suppress(OpError):
                await workers.call({**temp, "op": "abort_write"})


async def _receive_content(connection: Connection, fd: int, max_bytes: int) -> int | None:
    """Writes the 0 frames to fd up to the empty one; how many bytes, or None if the stream broke."""
    written = 0
    while True:
        try:
            message = await connection.read_frame()
        except (protocol.ProtocolError, ConnectionError):
            return None
        if message is None:
            return None
        kind, data = message
        if kind != protocol.STDIN:
            raise OpError("bad_request", "a write carries 0 frames")
        if not data:
            return written
        written += len(data)
        if written > max_bytes:
            raise OpError("too_large", f"a file of at most {max_bytes} bytes")
        try:
            await asyncio.to_thread(_write_all, fd, data)
        except OSError as err:
            code = "no_space" if err.errno in (28, 122) else "files_failed"  # ENOSPC, EDQUOT
            raise OpError(code, f"could not write: {err.strerror}") from None


@contextlib.asynccontextmanager
async def dedicated_worker(
    request: dict[str, Any],
) -> AsyncIterator[tuple[asyncio.StreamReader, dict[str, Any]]]:
    """A worker of its own for an operation that takes the connection over (archive, watch): its
    frames after the request, and its first answer; the worker ends with the block."""
    sock, tag = await start_worker()
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        spawn.kill_tagged(tag)
        raise
    try:
        writer.write(protocol.json_frame(request))
        first = await protocol.read_frame(reader)
        if first is None or first[0] != protocol.JSON:
            raise OpError("files_failed", "the files worker ended without an answer")
        answer = protocol.parse_json(first[1])
        if not answer.get("ok"):
            error = answer.get("error") or {}
            raise OpError(str(error.get("code", "files_failed")), str(error.get("message", "refused")))
        yield reader, answer
    finally:
        writer.close()
        spawn.kill_tagged(tag)


class Archives:
    def __init__(self) -> None:
        self.running = 0

    async def archive(self, connection: Connection, request: dict[str, Any]) -> None:
        if request.get("format") not in ("tar", "zip"):
            raise OpError("bad_request", "format must be tar or zip")
        if self.running >= MAX_ARCHIVES:
            raise OpError("too_many", f"at most {MAX_ARCHIVES} archives at once in a sandbox")
        self.running += 1
        try:
            async with dedicated_worker({**request, "op": "archive"}) as (reader, _):
                await connection.send_json({"ok": True})
                while (message := await protocol.read_frame(reader)) is not None:
                    kind, payload = message
                    if kind == protocol.JSON:
                        # The end, or an error midway: the gateway cuts the download either way
                        # unless it is the end.
                        await connection.send_json(json.loads(payload))
                        return
                    await connection.send(protocol.frame(protocol.STDOUT, payload))
                await connection.send_json(
                    protocol.error_message("files_failed", "the archive was cut short")
                )
        finally:
            self.running -= 1
