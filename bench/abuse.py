"""Abuse: what one hostile client, or a noisy neighbour, does to everyone else's API.

    .venv/bin/python -m bench.abuse [--case NAME ...] [--seconds S]

One gateway (`python -m gateway`) and the probe (bench/probe.py), which for S seconds in each case
keeps calling `/healthz`, one user's `GET /api/sandbox` and another's `POST /api/sandbox/exec`
(python `print(1)`), one call of each kind at a time, each on a new connection (what a client
arriving during the abuse meets):

  quiet      nothing else going on: the baseline, always run first
  idle       5,000 TCP connections from one client that send nothing
  slowloris  1,000 connections from one client, each trickling a POST head (aiohttp's path) a byte a
             second; also how long the gateway takes to close them
  forkbomb   a neighbour's fork bomb, bounded by its sandbox's pids limit
  cpuhog     a neighbour's `yes > /dev/null`, four of them
  disk       a neighbour writing to /workspace for the window, 256 MiB at a time with fsync over one
             file (never more than 256 MiB of the host's disk, 8 GiB written at most; skipped when
             the engine's disk has less than 8 GiB free)
  floods     four `cat /dev/zero` runs in a neighbour's sandbox, with the longest timeout allowed
  terminals  500 open terminal WebSockets across 100 users (100 sandboxes, 5 terminals each)

Each case after a quiet window of its own (half as long), its ratios to that window's figures.
Targets: `/healthz` and `GET /api/sandbox` p99 under 100 ms, the exec p50 within 1.5x of quiet, no
error or timeout in any call, slowloris connections closed within 15 s. Every call has a timeout (a
wedged gateway makes a case fail, not hang); the exit status is 1 if any target is missed.

The gateway runs with MAX_SANDBOXES 110, MAX_TERMINALS_PER_USER 5, EXEC_MAX_TIMEOUT_MS of S + 15 s
(a neighbour's runs, at that timeout, outlast the window) and no exec rate limit (the probe runs
several a second). The hostile client connects from 127.0.0.2, the neighbours from 127.0.0.3 and
each terminal user from an address of its own in 127.0.1.0/24 (all loopback, all to the gateway on
127.0.0.1), so that a bound on connections per client address holds back the abuser, not the probe.
Every container and volume goes at the end, also after a failure or Ctrl-C (the deployment's label,
common.running_gateway); a gateway that does not stop within 30 s of SIGINT is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from gateway.__main__ import raise_open_file_limit

from .common import Gateway, running_gateway, start_sandboxes
from .hostile import (
    ABUSER_ADDRESS,
    connected,
    described,
    engine_disk_free_mib,
    held_connections,
    neighbour,
    open_terminals,
    reasons,
    run,
    sandbox_load,
    trickle,
)
from .probe import CALLS, LOOKING_USER, PROBE_USER, Calls, probe, warm_up

IDLE_CONNECTIONS = 5_000
SLOWLORIS_CONNECTIONS = 1_000
SLOWLORIS_CLOSE_TARGET_S = 15.0
SLOWLORIS_WATCH_S = 20.0
# Never finished: the request line alone takes half a minute at a byte a second.
SLOWLORIS_HEAD = (
    b"POST /api/sandbox/exec HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    + b"X-Slow: y\r\n" * 1000
)
TERMINAL_USERS = 100
TERMINALS_PER_USER = 5
TERMINALS_OPENING_AT_ONCE = 50
# All 500 must have a shell by then; the rest count as failed (a wedged gateway takes them all).
TERMINALS_OPEN_DEADLINE_S = 60.0
CPU_HOGS = 4
FLOODS = 4
DISK_CHUNK_MIB = 256
DISK_CHUNKS = 32  # 8 GiB written at most, never more than one chunk of it on disk
DISK_FREE_FLOOR_MIB = 8192
DISK_FILE = "/workspace/abuse-disk"
# Time for a neighbour's abuse to reach its stride (a fork bomb its pids limit) before the window.
SETTLE_S = 1.0
P99_TARGET_MS = 100.0
# The quiet window before each case, as a share of the case's own.
QUIET_SHARE = 0.5
EXEC_P50_RATIO_TARGET = 1.5

# -- the cases: each an abuse, in force while the probe runs --


@dataclass
class Outcome:
    """What a case's abuse did, beside the probe's figures."""

    notes: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)  # targets the abuse's own figures missed
    until: asyncio.Future[Any] | None = None  # an abuse that ends by itself ends the window too


@dataclass(frozen=True)
class Bench:
    gateway: Gateway
    seconds: float
    max_timeout_ms: int


Case = Callable[[Bench, Outcome], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def quiet(bench: Bench, outcome: Outcome) -> AsyncIterator[None]:
    yield


@asynccontextmanager
async def idle(bench: Bench, outcome: Outcome) -> AsyncIterator[None]:
    async with held_connections(bench.gateway.port, IDLE_CONNECTIONS, ABUSER_ADDRESS) as (held, failed):
        outcome.notes.append(connected(held, IDLE_CONNECTIONS, failed))
        yield
        outcome.notes.append(f"{sum(c.is_open for c in held):,} still open after the window")


@asynccontextmanager
async def slowloris(bench: Bench, outcome: Outcome) -> AsyncIterator[None]:
    count = SLOWLORIS_CONNECTIONS
    async with held_connections(bench.gateway.port, count, ABUSER_ADDRESS) as (held, failed):
        trickling = asyncio.create_task(trickle(held, SLOWLORIS_HEAD))
        try:
            outcome.notes.append(connected(held, count, failed))
            yield
            if held:
                youngest = max(c.opened for c in held)
                await asyncio.sleep(youngest + SLOWLORIS_WATCH_S - time.monotonic())
            lasted = sorted(c.lasted for c in held if c.lasted is not None)
            still_open = len(held) - len(lasted)
            last = f", the last after {lasted[-1]:.1f} s" if lasted else ""
            outcome.notes.append(
                f"closed by the gateway: {len(lasted):,}{last}; still open at {SLOWLORIS_WATCH_S:.0f} s:"
                f" {still_open:,}"
            )
            if still_open or (lasted and lasted[-1] > SLOWLORIS_CLOSE_TARGET_S):
                outcome.missed.append(f"slowloris closed within {SLOWLORIS_CLOSE_TARGET_S:.0f} s")
        finally:
            trickling.cancel()
            with suppress(asyncio.CancelledError):
                await trickling


@asynccontextmanager
async def neighbour_runs(
    bench: Bench,
    outcome: Outcome,
    user: str,
    code: str,
    runs: int = 1,
    *,
    ends_window: bool = False,
    cleanup: str | None = None,
) -> AsyncIterator[None]:
    """`runs` runs of `code` in `user`'s sandbox through the API (each with the longest timeout),
    from before the window to their end; what they were answered, and the sandbox's pids and CPU
    in the window, become notes. `ends_window`: the window ends when the first run does. `cleanup`:
    code run after, whatever happened."""
    gateway = bench.gateway
    async with neighbour(gateway, user) as session:
        tasks = [
            asyncio.create_task(run(session, gateway, user, code, bench.max_timeout_ms)) for _ in range(runs)
        ]
        try:
            await asyncio.sleep(SETTLE_S)
            load = asyncio.create_task(sandbox_load(gateway, user, bench.seconds / 2))
            if ends_window:
                outcome.until = tasks[0]
            yield
            outcome.notes.append(f"{user}'s sandbox in the window: {await load}")
            results = await asyncio.gather(*tasks)
            said = "; ".join(sorted({r.said for r in results if r.said}))
            outcome.notes.append(f"{user}'s runs: {described(results)}" + (f" ({said})" if said else ""))
        finally:
            for task in tasks:
                task.cancel()
            if cleanup is not None:
                await run(session, gateway, user, cleanup, 10_000)


@asynccontextmanager
async def forkbomb(bench: Bench, outcome: Outcome) -> AsyncIterator[None]:
    # The bomb's processes outlive the shell that started them; the sleep keeps the run going
    # through the window (the agent then ends every process of the run). Its "fork: retry"
    # messages would be an output flood of their own: that is the floods case.
    lasting = bench.seconds + SETTLE_S + 1
    code = f"exec 2>/dev/null; sleep {lasting:.0f} & :(){{ :|:& }};:; wait"
    async with neighbour_runs(bench, outcome, "bomber", code):
        yield


@asynccontextmanager
async def cpuhog(bench: Bench, outcome: Outcome) -> AsyncIterator[None]:
    lasting = bench.seconds + SETTLE_S + 1
    code = f"for i in $(seq {CPU_HOGS}); do timeout {lasting:.0f} yes > /dev/null & done; wait"
    async with neighbour_runs(bench, outcome, "hog", code):
        yield


@asynccontextmanager
async def disk(bench: Bench, outcome: Outcome) -> AsyncIterator[None]:
    free_mib = await engine_disk_free_mib()
    if free_mib < DISK_FREE_FLOOR_MIB:
        outcome.notes.append(
            f"skipped: {free_mib:,} MiB free on the engine's disk, under {DISK_FREE_FLOOR_MIB:,}"
        )
        outcome.missed.append("not measured")
        yield
        return
    # Time-bound, over one file: the disk never holds more than a chunk of it.
    lasting = bench.seconds + SETTLE_S
    code = (
        f"end=$((SECONDS + {lasting:.0f})); n=0; while [ $SECONDS -lt $end ] && [ $n -lt {DISK_CHUNKS} ];"
        f" do dd if=/dev/zero of={DISK_FILE} bs=1M count={DISK_CHUNK_MIB} conv=fsync status=none || break;"
        f" n=$((n + 1)); done; rm -f {DISK_FILE}; echo wrote $((n * {DISK_CHUNK_MIB})) MiB in $SECONDS s"
    )
    cleanup = f"rm -f {DISK_FILE}"  # a run cut short leaves its file (the volume itself goes at the end)
    async with neighbour_runs(bench, outcome, "writer", code, ends_window=True, cleanup=cleanup):
        yield


@asynccontextmanager
async def floods(bench: Bench, outcome: Outcome) -> AsyncIterator[None]:
    async with neighbour_runs(bench, outcome, "flooder", "cat /dev/zero", FLOODS):
        yield


@asynccontextmanager
async def terminals(bench: Bench, outcome: Outcome) -> AsyncIterator[None]:
    users = [f"term{i:03d}" for i in range(TERMINAL_USERS)]
    started = time.monotonic()
    await start_sandboxes(bench.gateway, users, at_once=8)
    outcome.notes.append(f"{len(users)} sandboxes started in {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    async with open_terminals(
        bench.gateway,
        users,
        TERMINALS_PER_USER,
        at_once=TERMINALS_OPENING_AT_ONCE,
        deadline_s=TERMINALS_OPEN_DEADLINE_S,
    ) as (opened, failed):
        with_shell = sum(t.shell.is_set() and not t.ws.closed for t in opened)
        outcome.notes.append(
            f"{with_shell} of {len(users) * TERMINALS_PER_USER} terminals open with a shell after"
            f" {time.monotonic() - started:.0f} s{reasons(failed)}"
        )
        yield
        outcome.notes.append(f"{sum(not t.ws.closed for t in opened)} still open after the window")


# Run in this order whatever the command line's: the costliest, and the one that may leave the
# gateway wedged, last.
CASES: dict[str, Case] = {
    "quiet": quiet,
    "idle": idle,
    "slowloris": slowloris,
    "forkbomb": forkbomb,
    "cpuhog": cpuhog,
    "disk": disk,
    "floods": floods,
    "terminals": terminals,
}


@dataclass(frozen=True)
class Row:
    case: str
    calls: dict[str, Calls]
    quiet: dict[str, Calls]  # the quiet window just before the case (the quiet case's: itself)
    outcome: Outcome


async def run_case(bench: Bench, name: str) -> Row:
    print(f"{name} ...", flush=True)
    outcome = Outcome()
    calls = {call: Calls() for call in CALLS}
    # Other work on a shared machine drifts over minutes: each case is compared with a quiet
    # window of its own, just before it, not only with the one at the start.
    quiet = None if name == "quiet" else await probe(bench.gateway, bench.seconds * QUIET_SHARE, None)
    try:
        async with CASES[name](bench, outcome):
            calls = await probe(bench.gateway, bench.seconds, outcome.until)
    except Exception as err:  # one case's failure is a row of the report, not the end of the run
        outcome.missed.append(f"the case failed: {err!r}")
    row = Row(name, calls, quiet or calls, outcome)
    for call, figures in calls.items():
        print(
            f"  {call:<18} p50 {figures.p50_ms:8.1f} ms  p99 {figures.p99_ms:8.1f} ms  {dict(figures.errors)}"
        )
    for note in outcome.notes + outcome.missed:
        print(f"  {note}", flush=True)
    return row


def misses(call: str, figures: Calls, quiet: Calls) -> list[str]:
    missed = [f"{sum(figures.errors.values())} errors"] if figures.errors else []
    if not figures.seconds:
        return [*missed, "no calls"]
    if call == "exec print(1)":
        if figures.p50_ms > EXEC_P50_RATIO_TARGET * quiet.p50_ms:
            missed.append(f"p50 over {EXEC_P50_RATIO_TARGET}x quiet")
    elif figures.p99_ms >= P99_TARGET_MS:
        missed.append(f"p99 not under {P99_TARGET_MS:.0f} ms")
    return missed


def report(rows: Sequence[Row], seconds: float) -> list[str]:
    """Prints the table; returns the targets missed."""
    print(
        f"\nabuse ({seconds:.0f} s a case, after a quiet {seconds * QUIET_SHARE:.0f} s of its own; targets:"
        f" /healthz and GET p99 < {P99_TARGET_MS:.0f} ms,"
    )
    print(
        f"  exec p50 <= {EXEC_P50_RATIO_TARGET}x its quiet p50, no errors,"
        f" slowloris closed within {SLOWLORIS_CLOSE_TARGET_S:.0f} s)"
    )
    print(
        f"  {'case':<11}{'call':<18}{'n':>5}{'p50 ms':>9}{'p99 ms':>9}{'quiet p50':>10}{'p99':>7}"
        f"{'x p50':>7}{'x p99':>7}  {'result':<7}errors"
    )
    missed_all: list[str] = []
    for row in rows:
        for call, figures in row.calls.items():
            base = row.quiet[call]
            missed = misses(call, figures, base)
            missed_all += [f"{row.case} {call}: {m}" for m in missed]
            errors = ", ".join(f"{reason} x{n}" for reason, n in figures.errors.most_common())
            print(
                f"  {row.case:<11}{call:<18}{len(figures.seconds):>5}"
                f"{figures.p50_ms:>9.1f}{figures.p99_ms:>9.1f}{base.p50_ms:>10.1f}{base.p99_ms:>7.0f}"
                f"{figures.p50_ms / base.p50_ms:>7.2f}{figures.p99_ms / base.p99_ms:>7.2f}"
                f"  {'MISSED' if missed else 'ok':<7}{errors}"
            )
        for note in row.outcome.notes:
            print(f"  {'':<11}{note}")
        for miss in row.outcome.missed:
            print(f"  {'':<11}MISSED: {miss}")
            missed_all.append(f"{row.case}: {miss}")
    return missed_all


async def main(cases: Sequence[str], seconds: float) -> None:
    load_before = os.getloadavg()[0]
    before, after = raise_open_file_limit()
    needed = IDLE_CONNECTIONS + SLOWLORIS_CONNECTIONS + TERMINAL_USERS * TERMINALS_PER_USER
    if after < needed:
        raise SystemExit(f"this process may open {after} files (was {before}); the bench needs {needed}")
    # Long enough for a neighbour's run to outlast the window; the probe runs never wait on a bucket.
    max_timeout_ms = int((seconds + 15) * 1000)
    environment = {
        "MAX_SANDBOXES": str(TERMINAL_USERS + 10),
        "MAX_TERMINALS_PER_USER": str(TERMINALS_PER_USER),
        "EXEC_MAX_TIMEOUT_MS": str(max_timeout_ms),
        "RATE_LIMIT_EXECS_PER_MINUTE": "0",
    }
    async with running_gateway(**environment) as gateway:
        await start_sandboxes(gateway, [PROBE_USER, LOOKING_USER])
        await warm_up(gateway)
        bench = Bench(gateway, seconds, max_timeout_ms)
        rows = [await run_case(bench, name) for name in CASES if name == "quiet" or name in cases]
    missed = report(rows, seconds)
    # Other work on the machine moves every figure: say how busy it was.
    print(f"\nload average before the run {load_before:.1f}, after {os.getloadavg()[0]:.1f}")
    if missed:
        print(f"\n{len(missed)} targets missed", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case",
        action="append",
        choices=list(CASES),
        help="run only this case (and quiet, the baseline); may be given more than once",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="of the probe's window in each case")
    arguments = parser.parse_args()
    try:
        asyncio.run(main(arguments.case or list(CASES), arguments.seconds))
    except KeyboardInterrupt:
        sys.exit("interrupted (the gateway stopped, its containers and volumes removed)")
