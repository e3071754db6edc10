"""files.watch: what changes under a folder, recursively, in coalesced batches.

  gateway: J {"op": "files.watch", "path", "max_watches", "max_folders"}
  agent:   J {"ok": true, "path", "folders"}, then J {"changes": [...]} batches, until the gateway closes

A files worker of its own (files_worker.py, as the user) holds the inotify watches and reports every
event; the agent coalesces them. A batch goes out GATHER_S after the first change of a quiet spell,
and then at most once per INTERVAL_S, so a burst (an `npm install`) makes a few batches a second, not
thousands of messages; what one batch says is changes.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from . import files, protocol
from .changes import Coalescer
from .protocol import OpError
from .server import Connection

GATHER_S = 0.01
INTERVAL_S = 0.1
MAX_WATCHES, MAX_FOLDERS = 64, 65_536

log = logging.getLogger("sandbox_agent")


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
