"""files.watch: what changes under a folder, recursively, in coalesced batches.

  gateway: J {"op": "files.watch", "path", "max_watches", "max_folders"}
  agent:   J {"ok": true, "path", "folders"}, then J {"changes": [...]} batches, until the gateway closes

A files worker of its own (files_worker.py, as the user) holds the inotify watches and reports every
event; the agent coalesces them. A batch goes out GATHER_S after the first change of a quiet spell,
and then at most once per INTERVAL_S, so a burst (an `npm install`) makes a few batches a second, not
thousands of messages. Within a batch each path appears once, with what a client needs to know at the
end of it (a file made and deleted again is gone without a trace); past MAX_BATCH paths the batch
turns into "changed" for the folders they are in, then for the watched folder itself: "re-list".
Writes through the API rename a temporary file over the target (files.py); that shows as "modified"
of the target, and the temporary file itself never shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from . import files, protocol
from .files_worker import TEMP_PREFIX, TEMP_SUFFIX
from .protocol import OpError
from .server import Connection

GATHER_S = 0.01
INTERVAL_S = 0.1
MAX_BATCH = 256
MAX_WATCHES, MAX_FOLDERS = 64, 65_536

log = logging.getLogger("sandbox_agent")


def _is_temp(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


class Coalescer:
    def __init__(self, root: str, max_batch: int = MAX_BATCH) -> None:
        self.root, self.max_batch = root, max_batch
        self.pending: dict[str, dict[str, Any]] = {}
        self.folders: set[str] | None = None  # once collapsed: the folders that changed
        self.ready = asyncio.Event()

    def add(self, raw: dict[str, Any]) -> None:
        event, path, kind = str(raw.get("e")), str(raw.get("p")), str(raw.get("k"))
        source = raw.get("f")
        if event == "moved" and isinstance(source, str) and _is_temp(source):
            event, source = "modified", None  # a write through the API landing
        if _is_temp(path):
            return
        self.ready.set()
        if event == "changed" and self.folders is None:
            self._collapse()
        if self.folders is not None:
            self._collapse_into(path if event == "changed" else os.path.dirname(path))
            if isinstance(source, str):
                self._collapse_into(os.path.dirname(source))
            return
        self._merge(event, path, kind, source if isinstance(source, str) else None)
        if len(self.pending) > self.max_batch:
            self._collapse()

    def _collapse(self) -> None:
        """From here on this batch names folders to re-list, not paths."""
        pending, self.pending, self.folders = self.pending, {}, set()
        for change in pending.values():
            self._collapse_into(os.path.dirname(change["path"]))

    def _merge(self, event: str, path: str, kind: str, source: str | None) -> None:
        before = self.pending.pop(path, None)
        if event == "moved" and source is not None:
            was = self.pending.pop(source, None)
            if was is not None and was["event"] == "created":
                event, source = "created", None  # made and moved within the batch: it is just new
        elif before is not None:
            if before["event"] == "created" and event == "deleted":
                return  # made and gone again: nothing to tell
            if before["event"] == "created" and event == "modified":
                event = "created"
        change: dict[str, Any] = {"event": event, "path": path, "kind": kind}
        if source is not None:
            change["from"] = source
        self.pending[path] = change

    def _collapse_into(self, folder: str) -> None:
        assert self.folders is not None
        if folder != self.root and not folder.startswith(self.root.rstrip("/") + "/"):
            folder = self.root
        self.folders.add(folder)
        if len(self.folders) > self.max_batch:
            self.folders = {self.root}

    def take(self) -> list[dict[str, Any]]:
        self.ready.clear()
        if self.folders is not None:
            batch = [{"event": "changed", "path": f, "kind": "folder"} for f in sorted(self.folders)]
        else:
            batch = list(self.pending.values())
        self.pending, self.folders = {}, None
        return batch


class Watches:
    def __init__(self) -> None:
        self.running = 0

    async def watch(self, connection: Connection, request: dict[str, Any]) -> None:
        limit = _bounded(request, "max_watches", MAX_WATCHES)
        max_folders = _bounded(request, "max_folders", MAX_FOLDERS)
        if self.running >= limit:
            raise OpError("too_many", f"at most {limit} watches at once in a sandbox")
        self.running += 1
        try:
            path = request.get("path")
            worker_request = {"op": "watch", "path": path, "max_folders": max_folders}
            async with files.dedicated_worker(worker_request) as (reader, answer):
                await connection.send_json({"ok": True, "path": path, "folders": answer.get("folders")})
                await _serve(connection, reader, Coalescer(str(path)))
        finally:
            self.running -= 1


def _bounded(request: dict[str, Any], name: str, ceiling: int) -> int:
    value = request.get(name, ceiling)
    if not isinstance(value, int) or not 1 <= value <= ceiling:
        raise OpError("bad_request", f"{name} must be an integer from 1 to {ceiling}")
    return value


async def _pump(reader: asyncio.StreamReader, coalescer: Coalescer) -> None:
    while (message := await protocol.read_frame(reader)) is not None:
        kind, payload = message
        if kind == protocol.JSON:
            coalescer.add(json.loads(payload))


async def _serve(connection: Connection, reader: asyncio.StreamReader, coalescer: Coalescer) -> None:
    loop = asyncio.get_running_loop()
    # The gateway sends nothing after its request: a read that ends is the gateway closing.
    gateway = asyncio.ensure_future(connection.read_frame())
    pump = asyncio.ensure_future(_pump(reader, coalescer))
    last_batch = float("-inf")
    try:
        while not gateway.done():
            changed = asyncio.ensure_future(coalescer.ready.wait())
            await asyncio.wait({gateway, pump, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if gateway.done():
                return
            if coalescer.ready.is_set():
                # The coalescing window itself: changes that come meanwhile join this batch.
                await asyncio.sleep(max(GATHER_S, last_batch + INTERVAL_S - loop.time()))
                if batch := coalescer.take():
                    await connection.send_json({"changes": batch})
                    last_batch = loop.time()
            elif pump.done():
                await connection.send_json({"end": True, "reason": "the files worker ended"})
                return
    finally:
        gateway.cancel()
        pump.cancel()
        if pump.done() and not pump.cancelled() and (err := pump.exception()) is not None:
            log.debug("watch: the worker's stream broke: %r", err)
