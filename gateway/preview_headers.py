"""What a preview request and its answer look like on the other side of the proxy: pure functions of
header lists, shared by both transports (the front door and aiohttp), with fast unit tests.

`prefix` is where the preview lives on its origin: `/` on a sandbox's own origin, `/preview/<user>/`
on the path route. Redirects and cookies of the dev server are kept inside it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote

from multidict import CIMultiDict
from yarl import URL

UPSTREAM_HOST = "localhost:5173"
# The gateway's own cookies on preview origins: the owner's session and a share link's. Never forwarded.
SESSION_COOKIE = "sandbox_preview"
SHARE_COOKIE = "sandbox_share"
OUR_COOKIES = frozenset({SESSION_COOKIE, SHARE_COOKIE})
# RFC 9110 7.6.1: meaningful for one connection only. Proxy-Connection is not standard but common.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade"}
)  # fmt: skip
# A dev server must not widen a service worker's scope beyond its own preview.
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"service-worker-allowed"}
# Responses whose Content-Length describes no body of theirs.
BODILESS_STATUSES = frozenset({204, 304})
# Host is the dev server's own, the credentials are the gateway's, and the gateway has met the client's
# Expect: 100-continue already (the dev server's own 100 would come after it, as a second answer).
REPLACED_REQUEST_HEADERS = frozenset({"host", "authorization", "expect"})
# The gateway alone says where a request came from, in X-Forwarded-*: a client's own claims in these
# would reach the dev server as if the gateway had made them.
CLIENT_FORWARDING_HEADERS = frozenset({"forwarded", "x-real-ip"})
# What of a client's request never reaches the dev server as the client sent it, by lower-case name.
# The client's WebSocket handshake goes on only in an upgrade (upgrade_head), and X-Forwarded-For is
# extended, not taken as it is.
NOT_FORWARDED = HOP_BY_HOP | REPLACED_REQUEST_HEADERS | CLIENT_FORWARDING_HEADERS
NOT_FORWARDED_PREFIXES = ("sec-websocket-", "x-forwarded-")
DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.\.?(?:[/\\]|$)")
# The client's half of the handshake, which goes to the dev server (the other sec-websocket-* do not).
WEBSOCKET_HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions"}
)
WEBSOCKET_ANSWER_HEADERS = frozenset(
    {"sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions"}
)
DEV_SERVER_HOSTS = frozenset({"localhost", "127.0.0.1", "0.0.0.0"})  # noqa: S104 (names, not a bind)


def sound_path(raw_path: str, prefix: str) -> bool:
    """Whether a raw path lies inside `prefix` and holds no dot segment, plain or encoded, that a dev
    server decoding it could climb out of the prefix with (browsers send none)."""
    return raw_path.startswith(prefix) and not DOT_SEGMENT.search(unquote(raw_path))


def upstream_headers(
    items: Iterable[tuple[str, str]], remote: str, host: str, scheme: str, upstream_host: str = UPSTREAM_HOST
) -> list[tuple[str, str]]:
    """What of a client's request headers goes to the dev server, and what the gateway adds.
    `upstream_host`: the Host the dev server sees, its own (localhost:<port>)."""
    kept: list[tuple[str, str]] = []
    connection_listed: set[str] = set()
    forwarded_for = None
    for name, value in items:
        lowered = name.lower()
        if lowered in NOT_FORWARDED or lowered.startswith(NOT_FORWARDED_PREFIXES):
            if lowered == "connection":
                connection_listed.update(token.strip().lower() for token in value.split(","))
            elif lowered == "x-forwarded-for" and forwarded_for is None:
                forwarded_for = value
            continue
        if lowered == "cookie":
            value = strip_our_cookies(value)
            if not value:
                continue
        kept.append((name, value))
    if not connection_listed <= HOP_BY_HOP:
        # Connection names headers of this hop only, wherever they stand in the request.
        kept = [(name, value) for name, value in kept if name.lower() not in connection_listed]
    kept += (
        ("Host", upstream_host),
        ("X-Forwarded-For", f"{forwarded_for}, {remote}" if forwarded_for else remote),
        ("X-Forwarded-Host", host),
        ("X-Forwarded-Proto", scheme),
    )
    return kept


def upgrade_head(
    items: Iterable[tuple[str, str]],
    target: str,
    remote: str,
    host: str,
    scheme: str,
    upstream_host: str = UPSTREAM_HOST,
) -> bytes:
    """The upgrade request for the dev server: the request headers as for HTTP, and the client's
    WebSocket handshake headers, which are the dev server's to answer."""
    items = list(items)
    headers = upstream_headers(items, remote, host, scheme, upstream_host)
    headers += (("Upgrade", "websocket"), ("Connection", "Upgrade"))
    handshake: dict[str, tuple[str, str]] = {}
    for name, value in items:
        if name.lower() in WEBSOCKET_HANDSHAKE_HEADERS:
            handshake.setdefault(name.lower(), (name, value))
    headers += handshake.values()
    # The client's headers were parsed already (by aiohttp or httptools): no CR or LF reaches this.
    return request_head("GET", target, headers)


def header_lines(headers: Iterable[tuple[str, str]]) -> str:
    """The header fields of a head, each with its CRLF; the blank line is the caller's."""
    return "".join([f"{name}: {value}\r\n" for name, value in headers])


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    return f"{method} {target} HTTP/1.1\r\n{header_lines(headers)}\r\n".encode("utf-8", "surrogateescape")


def response_headers(
    items: Iterable[tuple[str, str]], prefix: str, dropped: frozenset[str] = DROPPED_RESPONSE_HEADERS
) -> list[tuple[str, str]]:
    """What of the dev server's response headers goes to the client, with redirects and cookies kept
    inside the preview. `dropped`: by lower-case name, the headers the caller sets itself."""
    headers: list[tuple[str, str]] = []
    for name, value in items:
        lowered = name.lower()
        if lowered in dropped:
            continue
        if lowered == "location":
            value = rewrite_location(value, prefix)
        elif lowered == "set-cookie":
            value = rewrite_set_cookie(value, prefix)
            if not value:
                continue
        headers.append((name, value))
    return headers


def rewrite_location(location: str, prefix: str) -> str:
    """A redirect stays inside the preview: the dev server's own origin, or a path outside the prefix,
    becomes a path under it. Redirects to other sites are left alone."""
    url = URL(location)
    if url.is_absolute():
        if url.host not in DEV_SERVER_HOSTS or url.port != 5173:
            return location
        location = url.raw_path_qs + (f"#{url.raw_fragment}" if url.raw_fragment else "")
    if location.startswith("/") and not location.startswith(prefix):
        return prefix + location.lstrip("/")
    return location


def rewrite_set_cookie(value: str, prefix: str) -> str:
    """Keeps a dev server's cookie inside its preview: its Path under the prefix, no Domain (a cookie
    for the whole preview domain would reach every other sandbox's origin), never one of ours."""
    cookie = SimpleCookie()
    try:
        cookie.load(value)
    except CookieError:
        # A cookie we cannot parse is dropped, never passed on unchecked.
        return ""
    for name in list(cookie):
        if name in OUR_COOKIES:
            del cookie[name]
    for morsel in cookie.values():
        path = morsel["path"] or "/"
        if not path.startswith(prefix):
            morsel["path"] = prefix + path.lstrip("/")
        morsel["domain"] = ""
    return cookie.output(header="").strip()


def cookie_values(cookie_header: str, name: str) -> list[str]:
    """Every value of the named cookie in a Cookie header, in the order sent. All of them: another
    origin of the same site can set a cookie of that name for the whole domain (cookie tossing), and
    it must not hide the real one."""
    values = []
    for part in cookie_header.split(";"):
        key, sign, value = part.strip().partition("=")
        if sign and key == name:
            values.append(value.strip('" '))
    return values


def strip_our_cookies(cookie_header: str) -> str:
    """The Cookie header without ours, for the dev server, which must never see the credentials."""
    kept = [part for part in cookie_header.split(";") if part.strip().partition("=")[0] not in OUR_COOKIES]
    return ";".join(kept).strip()


def parse_answer_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    """Status and headers of the dev server's answer to an upgrade; ValueError if it is not one."""
    status_line, *field_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = [
        (name.strip(), value.strip())
        for name, sep, value in (line.partition(":") for line in field_lines)
        if sep
    ]
    return status, headers


def upgrade_response_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    kept: CIMultiDict[str] = CIMultiDict({"Upgrade": "websocket", "Connection": "Upgrade"})
    for name, value in headers:
        if name.lower() in WEBSOCKET_ANSWER_HEADERS:
            kept.add(name, value)
    return kept
