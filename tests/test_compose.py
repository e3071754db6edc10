"""The Compose deployment for real: docker-compose.yml brought up by scripts/compose-up.sh (images
built on this machine's bases), a sandbox started and `console.log(1)` run through the composed
gateway's API, then `compose down -v`, and the sandboxes that gateway started removed too."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest

from gateway.containers import LABEL_GATEWAY, LABEL_USER, remove_deployment
from gateway.egress import EgressGuard
from gateway.settings import EgressPolicy, Settings
from gateway.tokens import mint_token

from .helpers import free_port

pytestmark = [pytest.mark.compose, pytest.mark.docker]

ROOT = Path(__file__).resolve().parent.parent
# Tags of the images the test builds: its own, so that it never replaces a deployment's images (or
# the suite's sandbox image), and kept between runs, so that the next run's builds come from cache.
TEST_IMAGES = {
    "GATEWAY_IMAGE": "sandbox-gateway/gateway:test",
    "POSTGRES_IMAGE": "sandbox-gateway/postgres:test",
    "SANDBOX_IMAGE": "sandbox-gateway/sandbox:compose-test",
}
# A first run on a machine with no registry builds the local base and every image (~2-3 min here).
UP_TIMEOUT_S = 900
DOWN_TIMEOUT_S = 120
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"


@dataclass
class Deployment:
    project: str
    port: int
    jwt_secret: str


async def run(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Runs a script of the repository; its exit code and its output (stdout and stderr)."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            output, _ = await process.communicate()
    except TimeoutError:
        # The script and the Compose it started, together.
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout_s} s")
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def compose_command() -> str:
    """The Compose that scripts/compose.sh would pick; a failure saying what to install when none."""
    if configured := os.environ.get("COMPOSE"):
        return configured
    if (await run(["docker", "compose", "version"], dict(os.environ), 30))[0] == 0:
        return "docker compose"
    if shutil.which("docker-compose"):
        return "docker-compose"
    pytest.fail("no Compose implementation: apt-get install docker-compose (scripts/test.sh does)")


@asynccontextmanager
async def composed(tmp_path: Path, docker: aiodocker.Docker) -> AsyncIterator[Deployment]:
    """The composed system under a random project name and port, brought down (volumes too) after,
    with every sandbox its gateway started."""
    project = f"sgtest-compose-{secrets.token_hex(4)}"
    port = free_port()
    jwt_secret = secrets.token_urlsafe(48)
    env_file = tmp_path / "compose.env"
    settings = {
        "GATEWAY_JWT_SECRET": jwt_secret,
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "GATEWAY_PORT": str(port),
        "GATEWAY_NAME": project,
        "SANDBOX_NETWORK": project,
        "SANDBOX_MEMORY_MB": "256",
        **TEST_IMAGES,
    }
    env_file.touch(mode=0o600)
    env_file.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    env = {
        **os.environ,
        "COMPOSE": await compose_command(),
        "COMPOSE_PROJECT_NAME": project,
        "SANDBOX_GATEWAY_ENV_FILE": str(env_file),
    }
    try:
        code, output = await run(["scripts/compose-up.sh"], env, UP_TIMEOUT_S)
        if code != 0:
            pytest.fail(f"scripts/compose-up.sh failed ({code}):\n{output[-6000:]}")
        yield Deployment(project=project, port=port, jwt_secret=jwt_secret)
    finally:
        down_code, down_output = await run(["scripts/compose.sh", "down", "-v"], env, DOWN_TIMEOUT_S)
        # A stopped gateway leaves its sandboxes running (a restart adopts them), and its egress
        # rules with them: remove both here.
        await remove_deployment(docker, project)
        await EgressGuard(EgressPolicy(), project).remove()
    assert down_code == 0, f"compose down failed:\n{down_output[-4000:]}"


async def labelled_containers(docker: aiodocker.Docker, label: str) -> list[dict[str, Any]]:
    listed = await docker.containers.list(all="1", filters=json.dumps({"label": [label]}))
    return [container._container for container in listed]


async def test_compose_up_runs_code_in_a_sandbox_and_down_removes_everything(
    tmp_path: Path, docker: aiodocker.Docker
) -> None:
    async with composed(tmp_path, docker) as deployment:
        await check_deployment(deployment, docker)
    # Down removed the services and volumes; the sandboxes went with remove_deployment.
    assert await labelled_containers(docker, f"{COMPOSE_PROJECT_LABEL}={deployment.project}") == []
    assert await labelled_containers(docker, f"{LABEL_GATEWAY}={deployment.project}") == []
    for label in (f"{COMPOSE_PROJECT_LABEL}={deployment.project}", f"{LABEL_GATEWAY}={deployment.project}"):
        volumes = await docker.volumes.list(filters={"label": [label]})  # type: ignore[no-untyped-call]
        assert (volumes.get("Volumes") or []) == [], label


async def check_deployment(deployment: Deployment, docker: aiodocker.Docker) -> None:
    token = mint_token("compose-user", Settings(jwt_key=deployment.jwt_secret, database_url="unused"), 600)
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{deployment.port}", timeout=timeout) as http:
        async with http.get("/healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok", "docker": True, "database": True, "egress": True}
        async with http.post("/api/sandbox", headers=headers) as response:
            assert response.status == 201, await response.text()
            assert (await response.json())["state"] == "running"
        body = {"language": "node", "code": "console.log(1)"}
        async with http.post("/api/sandbox/exec", headers=headers, json=body) as response:
            assert response.status == 200, await response.text()
            result = await response.json()
    assert (result["stdout"], result["stderr"], result["exit_code"]) == ("1\n", "", 0)

    # The sandbox is the composed gateway's, from the image the compose file built.
    sandboxes = await labelled_containers(docker, f"{LABEL_GATEWAY}={deployment.project}")
    assert [(c["Labels"][LABEL_USER], c["Image"], c["State"]) for c in sandboxes] == [
        ("compose-user", TEST_IMAGES["SANDBOX_IMAGE"], "running")
    ]
    # PostgreSQL has no network at all: only the gateway reaches it, through the socket's volume.
    services = await labelled_containers(docker, f"{COMPOSE_PROJECT_LABEL}={deployment.project}")
    network_modes = {
        c["Labels"]["com.docker.compose.service"]: c["HostConfig"]["NetworkMode"] for c in services
    }
    assert network_modes == {"postgres": "none", "gateway": "host", "sandbox-image": "none"}
