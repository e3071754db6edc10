"""The agent's wire protocol, shared word for word with the gateway's client (gateway/agent.py).

A connection carries one operation. It is a sequence of frames, each a kind byte, a 4-byte big-endian
length and that many bytes of payload:

  J  a JSON object: the request (the first frame, with the secret), answers, events, the end
  0  bytes for a process's stdin or a terminal's keyboard; an empty one closes stdin
  1  bytes a process wrote to stdout, or a terminal's screen
  2  bytes a process wrote to stderr

The first frame is {"v": 1, "secret": ..., "op": ..., ...}; the agent answers {"ok": true, ...} or
{"ok": false, "error": {"code": ..., "message": ...}} and closes. After the answer, each operation
defines what follows; "connect" turns the connection into raw bytes both ways.
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only for the types: the files worker (files_worker.py) speaks these frames over a blocking
    # socket, and importing asyncio would be two fifths of its start.
    import asyncio

VERSION = 1
JSON, STDIN, STDOUT, STDERR = b"J", b"0", b"1", b"2"
KINDS = frozenset((JSON, STDIN, STDOUT, STDERR))
HEADER = struct.Struct(">cI")
# No frame from the gateway is bigger: a run's stdin comes in pieces of at most this.
MAX_FRAME = 1024 * 1024


class ProtocolError(Exception):
    """The peer broke the protocol: the connection ends."""


class OpError(Exception):
    """An operation refused, with the code and message the gateway shows its client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next frame, or None at a clean end of the stream between frames."""
    from asyncio import IncompleteReadError

    try:
        header = await reader.readexactly(HEADER.size)
    except IncompleteReadError as err:
        if err.partial:
            raise ProtocolError("the stream ended inside a frame header") from None
        return None
    kind, length = HEADER.unpack(header)
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind!r}")
    if length > MAX_FRAME:
        raise ProtocolError(f"a frame of {length} bytes is over the limit of {MAX_FRAME}")
    try:
        return kind, await reader.readexactly(length)
    except IncompleteReadError:
        raise ProtocolError("the stream ended inside a frame") from None


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def json_frame(message: dict[str, Any]) -> bytes:
    return frame(JSON, json.dumps(message, separators=(",", ":")).encode())


def parse_json(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except ValueError:
        raise ProtocolError("a J frame that is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("a J frame that is not a JSON object")
    return message


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}
