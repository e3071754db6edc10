"""Coalescing a watch's changes (files_watch.py): what one batch tells a client.

Within a batch each path appears once, with what a client needs to know at the end of it (a file
made and deleted again is gone without a trace, one made and then written is just made); past
`max_batch` paths the batch turns into "changed" for the folders they are in, then for the watched
folder itself: "re-list". Writes through the API rename a temporary file over the target
(files_worker.py); that shows as "modified" of the target, and the temporary file never shows.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from .files_worker import TEMP_PREFIX, TEMP_SUFFIX

MAX_BATCH = 256


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
        if self.root in self.folders:
            return  # re-listing everything covers whatever comes
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
