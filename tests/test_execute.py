"""The execute API against real sandboxes: languages, stdin, exit codes, timeouts, caps, bad input."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from gateway.settings import ExecSettings

from .helpers import MakeClient, auth, docker_shell_ok, poll, running_container_id

pytestmark = [pytest.mark.docker, pytest.mark.postgres]


async def run(client: TestClient, user: str = "alice", **body: Any) -> dict[str, Any]:
    response = await client.post("/api/sandbox/exec", headers=auth(user), json=body)
    assert response.status == 200, await response.text()
    result: dict[str, Any] = await response.json()
    return result


@pytest.fixture
async def sandbox(client: TestClient) -> TestClient:
    """A client whose user alice has a running sandbox."""
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    return client


@pytest.mark.runtimes
@pytest.mark.parametrize(
    ("language", "code"),
    [
        ("node", "console.log(6 * 7); console.error('oops'); process.exit(3)"),
        ("python", "import sys; print(6 * 7); print('oops', file=sys.stderr); sys.exit(3)"),
        ("bash", "echo $((6 * 7)); echo oops >&2; exit 3"),
    ],
)
async def test_each_language_returns_output_and_exit_code(
    sandbox: TestClient, language: str, code: str
) -> None:
    result = await run(sandbox, language=language, code=code)
    assert result["stdout"] == "42\n"
    assert result["stderr"] == "oops\n"
    assert result["exit_code"] == 3
    assert result["timed_out"] is False
    assert result["truncated"] is False
    # Measured, not a placeholder: starting any of the three interpreters takes a millisecond or more,
    # and the default timeout bounds it from above.
    assert 0 < result["duration_ms"] < 10_000


async def test_runs_as_sandbox_in_workspace(sandbox: TestClient) -> None:
    result = await run(sandbox, language="bash", code="id -un; pwd")
    assert result["stdout"] == "sandbox\n/workspace\n"


async def test_code_is_not_shell_interpolated(sandbox: TestClient) -> None:
    code = "print('$(touch /tmp/pwned) `id` ; rm -rf / \\' \"')"
    result = await run(sandbox, language="python", code=code)
    assert result["stdout"] == "$(touch /tmp/pwned) `id` ; rm -rf / ' \"\n"
    check = await run(sandbox, language="bash", code="test -e /tmp/pwned && echo yes || echo no")
    assert check["stdout"] == "no\n"


@pytest.mark.runtimes
async def test_stdin_reaches_the_program_then_eof(sandbox: TestClient) -> None:
    result = await run(
        sandbox, language="python", code="import sys; print(sys.stdin.read()[::-1])", stdin="abc\n"
    )
    assert result["stdout"] == "\ncba\n"
    # Without stdin a reader gets EOF at once instead of hanging.
    empty = await run(sandbox, language="bash", code="cat; echo end", timeout_ms=5000)
    assert (empty["stdout"], empty["timed_out"]) == ("end\n", False)


async def test_large_stdin_that_is_never_read_does_not_hang(sandbox: TestClient) -> None:
    result = await run(sandbox, language="bash", code="echo ignored", stdin="x" * 900_000, timeout_ms=5000)
    assert (result["stdout"], result["timed_out"]) == ("ignored\n", False)


async def test_a_run_that_ignores_a_large_stdin_always_gets_its_end(sandbox: TestClient) -> None:
    """The agent's lingering close: it ended such runs' connections with the gateway's input unread,
    the kernel answered the gateway's next write with a reset, and the run's end, already sent, was
    lost (503 "broke the connection: Broken pipe", 3 runs in 150 before the fix)."""
    for _ in range(100):
        result = await run(
            sandbox, language="bash", code="echo ignored", stdin="x" * 900_000, timeout_ms=5000
        )
        assert result["stdout"] == "ignored\n", result


async def test_timeout_kills_a_busy_loop(sandbox: TestClient) -> None:
    result = await run(
        sandbox, language="node", code="console.log('before'); while (true) {}", timeout_ms=700
    )
    assert result["timed_out"] is True
    assert result["exit_code"] == 137
    assert result["stdout"] == "before\n"
    assert 700 <= result["duration_ms"] < 5000


@pytest.mark.runtimes
async def test_timeout_kills_forked_and_detached_children(sandbox: TestClient) -> None:
    code = (
        "(setsid sleep 4242 &) ; nohup sleep 4343 >/dev/null 2>&1 & "
        "python3 -c 'import os; os.fork() or os.setsid(); import time; time.sleep(4444)' & "
        "echo started; while :; do :; done"
    )
    result = await run(sandbox, language="bash", code=code, timeout_ms=1000)
    assert result["timed_out"] is True
    assert result["stdout"] == "started\n"
    left = await run(
        sandbox, language="bash", code="ps -eo args | grep -c '[s]leep 4[234]4\\|[t]ime.sleep' || true"
    )
    assert left["stdout"] == "0\n"


@pytest.mark.runtimes
async def test_children_do_not_outlive_a_run_that_finished(sandbox: TestClient) -> None:
    result = await run(sandbox, language="bash", code="nohup sleep 4545 >/dev/null 2>&1 & echo forked")
    assert (result["stdout"], result["timed_out"]) == ("forked\n", False)
    left = await run(sandbox, language="bash", code="ps -eo args | grep -c '[s]leep 4545' || true")
    assert left["stdout"] == "0\n"


async def test_output_is_capped_and_flagged(make_client: MakeClient) -> None:
    client = await make_client(exec=ExecSettings(max_output_bytes=1000))
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    result = await run(client, language="bash", code="head -c 5000 /dev/zero | tr '\\0' a; echo -n done >&2")
    assert result["stdout"] == "a" * 1000
    assert result["stderr"] == "done"
    assert result["truncated"] is True
    assert result["exit_code"] == 0


async def test_non_utf8_output_is_replaced_not_fatal(sandbox: TestClient) -> None:
    result = await run(sandbox, language="bash", code="printf 'ok\\xff\\xfe\\x80end'; printf '\\xc3' >&2")
    assert result["stdout"] == "ok\ufffd\ufffd\ufffdend"
    assert result["stderr"] == "\ufffd"


async def test_unicode_survives_both_ways(sandbox: TestClient) -> None:
    result = await run(
        sandbox, language="node", code="process.stdin.pipe(process.stdout)", stdin="héllo ✓ 🎉"
    )
    assert result["stdout"] == "héllo ✓ 🎉"


async def test_concurrent_runs_per_user_are_bounded(
    make_client: MakeClient, docker: aiodocker.Docker
) -> None:
    client = await make_client(exec=ExecSettings(max_concurrent_per_user=1))
    assert (await client.post("/api/sandbox", headers=auth("alice"))).status == 201
    slow = asyncio.ensure_future(
        client.post(
            "/api/sandbox/exec", headers=auth("alice"), json={"language": "bash", "code": "sleep 3.21"}
        )
    )
    try:
        # Looked at from outside the API, which the bound would refuse.
        container_id = await running_container_id(client, "alice")
        await poll(lambda: docker_shell_ok(docker, container_id, ["pgrep", "-f", "sleep 3.21"]))
        second = await client.post(
            "/api/sandbox/exec", headers=auth("alice"), json={"language": "bash", "code": "true"}
        )
        assert second.status == 429
        assert (await second.json())["error"]["code"] == "too_many_requests"
        assert second.headers["Retry-After"] == "1"
        # Another user's runs are not affected.
        assert (await client.post("/api/sandbox", headers=auth("bob"))).status == 201
        assert (await run(client, user="bob", language="bash", code="echo free"))["stdout"] == "free\n"
    finally:
        assert (await slow).status == 200


async def test_exec_without_a_running_sandbox_is_409(client: TestClient) -> None:
    response = await client.post(
        "/api/sandbox/exec", headers=auth("carol"), json={"language": "bash", "code": "true"}
    )
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "sandbox_not_running"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"language": "ruby", "code": "puts 1"}, 400, "language"),
        ({"code": "1"}, 400, "language: Field required"),
        ({"language": "bash"}, 400, "code: Field required"),
        ({"language": "bash", "code": ""}, 400, "code"),
        ({"language": "bash", "code": 5}, 400, "code: Input should be a valid string"),
        ({"language": "bash", "code": "true", "timeout_ms": "100"}, 400, "timeout_ms"),
        ({"language": "bash", "code": "true", "timeout_ms": 1.5}, 400, "timeout_ms"),
        ({"language": "bash", "code": "true", "timeout_ms": True}, 400, "timeout_ms"),
        ({"language": "bash", "code": "true", "timeout_ms": 0}, 400, "timeout_ms"),
        ({"language": "bash", "code": "true", "timeout_ms": 10**9}, 400, "timeout_ms: at most"),
        ({"language": "bash", "code": "true", "user": "bob"}, 400, "user: unknown field"),
        ({"language": "bash", "code": "true", "stdin": ["a"]}, 400, "stdin"),
        ({"language": "bash", "code": "echo \u0000"}, 400, "NUL"),
        ({"language": "bash", "code": "#" * 200_000}, 413, "code:"),
        ([1, 2], 400, "body"),
    ],
)
async def test_bad_input_gets_a_clear_error(
    client: TestClient, body: Any, status: int, fragment: str
) -> None:
    response = await client.post("/api/sandbox/exec", headers=auth("alice"), json=body)
    assert response.status == status
    error = (await response.json())["error"]
    assert fragment in error["message"]
    assert set(error) == {"code", "message"}


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid_request"),
        (b"", "application/json", 400, "invalid_request"),
        (b"\xff\xfe", "application/json", 400, "invalid_request"),
        (b'{"language": "bash", "code": "true"}', "text/plain", 415, "unsupported_media_type"),
        (b"x" * (8 * 1024 * 1024), "application/json", 413, "payload_too_large"),
    ],
)
async def test_malformed_bodies(
    client: TestClient, data: bytes, content_type: str, status: int, code: str
) -> None:
    response = await client.post(
        "/api/sandbox/exec", headers={**auth("alice"), "Content-Type": content_type}, data=io.BytesIO(data)
    )
    assert response.status == status
    assert (await response.json())["error"]["code"] == code
