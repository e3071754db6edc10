"""Fixtures that start real services: a throwaway PostgreSQL cluster, the Docker engine the set-up
started, and the real application built by create_app. Missing infrastructure fails the run with
what to install; nothing here skips."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiodocker
import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Page, async_playwright

from gateway.app import SERVER_OPTIONS, create_app
from gateway.containers import remove_deployment
from gateway.egress import EgressGuard
from gateway.settings import DiskSettings, EgressPolicy, ExecSettings, SandboxLimits, Settings

from .gateway_processes import http, start_gateways  # noqa: F401 (fixtures, registered here)
from .helpers import JWT_SECRET, GatewayTestServer, MakeClient, free_port

SANDBOX_IMAGE = os.environ.get("SANDBOX_IMAGE", "sandbox-gateway/sandbox:latest")
# The users' filesystems, in the set-up's state folder (scripts/lib.sh), each deployment in its own
# folder there. The size is small enough to fill in a test and large enough for `npm install`.
STATE_DIR = Path(os.environ.get("SANDBOX_GATEWAY_STATE") or Path(__file__).resolve().parent.parent / ".state")
TEST_DISKS = DiskSettings(size_mb=1024, directory=str(STATE_DIR / "disks"), tmp_mb=64)


def pytest_configure(config: pytest.Config) -> None:
    # Gateways the tests run as processes of their own (`python -m gateway`) inherit this, so that
    # their filesystems land where the fixtures' clean-up looks too. (Only this: the Compose test's
    # shell environment, which this also is, would pass more to its gateway.)
    os.environ["SANDBOX_DISK_DIR"] = TEST_DISKS.directory


# Tests marked `runtimes` run once under each; every other test under runc.
RUNTIMES = ("runc", "runsc")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("runtimes") and "sandbox_runtime" in metafunc.fixturenames:
        metafunc.parametrize("sandbox_runtime", RUNTIMES, indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that restart shared infrastructure run last, so that nothing else runs through it."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


def _postgres_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        pytest.fail(
            "PostgreSQL server binaries not found: apt-get install postgresql (or set TEST_DATABASE_URL)"
        )
    return candidates[-1].parent


@dataclass
class PostgresCluster:
    """The suite's throwaway cluster; tests of database faults stop and start it."""

    dsn: str
    pg_bin: Path | None = None
    folder: Path | None = None

    def _pg_ctl(self, *args: str) -> None:
        if self.pg_bin is None or self.folder is None:
            pytest.fail(
                "this test stops PostgreSQL: run it on the suite's own cluster, not TEST_DATABASE_URL"
            )
        command = [str(self.pg_bin / "pg_ctl"), "-D", f"{self.folder}/data", *args]
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True)

    def start(self) -> None:
        assert self.folder is not None
        options = f"-c listen_addresses='' -c unix_socket_directories='{self.folder}' -c fsync=off"
        self._pg_ctl("-l", f"{self.folder}/log", "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "stop")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway cluster for the session (or TEST_DATABASE_URL's server)."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield PostgresCluster(dsn=url)
        return
    pg_bin = _postgres_bin()
    # initdb refuses root; the postgres user must own the folder, which /tmp lets it reach.
    folder = Path(tempfile.mkdtemp(prefix="sgtest-pg-"))
    shutil.chown(folder, "postgres")
    cluster = PostgresCluster(
        dsn=f"postgresql://postgres@/postgres?host={folder}", pg_bin=pg_bin, folder=folder
    )
    try:
        initdb = [
            str(pg_bin / "initdb"),
            "--no-sync",
            "-A",
            "trust",
            "-U",
            "postgres",
            "-D",
            f"{folder}/data",
        ]
        subprocess.run(["runuser", "-u", "postgres", "--", *initdb], check=True, capture_output=True)
        cluster.start()
    except subprocess.CalledProcessError as err:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start a throwaway PostgreSQL cluster: {err.stderr.decode()}")
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            cluster.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(postgres_cluster: PostgresCluster) -> str:
    """A DSN to the `postgres` database of the suite's cluster."""
    return postgres_cluster.dsn


@pytest.fixture
async def database_url(postgres_server: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test."""
    name = f"sgtest_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(postgres_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await admin.close()
    try:
        yield postgres_server.replace("/postgres?", f"/{name}?", 1)
    finally:
        # A connection of its own: the test may have restarted the server under the first one.
        admin = await asyncpg.connect(postgres_server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        await client.version()
    except (aiodocker.DockerError, OSError) as err:
        await client.close()
        pytest.fail(
            f"no Docker engine answers ({err}); `make test` starts one, or: apt-get install docker.io"
        )
    try:
        await client.images.inspect(SANDBOX_IMAGE)
    except aiodocker.DockerError:
        await client.close()
        pytest.fail(f"image {SANDBOX_IMAGE} is missing; `make test` builds it (scripts/build-image.sh)")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def sandbox_runtime(request: pytest.FixtureRequest, docker: aiodocker.Docker) -> str:
    """The OCI runtime of the test's sandboxes; one the engine must know (CI runs the core tests
    under gVisor too, so a missing runsc fails them, and says how to add it)."""
    runtime: str = getattr(request, "param", "runc")
    known = (await docker.system.info()).get("Runtimes") or {}
    if runtime not in known:
        pytest.fail(
            f"the Docker engine has no runtime {runtime!r} (it knows {', '.join(sorted(known))}):"
            " scripts/test.sh registers gVisor's (scripts/ensure-runsc.sh); by hand, apt-get install runsc"
            ' and add "runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs":'
            ' ["--platform=ptrace", "--network=host"]}} to the engine\'s daemon.json, then SIGHUP dockerd'
        )
    return runtime


@pytest.fixture
def gateway_name() -> str:
    return f"sgtest-{secrets.token_hex(4)}"


@pytest.fixture
async def settings(
    database_url: str, docker: aiodocker.Docker, gateway_name: str, sandbox_runtime: str
) -> AsyncIterator[Settings]:
    """Settings for one test's gateway: its own database, port, container names and network, all
    removed after. The page's origin is sandbox.localhost, previews' preview.sandbox.localhost."""
    port = free_port()
    yield Settings(
        port=port,
        public_url=f"http://sandbox.localhost:{port}",
        jwt_key=JWT_SECRET,
        database_url=database_url,
        gateway_name=gateway_name,
        sandbox_network=gateway_name,
        sandbox_image=SANDBOX_IMAGE,
        sandbox_runtime=sandbox_runtime,
        limits=SandboxLimits(memory_mb=256, cpus=1.0, pids=128),
        disk=TEST_DISKS,
        exec=ExecSettings(),
    )
    await remove_deployment(docker, gateway_name, TEST_DISKS.directory)
    # The gateway leaves its rules in place when it stops (its sandboxes outlive it); tests do not.
    await EgressGuard(EgressPolicy(), gateway_name).remove()


@pytest.fixture
async def make_client(settings: Settings, aiohttp_client: Callable[..., Awaitable[TestClient]]) -> MakeClient:
    """Builds the real application, optionally with some settings changed. The first listens on the
    settings' port; further ones (other gateways on the same database) on ports of their own."""
    ports = iter([settings.port])

    async def make(**changes: object) -> TestClient:
        port = next(ports, None) or free_port()
        changes.setdefault("public_url", f"http://sandbox.localhost:{port}")
        app = create_app(replace(settings, port=port, **changes))  # type: ignore[arg-type]
        # Started here: aiohttp_client passes no runner options (SERVER_OPTIONS) on to the server.
        server = GatewayTestServer(app, port=port)
        await server.start_server(**SERVER_OPTIONS)
        return await aiohttp_client(server)

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient:
    return await make_client()


@pytest.fixture
async def preview_http(client: TestClient) -> AsyncIterator[aiohttp.ClientSession]:
    """Connections of their own for the preview origin, as a browser keeps them."""
    async with aiohttp.ClientSession(base_url=client.make_url("")) as session:
        yield session


CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium keeps dialling Google's hosts, which this network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (scripts/test.sh does)")
    return CHROMIUM


@pytest.fixture(scope="session")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        yield await context.new_page()
    finally:
        await context.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
