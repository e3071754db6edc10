"""Processes in a sandbox, kept by its agent (sandbox-image/agent/sandbox_agent/processes.py): what a
start may ask for, and the agent's process operations. The HTTP API over them is process_api.py.

The agent holds the processes, their output logs and the bounds on them, so that any gateway process
sees the same processes and a reader reconnects through any of them. Ids are looked up only in the
caller's own sandbox's agent: another user's id is simply not there.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from . import agent, agent_protocol
from .agent import AgentAddress
from .errors import AgentFailed, InvalidRequest, PayloadTooLarge, ProcessNotFound
from .execute import PROGRAMS
from .schemas import StrictModel
from .settings import ExecSettings, ProcessSettings
from .user_slots import UserSlots

# What the agent makes: secrets.token_hex(8).
PROCESS_ID = re.compile(r"[0-9a-f]{16}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CWD_ROOTS = ("/workspace", "/tmp")  # noqa: S108 (the sandbox's own /tmp, as a working directory)
# The signals a client may send, by name: enough to stop, interrupt, pause and resume a program.
SIGNALS: dict[str, int] = {
    name: int(getattr(signal, name))
    for name in (
        "SIGTERM",
        "SIGKILL",
        "SIGINT",
        "SIGHUP",
        "SIGQUIT",
        "SIGUSR1",
        "SIGUSR2",
        "SIGSTOP",
        "SIGCONT",
    )
}
SignalName = Literal[
    "SIGTERM", "SIGKILL", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGSTOP", "SIGCONT"
]


class ProcessBody(StrictModel):
    """POST /api/sandbox/processes: argv, or language and code; the rest optional."""

    argv: list[str] | None = pydantic.Field(default=None, min_length=1)
    language: Literal["node", "python", "bash"] | None = None
    code: str | None = pydantic.Field(default=None, min_length=1)
    cwd: str | None = None
    env: dict[str, str] | None = None
    stdin: str | None = None
    timeout_ms: int | None = pydantic.Field(default=None, ge=1)
    background: bool = False


class SignalBody(StrictModel):
    signal: SignalName


@dataclass(frozen=True, kw_only=True)
class ProcessStart:
    argv: list[str]
    cwd: str
    env: dict[str, str]
    # None: stdin stays open for POST .../stdin; bytes: these, then its end.
    stdin: bytes | None
    timeout_ms: int | None
    background: bool


def to_start(body: ProcessBody, limits: ProcessSettings, exec_limits: ExecSettings) -> ProcessStart:
    """Checks a body against the bounds; InvalidRequest or PayloadTooLarge name the field."""
    return ProcessStart(
        argv=_argv(body, exec_limits),
        cwd=_cwd(body.cwd),
        env=_env(body.env, limits),
        stdin=_stdin(body.stdin, exec_limits),
        timeout_ms=_timeout(body, limits),
        background=body.background,
    )


def _argv(body: ProcessBody, exec_limits: ExecSettings) -> list[str]:
    if (body.argv is None) == (body.language is None):
        raise InvalidRequest("body: give either argv, or language and code")
    if body.language is not None:
        if body.code is None:
            raise InvalidRequest("code: required with language")
        argv = [*PROGRAMS[body.language], body.code]
    else:
        if body.code is not None:
            raise InvalidRequest("code: only with language, not with argv")
        assert body.argv is not None
        argv = body.argv
    size = sum(len(arg.encode()) for arg in argv)
    if size > exec_limits.max_code_bytes:
        raise PayloadTooLarge(f"argv: {size} bytes, at most {exec_limits.max_code_bytes} allowed")
    if any("\x00" in arg for arg in argv) or not argv[0]:
        raise InvalidRequest("argv: no NUL characters, and a program's name first")
    return argv


def _cwd(cwd: str | None) -> str:
    if cwd is None:
        return CWD_ROOTS[0]
    normal = os.path.normpath(cwd) if cwd.startswith("/") and "\x00" not in cwd else ""
    if not any(normal == root or normal.startswith(root + "/") for root in CWD_ROOTS):
        raise InvalidRequest("cwd: must be an absolute path inside /workspace or /tmp")
    return normal


def _env(env: dict[str, str] | None, limits: ProcessSettings) -> dict[str, str]:
    env = env or {}
    if len(env) > limits.max_env_vars:
        raise InvalidRequest(f"env: at most {limits.max_env_vars} variables")
    if sum(len(k.encode()) + len(v.encode()) for k, v in env.items()) > limits.max_env_bytes:
        raise PayloadTooLarge(f"env: at most {limits.max_env_bytes} bytes")
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name) or "\x00" in value:
            raise InvalidRequest(f"env.{name}: names are letters, digits and _; values have no NUL")
    return env


def _stdin(stdin: str | None, exec_limits: ExecSettings) -> bytes | None:
    if stdin is None:
        return None
    data = stdin.encode()
    if len(data) > exec_limits.max_stdin_bytes:
        raise PayloadTooLarge(f"stdin: {len(data)} bytes, at most {exec_limits.max_stdin_bytes} allowed")
    return data


def _timeout(body: ProcessBody, limits: ProcessSettings) -> int | None:
    if body.background:
        if body.timeout_ms is not None:
            raise InvalidRequest("timeout_ms: a background process has none; it runs until killed")
        return None
    timeout_ms = body.timeout_ms or limits.default_timeout_ms
    if timeout_ms > limits.max_timeout_ms:
        raise InvalidRequest(f"timeout_ms: at most {limits.max_timeout_ms} allowed")
    return timeout_ms


def check_id(process_id: str) -> str:
    if not PROCESS_ID.fullmatch(process_id):
        raise ProcessNotFound(f"no process {process_id!r} in your sandbox")
    return process_id


@asynccontextmanager
async def operation(address: AgentAddress, op: str, **params: Any) -> AsyncIterator[agent.AgentStream]:
    """agent.operation, with the agent's not_found as this API's own 404."""
    try:
        async with agent.operation(address, op, **params) as stream:
            yield stream
    except AgentFailed as err:
        if err.code == "not_found":
            raise ProcessNotFound(f"no process {params.get('id')!r} in your sandbox") from None
        raise


async def start(address: AgentAddress, limits: ProcessSettings, process: ProcessStart) -> dict[str, Any]:
    """Starts the process; its description as the agent gives it."""
    params = {
        "argv": process.argv,
        "cwd": process.cwd,
        "env": process.env,
        "timeout_ms": process.timeout_ms,
        "background": process.background,
        "limits": {
            "live": limits.max_per_user,
            "ended": limits.max_ended_per_user,
            "buffer": limits.max_buffer_bytes,
            "retention_s": limits.retention_s,
        },
    }
    async with operation(address, "process.start", **params) as stream:
        if process.stdin is not None:
            await send_input(stream, process.stdin, close=True)
        described: dict[str, Any] = stream.answer["process"]
    return described


async def start_background(address: AgentAddress, limits: ProcessSettings, argv: list[str]) -> dict[str, Any]:
    """A program that outlives the request and every connection (a dev server): until it is killed or
    the sandbox stops."""
    process = ProcessStart(argv=argv, cwd=CWD_ROOTS[0], env={}, stdin=None, timeout_ms=None, background=True)
    return await start(address, limits, process)


async def send_input(stream: agent.AgentStream, data: bytes, *, close: bool) -> None:
    for at in range(0, len(data), agent_protocol.MAX_FRAME):
        await stream.send(agent_protocol.STDIN, data[at : at + agent_protocol.MAX_FRAME])
    if close:
        await stream.send(agent_protocol.STDIN, b"")


async def write_stdin(address: AgentAddress, process_id: str, data: bytes, *, close: bool) -> None:
    async with operation(address, "process.input", id=process_id) as stream:
        await send_input(stream, data, close=close)


async def list_all(address: AgentAddress) -> list[dict[str, Any]]:
    async with operation(address, "process.list") as stream:
        processes: list[dict[str, Any]] = stream.answer["processes"]
    return processes


async def get(address: AgentAddress, process_id: str) -> dict[str, Any]:
    async with operation(address, "process.get", id=process_id) as stream:
        described: dict[str, Any] = stream.answer["process"]
    return described


async def send_signal(address: AgentAddress, process_id: str, name: str) -> int:
    """How many processes of it got the signal."""
    async with operation(address, "process.signal", id=process_id, signal=SIGNALS[name]) as stream:
        return int(stream.answer.get("signalled", 0))


def stream_slots(limit: int) -> UserSlots:
    """Open output streams per user, in this gateway process."""
    return UserSlots(limit, f"at most {limit} output streams at a time per user; close one")
