"""The probe of bench/abuse.py: one user's ordinary calls, timed, while something else goes on."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .common import Gateway, quantile

# Two users: a look at a sandbox inspects its container, which Docker makes wait while that same
# container starts an exec; one user for both would measure the probe against itself.
PROBE_USER = "probe"
LOOKING_USER = "looker"
PROBE_ADDRESS = "127.0.0.1"
PROBE_RUN = {"language": "python", "code": "print(1)"}
CALLS = ("/healthz", "GET /api/sandbox", "exec print(1)")
SHORT_CALL_TIMEOUT_S = 5.0
EXEC_CALL_TIMEOUT_S = 20.0
# Between two /healthz (or GET) calls: a few hundred samples a window, without hammering.
PROBE_PAUSE_S = 0.02
# Between two runs: the probe's own runs (dockerd and runc work) should not be most of the load.
EXEC_PAUSE_S = 0.1


@dataclass
class Calls:
    """One kind of call in one case: how long each took (answered or not) and what went wrong."""

    seconds: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.seconds) * 1000 if self.seconds else float("nan")

    @property
    def p99_ms(self) -> float:
        return quantile(self.seconds, 0.99) if self.seconds else float("nan")


Call = Callable[[aiohttp.ClientSession], Awaitable[str | None]]


def client_session(address: str, *, force_close: bool = False) -> aiohttp.ClientSession:
    """A client whose connections leave from `address`, one of loopback's."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=0, force_close=force_close)
    return aiohttp.ClientSession(connector=connector)


async def refusal(response: aiohttp.ClientResponse) -> str | None:
    """None for a 200; else the status and what the body says: the envelope's error code, or the
    parts /healthz found failing."""
    body = await response.read()
    if response.status == 200:
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return str(response.status)
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return f"{response.status} {answer['error'].get('code')}"
    if isinstance(answer, dict):
        failing = [name for name, value in answer.items() if value is False]
        return f"{response.status} {'+'.join(failing)} down" if failing else str(response.status)
    return str(response.status)


def probe_calls(gateway: Gateway) -> dict[str, tuple[Call, float, float]]:
    """Each kind of call: the call, its timeout, the pause after it."""
    headers, looking = gateway.headers(PROBE_USER), gateway.headers(LOOKING_USER)

    async def health(session: aiohttp.ClientSession) -> str | None:
        async with session.get(f"{gateway.url}/healthz") as response:
            return await refusal(response)

    async def look(session: aiohttp.ClientSession) -> str | None:
        async with session.get(f"{gateway.url}/api/sandbox", headers=looking) as response:
            return await refusal(response)

    async def run(session: aiohttp.ClientSession) -> str | None:
        async with session.post(
            f"{gateway.url}/api/sandbox/exec", headers=headers, json=PROBE_RUN
        ) as response:
            if response.status != 200:
                return await refusal(response)
            result = await response.json()
        if result["timed_out"]:
            return "200 timed out"
        return None if result["stdout"] == "1\n" else "200 wrong output"

    return {
        "/healthz": (health, SHORT_CALL_TIMEOUT_S, PROBE_PAUSE_S),
        "GET /api/sandbox": (look, SHORT_CALL_TIMEOUT_S, PROBE_PAUSE_S),
        "exec print(1)": (run, EXEC_CALL_TIMEOUT_S, EXEC_PAUSE_S),
    }


async def timed(calls: Calls, call: Awaitable[str | None], timeout_s: float) -> None:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            error = await call
    except TimeoutError:
        error = "timeout"
    except aiohttp.ClientError as err:
        error = type(err).__name__
    calls.seconds.append(time.perf_counter() - started)
    if error is not None:
        calls.errors[error] += 1


async def probe(gateway: Gateway, seconds: float, until: asyncio.Future[Any] | None) -> dict[str, Calls]:
    """Every kind of call, over and over, for `seconds` (or until `until` is done). A call in flight
    at the end finishes, within its timeout."""
    deadline = time.monotonic() + seconds
    results = {name: Calls() for name in CALLS}

    def going() -> bool:
        return time.monotonic() < deadline and (until is None or not until.done())

    async with client_session(PROBE_ADDRESS, force_close=True) as session:

        async def keep_calling(name: str, call: Call, timeout_s: float, pause_s: float) -> None:
            while going():
                await timed(results[name], call(session), timeout_s)
                await asyncio.sleep(pause_s)

        await asyncio.gather(*(keep_calling(name, *spec) for name, spec in probe_calls(gateway).items()))
    return results


async def warm_up(gateway: Gateway) -> None:
    """python's first start in a fresh sandbox reads its files from disk; the gateway's pools fill."""
    async with client_session(PROBE_ADDRESS) as session:
        for call, timeout_s, _ in probe_calls(gateway).values():
            for _ in range(3):
                await timed(Calls(), call(session), timeout_s)
