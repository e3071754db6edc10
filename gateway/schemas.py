"""Request bodies, validated at the door, and the JSON shapes of responses."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Literal, TypeVar

import pydantic
from aiohttp import web

from .db import Session
from .errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from .execute import ExecRequest, ExecResult
from .settings import Settings

Model = TypeVar("Model", bound=pydantic.BaseModel)
# The largest body (a couple of MiB) arrives in well under this, even over a slow link.
BODY_READ_TIMEOUT_S = 30.0


class StrictModel(pydantic.BaseModel):
    # strict: "5" is not an int and 1 is not a string; forbid: a misspelt field is an error, not ignored.
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


class StartBody(StrictModel):
    """POST /api/sandbox takes no options yet; an empty body or {} is fine."""


class ExecBody(StrictModel):
    language: Literal["node", "python", "bash"]
    code: str = pydantic.Field(min_length=1)
    stdin: str | None = None
    timeout_ms: int | None = pydantic.Field(default=None, ge=1)

    def to_request(self, settings: Settings) -> ExecRequest:
        limits = settings.exec
        code_bytes = len(self.code.encode())
        if code_bytes > limits.max_code_bytes:
            raise PayloadTooLarge(f"code: {code_bytes} bytes, at most {limits.max_code_bytes} allowed")
        if "\x00" in self.code:
            raise InvalidRequest("code: must not contain NUL characters")
        stdin = (self.stdin or "").encode()
        if len(stdin) > limits.max_stdin_bytes:
            raise PayloadTooLarge(f"stdin: {len(stdin)} bytes, at most {limits.max_stdin_bytes} allowed")
        timeout_ms = self.timeout_ms or limits.default_timeout_ms
        if timeout_ms > limits.max_timeout_ms:
            raise InvalidRequest(f"timeout_ms: at most {limits.max_timeout_ms} allowed")
        return ExecRequest(language=self.language, code=self.code, stdin=stdin, timeout_ms=timeout_ms)


class ProjectBody(StrictModel):
    template: Literal["react", "vanilla", "node"]
    # A folder name directly under /workspace: no slashes, no leading dot.
    name: str = pydantic.Field(default="app", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    start: bool = False


async def parse_body(request: web.Request, model: type[Model], *, optional: bool = False) -> Model:
    """The request's JSON body as `model`; InvalidRequest names the offending field."""
    content_type = request.headers.get("Content-Type")
    check_identity_coding(request)
    try:
        # Bounded: aiohttp leaves a read waiting for good when a chunked body turns to garbage midway
        # (its parser reports the error to the next request, not to this one), and a body that
        # trickles in would hold the handler as long.
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            body = await request.read()
    except web.RequestPayloadError:
        raise InvalidRequest("body: cut short before its announced end") from None
    except TimeoutError:
        raise RequestTimeout(f"body: not complete within {BODY_READ_TIMEOUT_S:g} s") from None
    # No body at all is no options; whitespace is not JSON.
    if optional and not body:
        return model()
    if content_type is not None and request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as application/json")
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError as err:
        raise InvalidRequest(_describe(err)) from None


def check_identity_coding(request: web.Request) -> None:
    """Refuses a compressed request body before anything reads it. aiohttp would decode it while
    reading (a gzip bomb, and a broken coding that aiohttp's parser answers itself or never), and a
    proxy that passed on decoded bytes under the original length would let the dev server read the
    rest as a second request."""
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {coding}: send the body uncompressed")


def _describe(err: pydantic.ValidationError) -> str:
    problems = []
    for error in err.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "body"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def parse_purge(request: web.Request) -> bool:
    """The `purge` query flag of a stop: delete the workspace too."""
    purge = request.query.get("purge", "false")
    if purge not in ("true", "false"):
        raise InvalidRequest("purge: must be true or false")
    return purge == "true"


def session_json(session: Session, settings: Settings, preview_urls: dict[str, str]) -> dict[str, Any]:
    return {
        "user": session.user,
        "state": session.state,
        "created_at": session.created_at.isoformat(),
        "last_activity": session.last_activity.isoformat(),
        "stopped_at": session.stopped_at.isoformat() if session.stopped_at else None,
        "stop_reason": session.stop_reason,
        "limits": {
            "memory_mb": settings.limits.memory_mb,
            "cpus": settings.limits.cpus,
            "pids": settings.limits.pids,
        },
        **preview_urls,
    }


def exec_json(result: ExecResult) -> dict[str, Any]:
    return dataclasses.asdict(result)
