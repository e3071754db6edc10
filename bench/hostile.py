"""What the hostile client and the neighbours of bench/abuse.py do: connections held open or
trickled into, other users' runs through the API, terminals."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import aiodocker
import aiohttp

from .common import Gateway, start_sandboxes
from .probe import client_session, refusal

# All loopback, all to the gateway on 127.0.0.1, each client from an address of its own: a bound on
# connections per client address is meant to hold back the abuser, not the probe (127.0.0.1).
ABUSER_ADDRESS = "127.0.0.2"
NEIGHBOUR_ADDRESS = "127.0.0.3"
CONNECTING_AT_ONCE = 200
CONNECT_TIMEOUT_S = 10.0
# How much longer than its own timeout a neighbour's run may take to be answered.
RUN_ANSWER_GRACE_S = 30.0
TERMINAL_PROTOCOL = "sandbox-terminal.v1"
CLOSE_TIMEOUT_S = 10.0


# -- connections a hostile client holds --


class Held(asyncio.Protocol):
    """A connection the bench keeps open; notes when the gateway ends it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.opened = time.monotonic()
        self.lasted: float | None = None  # seconds from opening to the gateway closing it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.opened = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lasted = time.monotonic() - self.opened

    @property
    def is_open(self) -> bool:
        return self.lasted is None


@asynccontextmanager
async def held_connections(
    port: int, count: int, address: str
) -> AsyncIterator[tuple[list[Held], Counter[str]]]:
    """`count` connections from `address`, opened a few hundred at a time; (those that connected,
    why the others did not). All are reset on the way out."""
    loop = asyncio.get_running_loop()
    room = asyncio.Semaphore(CONNECTING_AT_ONCE)
    held: list[Held] = []
    failed: Counter[str] = Counter()

    async def connect() -> None:
        async with room:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    _, connection = await loop.create_connection(
                        Held, "127.0.0.1", port, local_addr=(address, 0)
                    )
                held.append(connection)
            except TimeoutError:
                failed["connect timeout"] += 1
            except OSError as err:
                failed[err.strerror or type(err).__name__] += 1

    try:
        await asyncio.gather(*(connect() for _ in range(count)))
        yield held, failed
    finally:
        for connection in held:
            if connection.transport is not None:
                connection.transport.abort()


def connected(held: Sequence[Held], count: int, failed: Counter[str]) -> str:
    return f"{len(held):,} of {count:,} connected{reasons(failed)}"


async def trickle(held: Sequence[Held], head: bytes) -> None:
    """Sends every open connection the next byte of `head`, once a second."""
    for offset in itertools.count():
        byte = head[offset % len(head) : offset % len(head) + 1]
        for connection in held:
            if connection.is_open and connection.transport is not None:
                connection.transport.write(byte)
        await asyncio.sleep(1.0)


# -- neighbours: other users' sandboxes and runs --


@dataclass(frozen=True)
class RunOutcome:
    answer: str  # "exit 0", "timed out", "503 docker_unavailable", "no answer", ...
    seconds: float
    said: str = ""  # the start of what it printed


async def run(
    session: aiohttp.ClientSession, gateway: Gateway, user: str, code: str, timeout_ms: int
) -> RunOutcome:
    """A neighbour's bash run through the API, waited for up to its timeout and a grace."""
    started = time.perf_counter()
    body = {"language": "bash", "code": code, "timeout_ms": timeout_ms}
    said = ""
    try:
        async with (
            asyncio.timeout(timeout_ms / 1000 + RUN_ANSWER_GRACE_S),
            session.post(
                f"{gateway.url}/api/sandbox/exec", headers=gateway.headers(user), json=body
            ) as response,
        ):
            if response.status != 200:
                answer = await refusal(response) or str(response.status)
            else:
                result = await response.json()
                answer = "timed out" if result["timed_out"] else f"exit {result['exit_code']}"
                # A flood's NULs are not worth printing.
                said = "".join(c for c in result["stdout"][:80] if c.isprintable()).strip()
    except TimeoutError:
        answer = "no answer"
    except aiohttp.ClientError as err:
        answer = type(err).__name__
    return RunOutcome(answer, time.perf_counter() - started, said)


def described(runs: Sequence[RunOutcome]) -> str:
    """ "timed out x3 after 21.0-21.4 s; 503 docker_unavailable x1 after 31.2 s" """
    parts = []
    for answer in sorted({r.answer for r in runs}):
        times = sorted(r.seconds for r in runs if r.answer == answer)
        spread = f"{times[0]:.1f}" if times[0] == times[-1] else f"{times[0]:.1f}-{times[-1]:.1f}"
        parts.append(f"{answer} x{len(times)} after {spread} s")
    return "; ".join(parts)


@asynccontextmanager
async def neighbour(gateway: Gateway, user: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A user with a running sandbox, stopped again when the case ends: whatever its runs left
    behind stops with it."""
    await start_sandboxes(gateway, [user])
    async with client_session(NEIGHBOUR_ADDRESS) as session:
        try:
            yield session
        finally:
            try:
                async with (
                    asyncio.timeout(60),
                    session.delete(f"{gateway.url}/api/sandbox", headers=gateway.headers(user)) as response,
                ):
                    await response.read()
            except (TimeoutError, aiohttp.ClientError) as err:
                print(f"  could not stop {user}'s sandbox ({err!r}); it goes at the end", flush=True)


async def sandbox_load(gateway: Gateway, user: str, after_s: float) -> str:
    """The sandbox's processes and CPU use (Docker's stats: the last second or so), `after_s` on."""
    await asyncio.sleep(after_s)
    try:
        async with aiodocker.Docker() as docker:
            container = await docker.containers.get(f"{gateway.settings.gateway_name}-{user}")
            (stats,) = await container.stats(stream=False)
    except (aiodocker.DockerError, ValueError) as err:
        return f"no stats ({err})"
    cpu, before = stats["cpu_stats"], stats["precpu_stats"]
    used = cpu["cpu_usage"]["total_usage"] - before["cpu_usage"]["total_usage"]
    elapsed = cpu.get("system_cpu_usage", 0) - before.get("system_cpu_usage", 0)
    share = used / elapsed * cpu.get("online_cpus", 1) * 100 if elapsed > 0 else float("nan")
    return f"{stats['pids_stats'].get('current')} processes, CPU {share:.0f}% of a core"


async def engine_disk_free_mib() -> int:
    async with aiodocker.Docker() as docker:
        info = await docker.system.info()
    root = info.get("DockerRootDir") or "/"
    try:
        return shutil.disk_usage(root).free // 2**20
    except OSError:
        return shutil.disk_usage("/").free // 2**20


# -- terminals --


@dataclass
class Terminal:
    ws: aiohttp.ClientWebSocketResponse
    shell: asyncio.Event  # the shell has written something: its prompt
    reader: asyncio.Task[None]


async def open_terminal(
    session: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str]
) -> Terminal:
    ws = await session.ws_connect(
        f"{gateway.url}/api/sandbox/terminal", headers=headers, protocols=[TERMINAL_PROTOCOL]
    )
    shell = asyncio.Event()

    async def read() -> None:
        # Reading all the time also answers the gateway's heartbeat pings.
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                shell.set()

    return Terminal(ws, shell, asyncio.create_task(read()))


def terminal_address(user_index: int) -> str:
    return f"127.0.{1 + user_index // 250}.{1 + user_index % 250}"


@asynccontextmanager
async def open_terminals(
    gateway: Gateway, users: Sequence[str], per_user: int, *, at_once: int, deadline_s: float
) -> AsyncIterator[tuple[list[Terminal], Counter[str]]]:
    """`per_user` terminals of each user, each user connecting from an address of its own, `at_once`
    opening at a time, each waited for until its shell has written something or `deadline_s` from
    now has passed; (those opened, why the others failed). All are closed on the way out."""
    sessions = [client_session(terminal_address(i)) for i in range(len(users))]
    opened: list[Terminal] = []
    failed: Counter[str] = Counter()
    room = asyncio.Semaphore(at_once)
    deadline = asyncio.get_running_loop().time() + deadline_s

    async def open_one(session: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        terminal = None
        try:
            async with asyncio.timeout_at(deadline):
                async with room:
                    terminal = await open_terminal(session, gateway, headers)
                opened.append(terminal)
                shell = asyncio.create_task(terminal.shell.wait())
                await asyncio.wait({shell, terminal.reader}, return_when=asyncio.FIRST_COMPLETED)
                shell.cancel()
                if not terminal.shell.is_set():
                    failed[f"closed {terminal.ws.close_code}"] += 1
        except TimeoutError:
            failed["no shell in time" if terminal else "not open in time"] += 1
        except aiohttp.WSServerHandshakeError as err:
            failed[f"handshake {err.status}"] += 1
        except aiohttp.ClientError as err:
            failed[type(err).__name__] += 1

    try:
        await asyncio.gather(
            *(
                open_one(session, gateway.headers(user))
                for session, user in zip(sessions, users, strict=True)
                for _ in range(per_user)
            )
        )
        yield opened, failed
    finally:
        for terminal in opened:
            terminal.reader.cancel()
        with suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.gather(*(t.ws.close() for t in opened), return_exceptions=True)
        for session in sessions:
            await session.close()


def reasons(failed: Counter[str]) -> str:
    """ " (connect timeout x3, Connection refused x2)", or nothing when nothing failed."""
    return f" ({', '.join(f'{reason} x{n}' for reason, n in failed.most_common())})" if failed else ""
