"""The files worker: the program that touches the sandbox's files for the agent, run as the user.

The agent is root (without CAP_DAC_OVERRIDE, but root all the same, and its /proc/self is its own);
the files API must see the filesystem exactly as the user does. So every path is resolved, opened,
listed, moved or deleted by this program, which the agent starts as `sandbox` with a tag of its own
(spawn.py), like any of the user's programs: what the user cannot read or write, it cannot either,
symlinks pointing anywhere included. It is the user's process, so the user may kill or trace it; the
agent trusts nothing it says beyond what the user could do anyway (files.py checks the descriptors it
passes).

It speaks the agent's frames (protocol.py) over a Unix socket on its standard input: a J request, a J
reply. `open_read` and `open_write` pass the opened file along with the reply (SCM_RIGHTS), and the
agent moves the bytes itself. `archive` and `watch` take the connection over until it closes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
import struct
import sys
from collections.abc import Iterator
from typing import Any

from . import protocol

# shutil, tarfile, zipfile and ctypes are imported where they are used: each start of a worker is the
# first answer of a files call, and these would double its time.

WORKSPACE = "/workspace"
# Paths the API will not delete or move: the workspace itself and the root.
PROTECTED = frozenset(("/", WORKSPACE))
CHUNK = 256 * 1024
# Folders whose subfolders are not listed recursively, archived... they are, but never watched:
# an `npm install` makes thousands of them.
UNWATCHED_CHILDREN = frozenset(("node_modules", ".git"))
TEMP_PREFIX = ".sgw-"
TEMP_SUFFIX = ".part"

ERROR_CODES = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.ENOTEMPTY: "not_empty",
    errno.ENOTDIR: "not_a_folder",
    errno.EISDIR: "is_a_folder",
    errno.EACCES: "forbidden",
    errno.EPERM: "forbidden",
    errno.EROFS: "forbidden",
    errno.ENAMETOOLONG: "bad_path",
    errno.ELOOP: "bad_path",
    errno.EINVAL: "bad_path",
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EFBIG: "too_large",
    errno.EBUSY: "conflict",
    errno.EXDEV: "conflict",
}


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def refusal(err: OSError, path: str) -> Refused:
    reason = err.strerror or str(err)
    return Refused(ERROR_CODES.get(err.errno or 0, "files_failed"), f"{path}: {reason}")


# Framing over the blocking socket: the same frames as the agent's connections.


def recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            if left == size:
                return None
            raise protocol.ProtocolError("the stream ended inside a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    header = recv_exactly(sock, protocol.HEADER.size)
    if header is None:
        return None
    kind, length = protocol.HEADER.unpack(header)
    if kind not in protocol.KINDS or length > protocol.MAX_FRAME:
        raise protocol.ProtocolError("a malformed frame")
    return kind, recv_exactly(sock, length) or b""


def send_json(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = protocol.json_frame(message)
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    sock.sendall(data)


# What a path is.


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def etag(st: os.stat_result) -> str:
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}"'


def entry(path: str, st: os.stat_result | None = None) -> dict[str, Any]:
    st = st or os.lstat(path)
    described: dict[str, Any] = {
        "name": os.path.basename(path) or path,
        "path": path,
        "kind": kind_of(st.st_mode),
        "size": st.st_size,
        "modified": st.st_mtime,
        "mode": stat.S_IMODE(st.st_mode),
        "etag": etag(st),
    }
    if stat.S_ISLNK(st.st_mode):
        try:
            described["target"] = os.readlink(path)
        except OSError:
            described["target"] = None
        try:
            described["target_kind"] = kind_of(os.stat(path).st_mode)
        except OSError:
            described["target_kind"] = None  # dangling, or not the user's to see
    return described


def checked(path: Any) -> str:
    """The agent sends absolute, normalised paths; anything else is refused, not guessed at."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise Refused("bad_path", "a path must be absolute")
    return path


# The short operations, one request each.


def op_stat(request: dict[str, Any]) -> dict[str, Any]:
    return {"entry": entry(checked(request["path"]))}


def op_list(request: dict[str, Any]) -> dict[str, Any]:
    root = checked(request["path"])
    depth, limit = int(request.get("depth", 1)), int(request.get("max_entries", 10_000))
    if not stat.S_ISDIR(os.stat(root).st_mode):
        raise Refused("not_a_folder", f"{root}: not a folder")
    entries: list[dict[str, Any]] = []
    os.close(os.open(root, os.O_RDONLY | os.O_DIRECTORY))  # forbidden here, not an empty listing
    truncated = _walk(root, depth, limit, entries)
    return {"path": root, "entries": entries, "truncated": truncated}


def _walk(folder: str, depth: int, limit: int, into: list[dict[str, Any]]) -> bool:
    """Appends the folder's entries, folders first and then by name, each folder followed by its own
    down to `depth`; symlinks are listed, never followed. Whether `limit` cut the listing short."""
    try:
        with os.scandir(folder) as scan:
            found = [(item.is_dir(follow_symlinks=False), item.name, item.path) for item in scan]
    except OSError:
        return False  # a subfolder the user may not read: listed, without its contents
    found.sort(key=lambda item: (not item[0], item[1]))
    for is_folder, _, path in found:
        if len(into) >= limit:
            return True
        try:
            into.append(entry(path))
        except OSError:
            continue  # gone under us
        if is_folder and depth > 1 and _walk(path, depth - 1, limit, into):
            return True
    return False


def op_mkdir(request: dict[str, Any]) -> dict[str, Any]:
    path = checked(request["path"])
    if request.get("parents"):
        existed = os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        return {"entry": entry(path), "created": not existed}
    os.mkdir(path)
    return {"entry": entry(path), "created": True}


def op_move(request: dict[str, Any]) -> dict[str, Any]:
    source, target = checked(request["from"]), checked(request["to"])
    if source in PROTECTED:
        raise Refused("forbidden", f"{source} cannot be moved")
    os.lstat(source)  # not_found before anything else
    if source == target:
        return {"entry": entry(target)}
    if target == source or target.startswith(source.rstrip("/") + "/"):
        raise Refused("bad_path", f"{source} cannot move into itself")
    if os.path.lexists(target) and not request.get("overwrite"):
        raise Refused("exists", f"{target}: exists (move with overwrite to replace it)")
    if request.get("parents"):
        os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        import shutil

        shutil.move(source, target)  # to another filesystem (/tmp): a copy, then the delete
    return {"entry": entry(target)}


def op_delete(request: dict[str, Any]) -> dict[str, Any]:
    path = checked(request["path"])
    if path in PROTECTED:
        raise Refused("forbidden", f"{path} cannot be deleted")
    if stat.S_ISDIR(os.lstat(path).st_mode):
        if not request.get("recursive"):
            raise Refused("is_a_folder", f"{path}: a folder (delete it with recursive=true)")
        import shutil

        shutil.rmtree(path)
    else:
        os.unlink(path)
    return {}


def op_open_read(request: dict[str, Any]) -> tuple[dict[str, Any], int]:
    path = checked(request["path"])
    # O_NONBLOCK: a FIFO would block the open itself; for a regular file it changes nothing.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        described = _readable(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return {"entry": described}, fd


def _readable(fd: int, path: str) -> dict[str, Any]:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise Refused("is_a_folder", f"{path}: a folder (list it, or download it as an archive)")
    if not stat.S_ISREG(st.st_mode):
        raise Refused("bad_path", f"{path}: not a regular file")
    return entry(path, st)


def _write_target(path: str) -> str:
    """Writing through a symlink writes the file it points to, keeping the link."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return os.path.realpath(path)
    except FileNotFoundError:
        pass
    return path


def op_open_write(request: dict[str, Any]) -> tuple[dict[str, Any], int]:
    path = _write_target(checked(request["path"]))
    folder, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise Refused("bad_path", f"{path}: not a file name")
    existing = _existing(path, request)
    if not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise Refused("not_a_folder", f"{folder}: not a folder")
        if not request.get("parents"):
            raise Refused("not_found", f"{folder}: no such folder (write with parents=true to make it)")
        os.makedirs(folder, exist_ok=True)
    # A name of fixed length next to the file: the rename that ends the write stays in one folder,
    # so it is atomic, and no file name is too long to have one.
    temp = os.path.join(folder, f"{TEMP_PREFIX}{os.urandom(8).hex()}{TEMP_SUFFIX}")
    mode = stat.S_IMODE(existing.st_mode) if existing else 0o666
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    if existing:
        os.fchmod(fd, mode)  # the umask took bits the file had
    return {"path": path, "temp": temp, "created": existing is None}, fd


def _existing(path: str, request: dict[str, Any]) -> os.stat_result | None:
    """The file a write replaces, after the write's conditions on it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if request.get("if_match"):
            raise Refused("precondition_failed", f"{path}: no such file (If-Match)") from None
        return None
    if stat.S_ISDIR(st.st_mode):
        raise Refused("is_a_folder", f"{path}: a folder")
    if request.get("overwrite") is False:
        raise Refused("exists", f"{path}: exists")
    if (wanted := request.get("if_match")) and wanted not in ("*", etag(st)):
        raise Refused("precondition_failed", f"{path}: changed since it was read (If-Match)")
    return st


def op_commit_write(request: dict[str, Any]) -> dict[str, Any]:
    path, temp = checked(request["path"]), checked(request["temp"])
    if not os.path.basename(temp).startswith(TEMP_PREFIX):
        raise Refused("bad_path", "not a temporary file of a write")
    try:
        _existing(path, request)  # the conditions again, just before the file is replaced
        if request.get("overwrite") is False:
            os.link(temp, path)  # fails if the name appeared since: never a silent replace
            os.unlink(temp)
        else:
            os.replace(temp, path)
    except BaseException:
        op_abort_write(request)
        raise
    return {"entry": entry(path)}


def op_abort_write(request: dict[str, Any]) -> dict[str, Any]:
    temp = checked(request["temp"])
    if os.path.basename(temp).startswith(TEMP_PREFIX):
        with contextlib.suppress(OSError):
            os.unlink(temp)
    return {}


def op_unknown(request: dict[str, Any]) -> dict[str, Any]:
    raise Refused("bad_request", f"no files operation {request.get('op')!r}")


SHORT_OPERATIONS = {
    "stat": op_stat,
    "list": op_list,
    "mkdir": op_mkdir,
    "move": op_move,
    "delete": op_delete,
    "commit_write": op_commit_write,
    "abort_write": op_abort_write,
}
OPENING_OPERATIONS = {"open_read": op_open_read, "open_write": op_open_write}


# Archives: the worker writes one to the connection as stdout frames, until it is done.


class FrameWriter:
    """A write-only stream whose bytes go out as stdout frames, CHUNK at a time. No tell(): zipfile
    then writes data descriptors, as an unseekable stream needs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) >= CHUNK:
            self._send(bytes(self.buffer[:CHUNK]))
            del self.buffer[:CHUNK]
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self._send(bytes(self.buffer))
            self.buffer.clear()

    def _send(self, data: bytes) -> None:
        self.sock.sendall(protocol.frame(protocol.STDOUT, data))


def archive_members(root: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path, name in the archive, lstat) of the folder and all below it, symlinks not followed;
    what the user may not read is left out."""
    base = os.path.basename(root.rstrip("/")) or "workspace"
    for folder, folders, files in os.walk(root):
        folders.sort()
        relative = os.path.relpath(folder, root)
        prefix = base if relative == "." else f"{base}/{relative}"
        try:
            yield folder, prefix, os.lstat(folder)
        except OSError:
            continue
        for name in sorted(files) + [f for f in folders if os.path.islink(os.path.join(folder, f))]:
            path = os.path.join(folder, name)
            try:
                yield path, f"{prefix}/{name}", os.lstat(path)
            except OSError:
                continue


def write_tar(root: str, out: FrameWriter) -> int:
    import tarfile

    skipped = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for path, name, _ in archive_members(root):
            try:
                info = archive.gettarinfo(path, arcname=name)
                if info.isreg():
                    with open(path, "rb") as source:
                        archive.addfile(info, source)
                else:
                    archive.addfile(info)
            except OSError:
                skipped += 1
    return skipped


def write_zip(root: str, out: FrameWriter) -> int:
    import shutil
    import zipfile

    skipped = 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:  # type: ignore[call-overload]
        for path, name, st in archive_members(root):
            if stat.S_ISDIR(st.st_mode):
                archive.writestr(zipfile.ZipInfo.from_file(path, name), b"")
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # zip has no portable symlinks: a tar keeps them
            try:
                with (
                    open(path, "rb") as source,
                    archive.open(zipfile.ZipInfo.from_file(path, name), "w", force_zip64=True) as target,
                ):
                    shutil.copyfileobj(source, target, CHUNK)
            except OSError:
                skipped += 1
    return skipped


def op_archive(sock: socket.socket, request: dict[str, Any]) -> None:
    root = checked(request["path"])
    if not stat.S_ISDIR(os.stat(root).st_mode):
        raise Refused("not_a_folder", f"{root}: not a folder")
    send_json(sock, {"ok": True})
    out = FrameWriter(sock)
    skipped = (write_zip if request.get("format") == "zip" else write_tar)(root, out)
    out.flush()
    send_json(sock, {"end": True, "skipped": skipped})


# Watching: inotify on every folder under the root, as the user (the kernel checks read access).

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR, IN_ISDIR, IN_CLOEXEC = 0x1000000, 0x40000000, 0o2000000
WATCH_MASK = IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_ONLYDIR
EVENT = struct.Struct("iIII")


class Watcher:
    def __init__(self, sock: socket.socket, root: str, max_folders: int) -> None:
        import ctypes

        self.sock, self.root, self.max_folders = sock, root, max_folders
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_CLOEXEC)
        if self.fd < 0:
            number = ctypes.get_errno()
            raise refusal(OSError(number, os.strerror(number)), root)
        self.paths: dict[int, str] = {}
        self.full = False

    def emit(self, event: str, path: str, kind: str, source: str | None = None) -> None:
        message = {"e": event, "p": path, "k": kind}
        if source is not None:
            message["f"] = source
        send_json(self.sock, message)

    def add(self, folder: str, announce: bool) -> None:
        """Watches `folder` and the folders under it; `announce` reports what is already in them
        (a folder made or moved in: its contents may have come before its watch)."""
        if len(self.paths) >= self.max_folders:
            if not self.full:
                self.full = True
                send_json(self.sock, {"e": "changed", "p": folder, "k": "folder", "full": True})
            return
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), WATCH_MASK)
        if wd < 0:
            return  # gone, or not the user's to read
        self.paths[wd] = folder
        try:
            with os.scandir(folder) as scan:
                found = [(item.path, item.is_dir(follow_symlinks=False)) for item in scan]
        except OSError:
            return
        for path, is_folder in found:
            if announce:
                self.emit("created", path, "folder" if is_folder else "file")
            if is_folder and os.path.basename(folder) not in UNWATCHED_CHILDREN:
                self.add(path, announce)

    def forget(self, prefix: str) -> None:
        for wd, path in list(self.paths.items()):
            if path == prefix or path.startswith(prefix + "/"):
                self.libc.inotify_rm_watch(self.fd, wd)
                del self.paths[wd]

    def rename(self, source: str, target: str) -> None:
        for wd, path in list(self.paths.items()):
            if path == source or path.startswith(source + "/"):
                self.paths[wd] = target + path[len(source) :]

    def run(self) -> None:
        self.add(self.root, announce=False)
        send_json(self.sock, {"ok": True, "folders": len(self.paths)})
        while True:
            readable, _, _ = select.select([self.fd, self.sock], [], [])
            if self.sock in readable and not self.sock.recv(1, socket.MSG_PEEK):
                return  # the agent closed: the watch is over
            if self.fd in readable:
                self.handle(os.read(self.fd, 64 * 1024))

    def handle(self, data: bytes) -> None:
        moved_from: dict[int, tuple[str, str]] = {}
        offset = 0
        while offset + EVENT.size <= len(data):
            wd, mask, cookie, length = EVENT.unpack_from(data, offset)
            raw = data[offset + EVENT.size : offset + EVENT.size + length]
            offset += EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self.emit("changed", self.root, "folder")
                continue
            folder = self.paths.get(wd)
            if folder is None:
                continue
            if mask & IN_IGNORED:
                self.paths.pop(wd, None)
                continue
            name = os.fsdecode(raw.rstrip(b"\0"))
            path = os.path.join(folder, name) if name else folder
            kind = "folder" if mask & IN_ISDIR else "file"
            if mask & IN_CREATE:
                self.emit("created", path, kind)
                if kind == "folder" and os.path.basename(folder) not in UNWATCHED_CHILDREN:
                    self.add(path, announce=True)
            elif mask & IN_MODIFY:
                self.emit("modified", path, kind)
            elif mask & IN_DELETE:
                self.emit("deleted", path, kind)
            elif mask & IN_MOVED_FROM:
                moved_from[cookie] = (path, kind)
            elif mask & IN_MOVED_TO:
                if (source := moved_from.pop(cookie, None)) is not None:
                    self.emit("moved", path, kind, source=source[0])
                    if kind == "folder":
                        self.rename(source[0], path)
                else:
                    self.emit("created", path, kind)
                    if kind == "folder" and os.path.basename(folder) not in UNWATCHED_CHILDREN:
                        self.add(path, announce=True)
            elif mask & IN_DELETE_SELF and path == self.root:
                self.emit("deleted", path, "folder")
        # Moved out of the watched tree (the pair's other half would be in the same read).
        for path, kind in moved_from.values():
            self.emit("deleted", path, kind)
            if kind == "folder":
                self.forget(path)


def op_watch(sock: socket.socket, request: dict[str, Any]) -> None:
    root = checked(request["path"])
    if not stat.S_ISDIR(os.stat(root).st_mode):
        raise Refused("not_a_folder", f"{root}: not a folder")
    Watcher(sock, root, int(request.get("max_folders", 4096))).run()


TAKEOVER_OPERATIONS = {"archive": op_archive, "watch": op_watch}


def serve(sock: socket.socket) -> None:
    while (message := recv_frame(sock)) is not None:
        request = protocol.parse_json(message[1])
        op = request.get("op")
        try:
            if op in TAKEOVER_OPERATIONS:
                TAKEOVER_OPERATIONS[op](sock, request)
                return
            if op in OPENING_OPERATIONS:
                reply, fd = OPENING_OPERATIONS[op](request)
                try:
                    send_json(sock, {"ok": True, **reply}, fds=[fd])
                finally:
                    os.close(fd)
                continue
            reply = SHORT_OPERATIONS.get(str(op), op_unknown)(request)
        except Refused as err:
            send_json(sock, protocol.error_message(err.code, err.message))
            continue
        except OSError as err:
            failed = refusal(err, err.filename or str(request.get("path", "")))
            send_json(sock, protocol.error_message(failed.code, failed.message))
            continue
        except (KeyError, TypeError, ValueError) as err:
            send_json(sock, protocol.error_message("bad_request", f"a malformed request: {err!r}"))
            continue
        send_json(sock, {"ok": True, **reply})


def main() -> None:
    sock = socket.socket(fileno=os.dup(0))
    sock.setblocking(True)
    os.close(0)
    # The agent went, or the connection was cut: nothing to answer.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, protocol.ProtocolError):
        serve(sock)
    sys.exit(0)


if __name__ == "__main__":
    main()
