"""HTTP/1.1 request heads as the front door reads them: a strict subset, checked as aiohttp would
check it, so that whatever the door does not take reaches aiohttp's parser (and its refusals) whole."""

from __future__ import annotations

from dataclasses import dataclass

import httptools

# Longer heads go to aiohttp, which has the limits and the 431 for them.
HEAD_LIMIT = 16 * 1024
# Control bytes other than CR, LF and tab: legal to no strict parser, and aiohttp's to refuse.
CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
# What a request the door may answer starts with; the rest goes to aiohttp unread.
FAST_STARTS = (b"GET ", b"HEAD ")
FAST_START_MAX = max(len(start) for start in FAST_STARTS)


def may_be_fast(buffer: bytearray) -> bool:
    if len(buffer) >= FAST_START_MAX:
        return buffer.startswith(FAST_STARTS)
    return any(buffer[: len(start)] == start[: len(buffer)] for start in FAST_STARTS)


@dataclass(slots=True)
class Head:
    method: str
    target: str  # the raw path and query, as sent
    headers: list[tuple[str, str]]
    keep_alive: bool
    upgrade: bool
    size: int
    single: dict[str, str]  # SINGLE_HEADERS by lower-case name; parse_head saw each once at most

    def header(self, name: str) -> str | None:
        return self.single.get(name)


# Headers the front door reads: more than one of any, and aiohttp decides which counts.
SINGLE_HEADERS = frozenset({"host", "authorization", "cookie", "upgrade", "origin", "x-request-id"})
# A body announced, even an empty one, or one that waits for a go-ahead.
BODY_HEADERS = frozenset({"expect", "transfer-encoding", "content-length"})


class HeadParser:
    """httptools' request parser with the callbacks parse_head needs. One per connection: llhttp
    reads one message after another, and a parser costs more to make than a head does to parse."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.start()

    def start(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.single: dict[str, str] = {}
        self.refused = False  # a body header, or a SINGLE_HEADERS one twice
        self.complete = False
        self.keep_alive = False
        self.version = ""
        self.method = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them, so that both paths forward the same bytes.
        text = name.decode("utf-8", "surrogateescape")
        decoded = value.decode("utf-8", "surrogateescape")
        self.headers.append((text, decoded))
        lowered = text.lower()
        if lowered in SINGLE_HEADERS:
            if lowered in self.single:
                self.refused = True
            self.single[lowered] = decoded
        elif lowered in BODY_HEADERS:
            self.refused = True

    def on_headers_complete(self) -> None:
        # Asked now: once the message is complete, llhttp has reset its flags.
        self.keep_alive = self.parser.should_keep_alive()
        self.version = self.parser.get_http_version()
        self.method = self.parser.get_method()

    def on_message_complete(self) -> None:
        self.complete = True


def _plain(head: bytes) -> bool:
    """No control bytes, no bare CR or LF, no obs-fold. (Counting, and deleting the control bytes
    to see whether any were there, beat regular expressions by four times, on every request.)"""
    crlf = head.count(b"\r\n")
    return (
        head.count(b"\r") == crlf
        and head.count(b"\n") == crlf
        and b"\n " not in head
        and b"\n\t" not in head
        and len(head.translate(None, CONTROL_BYTES)) == len(head)
    )


def parse_head(head: bytes, parser: HeadParser | None = None) -> Head | None:
    """The request in `head` (up to and including its blank line) if the front door may answer it:
    HTTP/1.1, GET or HEAD, no body, plain bytes, the headers it reads at most once each. `parser`:
    the connection's, which has read the requests before this one; after None it is spent."""
    if not _plain(head):
        return None
    if parser is None:
        parser = HeadParser()
    else:
        parser.start()
    upgrade = False
    try:
        parser.parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        upgrade = True
    except httptools.HttpParserError:
        return None
    # A body (Content-Length, Transfer-Encoding) leaves the message incomplete at the end of the head.
    if not parser.complete or parser.refused or parser.version != "1.1":
        return None
    method = parser.method
    if method != b"GET" and method != b"HEAD":
        return None
    single = parser.single
    if "host" not in single or not parser.url.isascii():
        return None
    wants_websocket = upgrade and single.get("upgrade", "").lower() == "websocket"
    if ("upgrade" in single or upgrade) and not wants_websocket:
        # An upgrade to anything but WebSocket, or an Upgrade header the parser did not take as one.
        return None
    return Head(
        method=method.decode("ascii"),
        target=parser.url.decode("ascii"),
        headers=parser.headers,
        keep_alive=parser.keep_alive,
        upgrade=upgrade,
        size=len(head),
        single=single,
    )


class HeadWatch:
    """Whether a request head is arriving on a connection aiohttp reads: a parser of our own (llhttp,
    as aiohttp's) fed the same bytes, for where each message begins and where its head ends, which
    aiohttp says nothing about. Bodies are skipped, not buffered. After an upgrade or bytes it cannot
    parse it stops (`done`): what follows is a WebSocket's, or aiohttp's 400 and the connection's end."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self.in_head = False
        self.done = False

    def on_message_begin(self) -> None:
        self.in_head = True

    def on_headers_complete(self) -> None:
        self.in_head = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError):
            self.in_head = False
            self.done = True
