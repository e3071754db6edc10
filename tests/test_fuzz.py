"""The whole HTTP API fuzzed from its OpenAPI document (schemathesis) against the real gateway, with real
PostgreSQL and Docker: no 5xx, every status, header and body as the document says, every error in the
envelope, invalid input refused, and no operation that answers without a valid token.

Schemathesis sends with `requests`, which blocks, and the gateway runs on the test's event loop: the
fuzzing runs in a thread while the loop serves. The terminal's WebSocket is fuzzed as plain HTTP (its
refusals are documented); previews are not in the document and have targeted tests in
test_hostile.py and test_preview.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
import zlib
from collections import Counter
from datetime import timedelta
from pathlib import Path

import hypothesis
import jsonschema_rs
import jwt
import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestClient
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi import checks as openapi_checks

from gateway import schemas
from gateway.settings import ExecSettings, RateLimit

from .helpers import JWT_SECRET, MakeClient, auth, poll

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

OPENAPI = Path(__file__).resolve().parent.parent / "gateway" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(OPENAPI)
ERROR_SCHEMA = json.loads(OPENAPI.read_text())["components"]["schemas"]["Error"]
ERROR_VALIDATOR = jsonschema_rs.validator_for(ERROR_SCHEMA)

CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.ignored_auth,
]
# Runs execute generated code in a real sandbox: short timeouts keep a generated `yes` cheap.
FUZZ_EXEC = ExecSettings(default_timeout_ms=1000, max_timeout_ms=2000)
METRICS_TOKEN = secrets.token_urlsafe(24)
REQUEST_TIMEOUT_S = 30
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _error_envelope(status: int, content_type: str | None, content: bytes) -> None:
    """Every 4xx and 5xx answer, documented or not, is {"error": {"code", "message"}} as JSON."""
    if status < 400:
        return
    assert (content_type or "").startswith("application/json"), (status, content_type, content[:300])
    body = json.loads(content)
    assert ERROR_VALIDATOR.is_valid(body), (status, body)
    assert body["error"]["code"], body
    assert body["error"]["message"], body


def fuzz_settings(max_examples: int) -> hypothesis.settings:
    """What every fuzz here runs under: bounded, no example database between runs, each request within
    the timeout, and the blob printed so that a failure can be replayed."""
    return hypothesis.settings(
        max_examples=max_examples,
        deadline=timedelta(seconds=REQUEST_TIMEOUT_S),
        database=None,
        print_blob=True,
        suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.filter_too_much],
        phases=[hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )


def _fuzz_operation(
    operation_id: str, base_url: str, token: str, mode: GenerationMode, max_examples: int
) -> Counter[int]:
    """Up to `max_examples` generated requests to one operation, each checked; the statuses seen."""
    operation = SCHEMA.find_operation_by_id(operation_id)
    statuses: Counter[int] = Counter()
    # The token is fixed, so that negative cases break the body, query and path rather than the
    # credentials (bad credentials have a test of their own, below).
    headers = {"Authorization": f"Bearer {token}"}

    @fuzz_settings(max_examples)
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode, headers=headers))
    def run(case: schemathesis.Case) -> None:
        sent = {"base_url": base_url, "session": session, "headers": headers}
        response = case.call(**sent, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(response, checks=CHECKS, headers=headers, transport_kwargs=sent)
        content_type = response.headers.get("content-type", [None])[0]
        _error_envelope(response.status_code, content_type, response.content)
        statuses[response.status_code] += 1

    with requests.Session() as session:
        run()
    return statuses


@pytest.fixture
async def gateway(make_client: MakeClient) -> TestClient:
    # Rate limits off: the fuzz sends more starts in a minute than a user may, and 429 is not the point.
    return await make_client(
        exec=FUZZ_EXEC,
        metrics_token=METRICS_TOKEN,
        start_rate=RateLimit(per_minute=0),
        exec_rate=RateLimit(per_minute=0),
    )


def _base_url(client: TestClient) -> str:
    return str(client.make_url("")).rstrip("/")


def _token(user: str, *, admin: bool = False) -> str:
    return auth(user, admin=admin)["Authorization"].removeprefix("Bearer ")


# (operationId, positive examples, negative examples, whose token, whether the user's sandbox runs).
# Operations without parameters or a body have nothing to make invalid: no negative examples.
OPERATIONS = [
    ("startSandbox", 25, 80, "user", False),
    ("getSandbox", 5, 0, "user", False),
    ("stopSandbox", 25, 80, "user", True),
    ("execSnippet", 40, 120, "user", True),
    ("health", 3, 0, "user", False),
    ("openapi", 3, 0, "user", False),
    ("openTerminal", 30, 80, "user", True),
    ("previewSession", 5, 0, "user", False),
    # The user's sandbox is not running, so a valid body ends in 409, never in `npm create` from the
    # registry (minutes); the templates themselves have their own tests.
    ("createProject", 40, 120, "user", False),
    ("adminListSandboxes", 40, 100, "admin", True),
    ("adminGetSandbox", 30, 80, "admin", True),
    ("adminStopSandbox", 30, 80, "admin", True),
    ("metrics", 3, 0, "metrics", False),
    # The files API on a running sandbox: generated paths land anywhere in it, as its user.
    ("listFiles", 25, 60, "user", True),
    ("statFile", 20, 40, "user", True),
    ("readFile", 25, 60, "user", True),
    ("writeFile", 25, 60, "user", True),
    ("deleteFile", 20, 40, "user", True),
    ("makeFolder", 20, 60, "user", True),
    ("moveFile", 20, 60, "user", True),
    ("uploadFiles", 15, 40, "user", True),
    ("downloadFolder", 10, 30, "user", True),
    ("createDownloadLink", 20, 60, "user", True),
    # Not "download": its ticket is its authentication, so every generated request is a 401;
    # test_files.py tries forged, tampered, expired and spent ones.
]


@pytest.mark.parametrize(("operation_id", "positive", "negative", "whose", "sandbox"), OPERATIONS)
async def test_fuzz_operation(
    gateway: TestClient, operation_id: str, positive: int, negative: int, whose: str, sandbox: bool
) -> None:
    user = f"fuzz-{secrets.token_hex(4)}"
    if sandbox:
        assert (await gateway.post("/api/sandbox", headers=auth(user))).status == 201
    token = {"user": _token(user), "admin": _token(user, admin=True), "metrics": METRICS_TOKEN}[whose]
    base_url = _base_url(gateway)
    accepted = await asyncio.to_thread(
        _fuzz_operation, operation_id, base_url, token, GenerationMode.POSITIVE, positive
    )
    # The generated requests carried a valid token and reached the handlers, not the auth wall.
    assert accepted, accepted
    assert not {401, 403} & set(accepted), accepted
    if negative:
        rejected = await asyncio.to_thread(
            _fuzz_operation, operation_id, base_url, token, GenerationMode.NEGATIVE, negative
        )
        assert rejected, rejected


def _bad_tokens() -> dict[str, str | None]:
    now = 1_700_000_000
    claims = {"sub": "mallory", "iat": now, "exp": 4_000_000_000, "role": "admin"}
    signed = {
        "forged": jwt.encode(claims, secrets.token_urlsafe(48), algorithm="HS256"),
        "alg none": jwt.encode(claims, None, algorithm="none"),
        "HS512 with the right secret": jwt.encode(claims, JWT_SECRET, algorithm="HS512"),
        "expired": jwt.encode({**claims, "exp": now}, JWT_SECRET, algorithm="HS256"),
        "no exp": jwt.encode({"sub": "mallory"}, JWT_SECRET, algorithm="HS256"),
        "no sub": jwt.encode({"exp": 4_000_000_000}, JWT_SECRET, algorithm="HS256"),
        "sub a path": jwt.encode({**claims, "sub": "../bob"}, JWT_SECRET, algorithm="HS256"),
        "sub a number": jwt.encode({**claims, "sub": 7}, JWT_SECRET, algorithm="HS256"),
    }
    return {
        "missing": None,
        "empty": "",
        "basic": "Basic bWFsbG9yeTpwYXNz",
        "bearer alone": "Bearer",
        "garbage": "Bearer not.a.jwt",
        "the metrics token": f"Bearer {METRICS_TOKEN}",
        **{name: f"Bearer {token}" for name, token in signed.items()},
    }


def _requires_a_user_token(operation: schemathesis.APIOperation) -> bool:
    security = operation.definition.raw.get("security", SCHEMA.raw_schema["security"])
    return any("bearer" in requirement for requirement in security)


USER_OPERATIONS = [
    operation.ok() for operation in SCHEMA.get_all_operations() if _requires_a_user_token(operation.ok())
]


def _fuzz_without_a_valid_token(base_url: str, max_examples: int) -> Counter[str]:
    """Generated requests to every operation that needs a user's token, each with a missing or bad
    token instead: every one is 401."""
    bad_tokens = _bad_tokens()
    operations: Counter[str] = Counter()

    @fuzz_settings(max_examples)
    @hypothesis.given(
        case=st.one_of([operation.as_strategy() for operation in USER_OPERATIONS]),
        which=st.sampled_from(sorted(bad_tokens)),
    )
    def run(case: schemathesis.Case, which: str) -> None:
        kwargs = case.as_transport_kwargs(base_url=base_url)
        headers = {k: v for k, v in kwargs.pop("headers").items() if k.lower() != "authorization"}
        if bad_tokens[which] is not None:
            headers["Authorization"] = bad_tokens[which]
        response = session.request(**kwargs, headers=headers, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 401, (which, case.operation.label, response.status_code, response.text)
        _error_envelope(response.status_code, response.headers.get("Content-Type"), response.content)
        operations[case.operation.label] += 1

    with requests.Session() as session:
        run()
    return operations


async def test_fuzz_without_a_valid_token_is_always_401(gateway: TestClient) -> None:
    # Other users' sandboxes run: a bad token reaches none of them, nor the admin routes.
    for user in ("alice", "mallory"):
        assert (await gateway.post("/api/sandbox", headers=auth(user))).status == 201
    operations = await asyncio.to_thread(_fuzz_without_a_valid_token, _base_url(gateway), 300)
    assert len(operations) >= len(USER_OPERATIONS) // 2, operations


BODY_OPERATIONS = {"/api/sandbox": "post", "/api/sandbox/exec": "post", "/api/sandbox/projects": "post"}
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=latin-1",
    'application/json; charset="',
    "APPLICATION/JSON",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "*/*",
    "",
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


def _fuzz_raw_bodies(base_url: str, token: str, max_examples: int) -> Counter[int]:
    """Bodies that are not what their headers say: random bytes or JSON of any shape, any content
    type, content codings real or only claimed. A documented 4xx in the envelope, never a 5xx."""
    statuses: Counter[int] = Counter()

    @fuzz_settings(max_examples)
    @hypothesis.given(
        path=st.sampled_from(sorted(BODY_OPERATIONS)),
        body=st.binary(max_size=300) | JSON_VALUES.map(lambda value: json.dumps(value).encode()),
        content_type=st.sampled_from(CONTENT_TYPES),
        coding=st.sampled_from([None, "identity", "gzip", "GZIP", "deflate", "br", "zstd", "gzip, identity"]),
        compress=st.booleans(),
    )
    def run(path: str, body: bytes, content_type: str | None, coding: str | None, compress: bool) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if coding is not None:
            headers["Content-Encoding"] = coding
            if compress and coding.lower() == "gzip":
                body = gzip.compress(body)
            elif compress and coding == "deflate":
                body = zlib.compress(body)
        # A connection each: after a body it could not decode, aiohttp closes the connection.
        headers["Connection"] = "close"
        response = requests.post(base_url + path, data=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
        documented = SCHEMA.raw_schema["paths"][path][BODY_OPERATIONS[path]]["responses"]
        assert str(response.status_code) in documented, (path, response.status_code, response.text)
        _error_envelope(response.status_code, response.headers.get("Content-Type"), response.content)
        statuses[response.status_code] += 1

    run()
    return statuses


async def test_fuzz_raw_bodies(gateway: TestClient) -> None:
    statuses = await asyncio.to_thread(_fuzz_raw_bodies, _base_url(gateway), _token("alice"), 300)
    assert statuses[400], statuses
    assert statuses[415], statuses


async def test_compressed_bodies_are_refused_before_they_are_read(gateway: TestClient) -> None:
    """A deflate body that breaks only at its end: aiohttp's decoding answered it itself, in plain
    text, or, with the body in a later packet, left the handler waiting for good. The gateway decodes
    nothing and refuses the coding in the envelope."""
    token = _token("alice")
    for path in sorted(BODY_OPERATIONS):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/json\r\nContent-Encoding: deflate\r\nContent-Length: 1\r\n"
                "Connection: close\r\n\r\nx".encode()
            )
            async with asyncio.timeout(10):
                answer = await reader.read()
        finally:
            writer.close()
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 415 Unsupported Media Type", (path, answer)
        body = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "unsupported_media_type", body


async def test_a_body_garbled_midway_is_408_not_a_handler_waiting_for_good(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp hands a chunk-size error in the middle of a body to the next request on the
    connection, never to the handler reading this one: without a bound the read waits for good."""
    monkeypatch.setattr(schemas, "BODY_READ_TIMEOUT_S", 1.0)
    assert gateway.server.runner is not None
    server = gateway.server.runner.server
    assert server is not None
    handled_before = server.requests_count
    head = (
        f"POST /api/sandbox/exec HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {_token('alice')}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(head.encode() + b'3\r\n{"l\r\n')
        await writer.drain()
        # The garbage must come after aiohttp has handed the request to a handler.

        async def handed_over() -> bool:
            return server.requests_count > handled_before

        await poll(handed_over)
        writer.write(b"not a chunk size\r\n")
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    # What is left of the request on the connection cannot be told from the next one.
    assert b"\r\nConnection: close\r\n" in answer, answer
    assert body["error"]["code"] == "request_timeout", body


def _undocumented_methods(base_url: str, token: str) -> dict[str, requests.Response]:
    outcomes = {}
    with requests.Session() as session:
        for path, item in SCHEMA.raw_schema["paths"].items():
            documented = {method.upper() for method in item if method.upper() in HTTP_METHODS}
            for method in HTTP_METHODS:
                if method in documented or (method == "HEAD" and "GET" in documented):
                    continue
                url = base_url + path.replace("{user}", "alice").replace("{id}", "0123456789abcdef")
                headers = {"Authorization": f"Bearer {token}"}
                outcomes[f"{method} {path}"] = session.request(method, url, headers=headers, timeout=10)
    return outcomes


async def test_undocumented_methods_are_405_with_allow(gateway: TestClient) -> None:
    outcomes = await asyncio.to_thread(_undocumented_methods, _base_url(gateway), _token("alice"))
    assert outcomes
    for request, response in outcomes.items():
        method, path = request.split(" ", 1)
        assert response.status_code == 405, (request, response.status_code)
        if method != "HEAD":
            _error_envelope(response.status_code, response.headers.get("Content-Type"), response.content)
        # RFC 9110 15.5.6: a 405 lists the methods the resource does support.
        documented = {m.upper() for m in SCHEMA.raw_schema["paths"][path] if m.upper() in HTTP_METHODS}
        allowed = {m.strip() for m in response.headers.get("Allow", "").split(",")}
        assert documented <= allowed, (request, response.headers.get("Allow"))
