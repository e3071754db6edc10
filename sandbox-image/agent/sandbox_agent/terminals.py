"""Terminals: a shell on a pty that belongs to the agent, not to a connection, watched by any number
of viewers (one connection each), and kept for a grace period while nobody watches.

  terminal.open    J {"op": "terminal.open", "cols", "rows", "grace_s", "ring_bytes", "max_terminals",
                      "viewer_buffer_bytes", "viewer_stall_s"}: a new terminal, this connection its viewer
  terminal.attach  J {"op": "terminal.attach", "id", "cols"?, "rows"?}: an existing one
      agent:   J {"ok": true, "id", "replayed": N, "cols", "rows"}, then 1 frames: the last N bytes
               of the screen (the replay), then what the shell writes, live
      gateway: 0 frames (keys), J {"type": "resize", "cols", "rows"}; closing the connection detaches
      agent at the end: J {"type": "end", "reason": "exited"|"closed"|"expired"|"stopping"|"lagging",
               "exit": the shell's status or null}
  terminal.list    J {"ok": true, "terminals": [{"id", "created", "viewers", "detached_since", ...}]}
  terminal.close   J {"op": "terminal.close", "id"} -> J {"ok": true}

A terminal ends when its shell exits, at terminal.close, when its grace period passes with no viewer,
or when the agent stops (the sandbox stops). Ending is a hang-up, as when an SSH connection drops:
SIGHUP to every process of its tag and the pty closed; what ignores SIGHUP (nohup) lives on until the
sandbox stops. A shell that ignores it too is killed after HANGUP_TIMEOUT_S.

Slow viewers: output goes to every viewer's socket as it comes. While one viewer has more than
viewer_buffer_bytes unsent, the agent stops reading the pty, so the shell waits (backpressure, as a
real terminal on a slow line). A viewer that holds it up for viewer_stall_s without taking anything is
dropped (end reason "lagging"): the shell and the other viewers go on, and the dropped client can
reattach and redraw from the replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

from . import protocol, ptys, spawn
from .programs import exit_status
from .protocol import OpError
from .server import Connection

SHELL = ["bash", "-l"]
READ_CHUNK = 64 * 1024
# Bounds on what the gateway may ask for: it sends its settings in every open.
MAX_GRACE_S = 7 * 24 * 3600
RING_BYTES = (16 * 1024, 16 * 1024 * 1024)
MAX_TERMINALS = 256
VIEWER_BUFFER_BYTES = (16 * 1024, 64 * 1024 * 1024)
MAX_STALL_S = 3600
MAX_SIZE = 1000
# A hung-up shell that has not ended by then (it traps SIGHUP) is killed.
HANGUP_TIMEOUT_S = 3.0
# After the shell's exit, what is still in the pty is read, at most this much.
LAST_OUTPUT_BYTES = 1024 * 1024


class Viewer:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self.connection.writer.transport

    def write(self, data: bytes) -> None:
        if not self.ended.done() and not self.transport.is_closing():
            self.transport.write(data)

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size()

    def end(self, message: dict[str, Any]) -> None:
        """The last frame; the connection closes once it is sent (the server's close is graceful)."""
        self.write(protocol.json_frame({"type": "end", **message}))
        if not self.ended.done():
            self.ended.set_result(None)


class Terminal:
    def __init__(self, terminals: Terminals, options: dict[str, Any], cols: int, rows: int) -> None:
        self.id = os.urandom(12).hex()
        self.created = time.time()
        self.cols, self.rows = cols, rows
        self.grace_s: float = options["grace_s"]
        self.ring_bytes: int = options["ring_bytes"]
        self.viewer_buffer: int = options["viewer_buffer_bytes"]
        self.viewer_stall_s: float = options["viewer_stall_s"]
        self.viewers: set[Viewer] = set()
        self.detached_since: float | None = time.time()
        self._terminals = terminals
        self._ring = bytearray()
        self._loop = asyncio.get_running_loop()
        self._tag = spawn.new_tag()
        self._master = -1
        self._reading = False
        self._writable: asyncio.Future[None] | None = None
        self._waiting_for_viewers: asyncio.Task[None] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._ending: asyncio.Future[str] = self._loop.create_future()
        self._lifetime: asyncio.Task[None] | None = None
        self.shell: spawn.Child | None = None

    async def start(self) -> None:
        master, slave = os.openpty()
        try:
            # The user's programs open /dev/tty (less, git's pager, ssh's prompt): it must be theirs.
            # (The mode first: once the user owns it, changing it would take CAP_FOWNER.)
            os.fchmod(slave, 0o620)
            os.fchown(slave, spawn.UID, -1)
            ptys.sane(slave)
            ptys.set_size(slave, self.cols, self.rows)
            env = {**spawn.base_environment(), "TERM": "xterm-256color"}
            self.shell = await spawn.spawn(
                SHELL,
                tag=self._tag,
                env=env,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                preexec_fn=ptys.take_terminal,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            # Only the shell holds the pty's other end: when every program of it closed that, the
            # master reads end of file.
            os.close(slave)
        os.set_blocking(master, False)
        self._master = master
        self._resume_reading()
        self._lifetime = asyncio.ensure_future(self._live())

    # --- viewers ---

    def attach(self, viewer: Viewer) -> int:
        """Sends the replay to `viewer` and adds it to those that get what follows: in one step, so
        that nothing is missed or sent twice between the two. How many bytes the replay held."""
        replay = bytes(self._ring)
        for start in range(0, len(replay), READ_CHUNK):
            viewer.write(protocol.frame(protocol.STDOUT, replay[start : start + READ_CHUNK]))
        self.viewers.add(viewer)
        self.detached_since = None
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        return len(replay)

    def detach(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        if not self.viewers and not self._ending.done():
            self.detached_since = time.time()
            self._grace = self._loop.call_later(self.grace_s, self.end, "expired")

    def resize(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        if self._master >= 0:
            ptys.set_size(self._master, cols, rows)  # the kernel sends SIGWINCH to the foreground job

    def redraw(self) -> None:
        """Asks a full-screen program in the foreground (an editor, less, top) to draw its screen again
        for a viewer that just attached: the replay alone may not hold all of it. Not the shell
        itself: readline would print its prompt a second time."""
        shell = self.shell
        with contextlib.suppress(OSError):
            group = os.tcgetpgrp(self._master)
            if shell is not None and group != shell.pid:
                os.killpg(group, signal.SIGWINCH)

    @property
    def replay_size(self) -> int:
        return len(self._ring)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "viewers": len(self.viewers),
            "detached_since": self.detached_since,
            "cols": self.cols,
            "rows": self.rows,
        }

    # --- input and output ---

    async def write_input(self, data: bytes) -> None:
        if ptys.SIGNAL_KEYS.intersection(data):
            data = self._signal_keys(data)
        view = memoryview(data)
        while view and self._master >= 0:
            try:
                view = view[os.write(self._master, view) :]
            except BlockingIOError:
                # The line discipline is full (a program that does not read its input): wait for room.
                self._writable = self._loop.create_future()
                self._loop.add_writer(self._master, self._on_writable)
                try:
                    await self._writable
                finally:
                    with contextlib.suppress(ValueError):
                        self._loop.remove_writer(self._master)
            except OSError:
                return  # the pty is hung up: the keys have nowhere to go

    def _signal_keys(self, data: bytes) -> bytes:
        shell = self.shell
        if shell is None or self._master < 0:
            return data
        kept, echo = ptys.signal_keys(self._master, shell.pid, self._tag, data)
        if echo:
            self._output(echo)
        return kept

    def _on_writable(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _resume_reading(self) -> None:
        if not self._reading and self._master >= 0:
            self._loop.add_reader(self._master, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._master)
            self._reading = False

    def _on_readable(self) -> None:
        # A pty hands out a few KiB a read: what is there now goes out as one frame, so that a
        # flood costs the agent and the gateway one frame per READ_CHUNK, not one per read.
        data = bytearray()
        ended = False
        while len(data) < READ_CHUNK:
            try:
                piece = os.read(self._master, READ_CHUNK - len(data))
            except BlockingIOError:
                break
            except OSError:
                piece = b""  # EIO: every program let go of the pty
            if not piece:
                ended = True
                break
            data += piece
        if data:
            self._output(bytes(data))
        if ended:
            self._pause_reading()

    def _output(self, data: bytes) -> None:
        self._ring += data
        if len(self._ring) > self.ring_bytes:
            del self._ring[: len(self._ring) - self.ring_bytes]
        frame = protocol.frame(protocol.STDOUT, data)
        for viewer in self.viewers:
            viewer.write(frame)
        if self._waiting_for_viewers is None and any(v.unsent() > self.viewer_buffer for v in self.viewers):
            self._pause_reading()
            self._waiting_for_viewers = asyncio.ensure_future(self._wait_for_viewers())

    async def _wait_for_viewers(self) -> None:
        """While the shell waits on the slowest viewers: each one gets viewer_stall_s to take some of
        what it has; one that does not is dropped."""
        try:
            while lagging := [v for v in self.viewers if v.unsent() > self.viewer_buffer]:
                results = await asyncio.gather(*(self._drained(v) for v in lagging), return_exceptions=True)
                for viewer, result in zip(lagging, results, strict=True):
                    if result is not True:
                        self.viewers.discard(viewer)
                        viewer.end({"reason": "lagging", "exit": None})
        finally:
            self._waiting_for_viewers = None
            if not self._ending.done():
                self._resume_reading()

    async def _drained(self, viewer: Viewer) -> bool:
        try:
            async with asyncio.timeout(self.viewer_stall_s):
                await viewer.connection.writer.drain()
        except (TimeoutError, ConnectionError):
            return False
        return True

    # --- the end ---

    def end(self, reason: str) -> None:
        if not self._ending.done():
            self._ending.set_result(reason)

    async def wait_ended(self) -> None:
        if self._lifetime is not None:
            await asyncio.shield(self._lifetime)

    async def _live(self) -> None:
        shell = self.shell
        assert shell is not None
        try:
            either: set[asyncio.Future[Any]] = {shell.exited, self._ending}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            reason = self._ending.result() if self._ending.done() else "exited"
            # What the shell started hears the hang-up as from a closed terminal; nohup'd work stays.
            spawn.signal_tagged(self._tag, signal.SIGHUP)
            if not shell.exited.done():
                try:
                    async with asyncio.timeout(HANGUP_TIMEOUT_S):
                        await asyncio.shield(shell.exited)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        shell.kill()
                    await shell.exited
            self._last_output()
        finally:
            if self._grace is not None:
                self._grace.cancel()
            self._pause_reading()
            if self._writable is not None and not self._writable.done():
                self._writable.set_result(None)
            if self._master >= 0:
                os.close(self._master)  # the kernel hangs up whatever still holds the pty
                self._master = -1
            self._terminals.forget(self)
        ending = {"reason": reason, "exit": exit_status(shell.returncode)}
        for viewer in list(self.viewers):
            viewer.end(ending)
        self.viewers.clear()

    def _last_output(self) -> None:
        """What the shell wrote just before it exited ("logout") and is still in the pty."""
        left = LAST_OUTPUT_BYTES
        while left > 0:
            try:
                data = os.read(self._master, READ_CHUNK)
            except OSError:
                return
            if not data:
                return
            left -= len(data)
            self._output(data)


class Terminals:
    """Every terminal of this sandbox, by id."""

    def __init__(self) -> None:
        self._by_id: dict[str, Terminal] = {}

    def forget(self, terminal: Terminal) -> None:
        self._by_id.pop(terminal.id, None)

    def get(self, terminal_id: object) -> Terminal:
        terminal = self._by_id.get(terminal_id) if isinstance(terminal_id, str) else None
        if terminal is None or terminal.shell is None:
            raise OpError("not_found", "no such terminal in this sandbox (it ended, or never was)")
        return terminal

    async def open(self, connection: Connection, request: dict[str, Any]) -> None:
        options = _options(request)
        cols, rows = _size(request)
        if len(self._by_id) >= options["max_terminals"]:
            raise OpError(
                "too_many", f"at most {options['max_terminals']} terminals per sandbox; close one first"
            )
        terminal = Terminal(self, options, cols, rows)
        # Counted from now: two opens at once cannot both take the last place.
        self._by_id[terminal.id] = terminal
        try:
            await terminal.start()
        except OSError as err:
            self.forget(terminal)
            raise OpError("spawn_failed", f"could not start the shell: {err.strerror}") from None
        except BaseException:
            self.forget(terminal)
            raise
        await _watch(connection, terminal, redraw=False)

    async def attach(self, connection: Connection, request: dict[str, Any]) -> None:
        terminal = self.get(request.get("id"))
        if "cols" in request or "rows" in request:
            terminal.resize(*_size(request))
        await _watch(connection, terminal, redraw=True)

    async def list(self, connection: Connection, request: dict[str, Any]) -> None:
        terminals = sorted(self._by_id.values(), key=lambda t: t.created)
        await connection.send_json({"ok": True, "terminals": [t.describe() for t in terminals]})

    async def close(self, connection: Connection, request: dict[str, Any]) -> None:
        terminal = self.get(request.get("id"))
        terminal.end("closed")
        await terminal.wait_ended()
        await connection.send_json({"ok": True})

    async def end_all(self) -> None:
        """The agent stops (so does the sandbox): every terminal hangs up, and its viewers hear why."""
        terminals = list(self._by_id.values())
        for terminal in terminals:
            terminal.end("stopping")
        await asyncio.gather(*(t.wait_ended() for t in terminals), return_exceptions=True)


async def _watch(connection: Connection, terminal: Terminal, *, redraw: bool) -> None:
    """This connection as one of the terminal's viewers, until it goes or the terminal ends."""
    viewer = Viewer(connection)
    answer = {"ok": True, "id": terminal.id, "cols": terminal.cols, "rows": terminal.rows}
    # The answer states the replay's size, and both go out before any live byte: one synchronous step.
    connection.writer.write(protocol.json_frame({**answer, "replayed": terminal.replay_size}))
    terminal.attach(viewer)
    connection.writer.transport.set_write_buffer_limits(high=terminal.viewer_buffer)
    if redraw:
        terminal.redraw()
    keys = asyncio.ensure_future(_from_gateway(connection, terminal))
    try:
        await asyncio.wait({keys, viewer.ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        keys.cancel()
        await asyncio.gather(keys, return_exceptions=True)
        terminal.detach(viewer)
    if viewer.ended.done():
        with contextlib.suppress(ConnectionError):
            await connection.writer.drain()


async def _from_gateway(connection: Connection, terminal: Terminal) -> None:
    while (message := await connection.read_frame()) is not None:
        kind, payload = message
        if kind == protocol.STDIN:
            await terminal.write_input(payload)
        elif kind == protocol.JSON:
            control = protocol.parse_json(payload)
            if control.get("type") == "resize":
                terminal.resize(*_size(control))


def _size(message: dict[str, Any]) -> tuple[int, int]:
    cols, rows = message.get("cols", 80), message.get("rows", 24)
    for value in (cols, rows):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
            raise OpError("bad_request", f"cols and rows must be integers from 1 to {MAX_SIZE}")
    return cols, rows


def _options(request: dict[str, Any]) -> dict[str, Any]:
    bounds: dict[str, tuple[float, float]] = {
        "grace_s": (0, MAX_GRACE_S),
        "ring_bytes": RING_BYTES,
        "max_terminals": (1, MAX_TERMINALS),
        "viewer_buffer_bytes": VIEWER_BUFFER_BYTES,
        "viewer_stall_s": (0.1, MAX_STALL_S),
    }
    options = {}
    for name, (low, high) in bounds.items():
        value = request.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
            raise OpError("bad_request", f"{name} must be a number from {low} to {high}")
        options[name] = value
    return options
