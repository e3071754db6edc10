"""The front door's answer writer: a dev server's answer, as the front door writes it to its client.
Small answers go out head and body in one write (the send() calls are most of the proxy's cost,
py-spy); larger ones and event streams as their body comes, never held whole."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from http import HTTPStatus
from typing import Protocol

from .http1 import Head
from .logs import HEADER as REQUEST_ID_HEADER
from .preview import timeout_answer
from .preview_headers import BODILESS_STATUSES, DROPPED_RESPONSE_HEADERS, header_lines, response_headers
from .upstream import Response, UpstreamError

log = logging.getLogger(__name__)

# The door sets these itself: the request id always, the length when it has the whole body.
DROPPED = DROPPED_RESPONSE_HEADERS | {"x-request-id"}
DROPPED_SIZED = DROPPED | {"content-length"}
STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}


class Client(Protocol):
    """The connection an answer goes to."""

    remote: str

    def write(self, data: bytes) -> None: ...

    async def drained(self) -> None: ...

    def close(self) -> None: ...


def response_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    line = STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n"
    # Upstream values were decoded as latin-1 (upstream.py): encoded back, they are the bytes it sent.
    return f"{line}{header_lines(headers)}\r\n".encode("latin-1", "replace")


def _answer_headers(
    request: Head, prefix: str, upstream: Response, request_id: str, dropped: frozenset[str]
) -> list[tuple[str, str]]:
    answer = response_headers(upstream.headers, prefix, dropped)
    answer.append((REQUEST_ID_HEADER, request_id))
    if not request.keep_alive:
        answer.append(("Connection", "close"))
    return answer


def answer_now(client: Client, request: Head, prefix: str, upstream: Response, request_id: str) -> int | None:
    """Writes the answer if its body is all in (a small one usually is), head and body in one write.
    None if the body is still to come."""
    whole = upstream.complete_body()
    if whole is None:
        return None
    status = upstream.status
    if request.method == "HEAD" or status in BODILESS_STATUSES:
        # Their Content-Length, if any, describes a body they do not carry: it stays as it is.
        client.write(response_head(status, _answer_headers(request, prefix, upstream, request_id, DROPPED)))
    else:
        answer = _answer_headers(request, prefix, upstream, request_id, DROPPED_SIZED)
        answer.append(("Content-Length", str(len(whole))))
        client.write(response_head(status, answer) + whole)
    return status


async def stream_answer(
    client: Client, request: Head, prefix: str, upstream: Response, request_id: str
) -> int:
    """Writes the answer as its body comes: a 50 MB download or an event stream never sits in memory."""
    answer = _answer_headers(request, prefix, upstream, request_id, DROPPED)
    sized = any(name.lower() == "content-length" for name, _ in answer)
    if not sized:
        answer.append(("Transfer-Encoding", "chunked"))
    client.write(response_head(upstream.status, answer))
    try:
        async for chunk in upstream.body():
            client.write(chunk if sized else b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await client.drained()
        if not sized:
            client.write(b"0\r\n\r\n")
    except UpstreamError as err:
        # The head is out: all that is left is to end the connection, as aiohttp's path does.
        log.info("preview body to %s cut short: %r", client.remote, err)
        client.close()
    finally:
        upstream.close()
    return upstream.status


def timed_out(request: Head, request_id: str) -> bytes:
    """The dev server took too long to start its answer: the same 504 aiohttp's transport gives."""
    accept = next((value for name, value in request.headers if name.lower() == "accept"), "")
    content_type, body = timeout_answer("text/html" in accept)
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        (REQUEST_ID_HEADER, request_id),
    ]
    if not request.keep_alive:
        headers.append(("Connection", "close"))
    return response_head(504, headers) + (b"" if request.method == "HEAD" else body)


def upgrade_refused(status: int, request_id: str) -> bytes:
    """The dev server refused a WebSocket (wrong path, bad token, no such subprotocol): its status goes on."""
    body = f"the dev server refused the WebSocket ({status})".encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        (REQUEST_ID_HEADER, request_id),
    ]
    return response_head(status, headers) + body
