"""The agent's coalescing of a watch's changes (sandbox-image/agent/sandbox_agent/changes.py), as
a pure unit: what a batch says after a sequence of raw inotify reports."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sandbox-image" / "agent"))

from sandbox_agent.changes import Coalescer

ROOT = "/workspace"


def batch(*raw: dict[str, Any], max_batch: int = 256) -> list[dict[str, Any]]:
    coalescer = Coalescer(ROOT, max_batch)
    for report in raw:
        coalescer.add(report)
    return coalescer.take()


def made(path: str, kind: str = "file") -> dict[str, Any]:
    return {"e": "created", "p": f"{ROOT}/{path}", "k": kind}


def changed(path: str) -> dict[str, Any]:
    return {"e": "modified", "p": f"{ROOT}/{path}", "k": "file"}


def gone(path: str) -> dict[str, Any]:
    return {"e": "deleted", "p": f"{ROOT}/{path}", "k": "file"}


def moved(source: str, target: str) -> dict[str, Any]:
    return {"e": "moved", "f": f"{ROOT}/{source}", "p": f"{ROOT}/{target}", "k": "file"}


def test_each_path_once_with_its_end_state() -> None:
    assert batch(made("a"), changed("a"), changed("a")) == [
        {"event": "created", "path": f"{ROOT}/a", "kind": "file"}
    ]
    assert batch(made("a"), gone("a")) == []
    assert batch(changed("a"), gone("a")) == [{"event": "deleted", "path": f"{ROOT}/a", "kind": "file"}]


def test_a_move_of_something_new_is_a_creation_and_of_something_old_a_move() -> None:
    assert batch(made("a"), moved("a", "b")) == [{"event": "created", "path": f"{ROOT}/b", "kind": "file"}]
    assert batch(moved("a", "b")) == [
        {"event": "moved", "path": f"{ROOT}/b", "kind": "file", "from": f"{ROOT}/a"}
    ]


def test_a_write_through_the_api_is_a_modification_and_its_temporary_file_never_shows() -> None:
    temp = ".sgw-0123456789abcdef.part"
    assert batch(made(temp), changed(temp), moved(temp, "doc.txt")) == [
        {"event": "modified", "path": f"{ROOT}/doc.txt", "kind": "file"}
    ]


def test_a_burst_collapses_into_the_folders_to_list_again() -> None:
    reports = [made(f"node_modules/p{n}", "folder") for n in range(300)] + [made("src/x.js")]
    assert batch(*reports) == [
        {"event": "changed", "path": f"{ROOT}/node_modules", "kind": "folder"},
        {"event": "changed", "path": f"{ROOT}/src", "kind": "folder"},
    ]
    many_folders = [made(f"d{n}/f") for n in range(300)]
    assert batch(*many_folders, max_batch=256) == [{"event": "changed", "path": ROOT, "kind": "folder"}]
