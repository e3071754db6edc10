"""Requests/s and latency of the API with one gateway process, and with two behind HAProxy.

    .venv/bin/python -m bench.api [--seconds S] [--exec-seconds S] [--users N]

GET /api/sandbox and POST /api/sandbox/exec (`console.log(1)` in node) at 1, 8 and 32 connections,
each against three set-ups in one run: one gateway process directly; the same process behind HAProxy
(what the balancer itself costs); two gateway processes on one database and one Docker engine behind
HAProxy (round robin, health check on /healthz). Every user has a running sandbox.

Load: wrk (C, epoll) with a Lua script, one thread per connection, keep-alive, so that the load
generator takes little of the two cores the gateways, PostgreSQL, dockerd and the sandboxes share; a
Python client would compete for them. Users: GET rotates each connection through every user's token
from its own offset (not one row, not one cached token); exec gives connection i user i, so no user
ever has more than one run in flight and the per-user bound (EXEC_MAX_CONCURRENT_PER_USER, 4 per
gateway process) never answers 429: concurrency 32 is 32 users with one run each, not queueing on
one. Needs wrk and HAProxy (scripts/bench.sh installs both from Debian's packages).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import common
from .common import Gateway, free_port, running_gateways

CONNECTIONS = (1, 8, 32)
CODE = "console.log(1)"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# wrk runs one Lua state per thread; setup() runs in the main one and numbers the threads.
WRK_SCRIPT = r"""
-- wrk runs one Lua state per thread; setup() runs in the main one, numbers the threads and keeps
-- them, so that done() can add up what each thread counted.
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  mode = args[1]
  tokens = {}
  for line in io.lines(args[2]) do tokens[#tokens + 1] = line end
  turn = id
  wrong = 0
  if mode == "exec" then
    wrk.method = "POST"
    wrk.body = args[3]
    wrk.headers["Content-Type"] = "application/json"
  end
end

function request()
  -- exec: this connection's own user; GET: every user in turn, from this connection's offset.
  local user = id
  if mode == "get" then
    user = turn
    turn = turn + 1
  end
  wrk.headers["Authorization"] = "Bearer " .. tokens[user % #tokens + 1]
  return wrk.format()
end

function response(status, headers, body)
  -- A run that answers 200 but timed out, or printed something else, is not a success either.
  if status == 200 and mode == "exec" and not body:find('"stdout": "1\\n"', 1, true) then
    wrong = wrong + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("wrong") end
  io.write(string.format("Wrong answers: %d\n", total))
end
"""

HAPROXY_CONFIG = """
global
    # One thread is plenty at these rates and leaves the cores to the gateways.
    nbthread 1
    maxconn 2048
    stats socket {folder}/haproxy.sock mode 600 level user

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    default-server check inter 1s fall 2 rise 1

frontend one
    bind 127.0.0.1:{one_port}
    default_backend one

frontend two
    bind 127.0.0.1:{two_port}
    default_backend two

backend one
    balance roundrobin
    option httpchk
    http-check send meth GET uri /healthz
    http-check expect status 200
    server a 127.0.0.1:{a_port}

backend two
    balance roundrobin
    option httpchk
    http-check send meth GET uri /healthz
    http-check expect status 200
    server a 127.0.0.1:{a_port}
    server b 127.0.0.1:{b_port}
"""


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    gateway_pids: tuple[int, ...]
    backend: str | None = None  # HAProxy's backend, for the split between its servers


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    gateway_cpu: float  # per cent of one core, every gateway process of the target together
    balancer_cpu: float
    machine_busy: float  # per cent of all cores, whoever used them
    split: str = ""


class HAProxy:
    def __init__(self, folder: Path, process: asyncio.subprocess.Process, one: int, two: int) -> None:
        self.folder = folder
        self.process = process
        self.one_url = f"http://127.0.0.1:{one}"
        self.two_url = f"http://127.0.0.1:{two}"

    async def stats(self) -> list[dict[str, str]]:
        reader, writer = await asyncio.open_unix_connection(str(self.folder / "haproxy.sock"))
        try:
            writer.write(b"show stat\n")
            raw = (await reader.read()).decode()
        finally:
            writer.close()
        return list(csv.DictReader(io.StringIO(raw.removeprefix("# "))))

    async def responses_by_server(self, backend: str) -> dict[str, int]:
        fields = ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other")
        return {
            row["svname"]: sum(int(row[f] or 0) for f in fields)
            for row in await self.stats()
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }


@asynccontextmanager
async def haproxy(a: Gateway, b: Gateway) -> AsyncIterator[HAProxy]:
    """HAProxy from Debian's package, its configuration generated into a scratch folder; waits until
    its health checks pass on every server."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise SystemExit("haproxy not found: apt-get install haproxy (scripts/bench.sh does)")
    one, two = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="sgbench-haproxy-") as scratch:
        folder = Path(scratch)
        config = HAPROXY_CONFIG.format(
            folder=folder, one_port=one, two_port=two, a_port=a.port, b_port=b.port
        )
        (folder / "haproxy.cfg").write_text(config)
        with (folder / "haproxy.log").open("wb") as log:
            # -db: stay in the foreground, as our child.
            process = await asyncio.create_subprocess_exec(
                binary, "-db", "-f", str(folder / "haproxy.cfg"), stdout=log, stderr=log
            )
        balancer = HAProxy(folder, process, one, two)
        try:
            await _wait_until_checked(balancer)
            yield balancer
        finally:
            process.terminate()
            await process.wait()


async def _wait_until_checked(balancer: HAProxy, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if balancer.process.returncode is not None:
            log = (balancer.folder / "haproxy.log").read_text()
            raise RuntimeError(f"haproxy exited with {balancer.process.returncode}:\n{log}")
        try:
            servers = [r for r in await balancer.stats() if r["svname"] not in ("FRONTEND", "BACKEND")]
            if len(servers) == 3 and all(
                r["status"] == "UP" and r["check_status"] == "L7OK" for r in servers
            ):
                return
        except (OSError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"HAProxy's health checks did not pass within {timeout_s} s")
        await asyncio.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


async def wrk(
    target: Target, path: str, mode: str, connections: int, seconds: int, folder: Path
) -> tuple[float, float, float, int, int]:
    """Requests/s, p50 ms, p99 ms, requests, and errors (non-2xx answers and socket errors)."""
    command = [
        "wrk",
        "-t",
        str(connections),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(folder / "api.lua"),
        f"{target.url}{path}",
        "--",
        mode,
        str(folder / "tokens"),
        f'{{"language": "node", "code": "{CODE}"}}',
    ]
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await process.communicate()
    output = out.decode()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed: {err.decode()}{output}")
    rps = float(_find(r"Requests/sec:\s+([\d.]+)", output))
    requests = int(_find(r"(\d+) requests in", output))
    errors = 0
    if non_2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        errors += int(non_2xx.group(1))
    errors += int(_find(r"Wrong answers: (\d+)", output))
    if socket := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        errors += sum(int(n) for n in socket.groups())
    return rps, _latency(output, "50%"), _latency(output, "99%"), requests, errors


def _find(pattern: str, output: str) -> str:
    match = re.search(pattern, output)
    if match is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    return match.group(1)


def _latency(output: str, percentile: str) -> float:
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)\b", output).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def measure(
    target: Target,
    balancer: HAProxy,
    path: str,
    mode: str,
    connections: int,
    seconds: int,
    folder: Path,
) -> Result:
    pids = target.gateway_pids
    balancer_pid = balancer.process.pid
    gateway_before = sum(cpu_seconds(pid) for pid in pids)
    balancer_before = cpu_seconds(balancer_pid)
    busy_before, total_before = machine_ticks()
    split_before = await balancer.responses_by_server(target.backend) if target.backend else {}
    started = time.monotonic()
    rps, p50, p99, requests, errors = await wrk(target, path, mode, connections, seconds, folder)
    wall = time.monotonic() - started
    busy_after, total_after = machine_ticks()
    gateway_cpu = (sum(cpu_seconds(pid) for pid in pids) - gateway_before) / wall * 100
    balancer_cpu = (cpu_seconds(balancer_pid) - balancer_before) / wall * 100
    split = ""
    if target.backend:
        after = await balancer.responses_by_server(target.backend)
        split = "/".join(str(after[name] - split_before.get(name, 0)) for name in sorted(after))
    return Result(
        rps=rps,
        p50_ms=p50,
        p99_ms=p99,
        requests=requests,
        errors=errors,
        gateway_cpu=gateway_cpu,
        balancer_cpu=balancer_cpu if target.backend else 0.0,
        machine_busy=(busy_after - busy_before) / max(1, total_after - total_before) * 100,
        split=split,
    )


async def start_sandboxes(gateway: Gateway, users: Sequence[str]) -> None:
    """Starts every user's sandbox, a few at a time, and runs node once in each (a cold first start
    of node reads its binary from disk)."""
    await common.start_sandboxes(gateway, users)
    room = asyncio.Semaphore(4)
    async with aiohttp.ClientSession() as session:

        async def warm(user: str) -> None:
            body = {"language": "node", "code": CODE}
            async with (
                room,
                session.post(
                    f"{gateway.url}/api/sandbox/exec", headers=gateway.headers(user), json=body
                ) as response,
            ):
                assert (await response.json())["stdout"] == "1\n"

        await asyncio.gather(*(warm(user) for user in users))


ENDPOINTS = {
    "GET /api/sandbox": ("/api/sandbox", "get"),
    "POST /api/sandbox/exec": ("/api/sandbox/exec", "exec"),
}


async def main(durations: dict[str, int], user_count: int) -> None:
    if user_count < max(CONNECTIONS):
        raise SystemExit(
            f"--users must be at least {max(CONNECTIONS)}: exec gives each connection its own user"
        )
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk (scripts/bench.sh does)")
    users = [f"api{i:03d}" for i in range(user_count)]
    results: dict[tuple[str, int, str], Result] = {}
    async with running_gateways(2, MAX_SANDBOXES=str(user_count + 8)) as (a, b), haproxy(a, b) as balancer:
        await start_sandboxes(a, users)
        targets = [
            Target("1 gateway", a.url, (a.pid,)),
            Target("HAProxy + 1 gateway", balancer.one_url, (a.pid,), backend="one"),
            Target("HAProxy + 2 gateways", balancer.two_url, (a.pid, b.pid), backend="two"),
        ]
        with tempfile.TemporaryDirectory(prefix="sgbench-wrk-") as scratch:
            folder = Path(scratch)
            (folder / "api.lua").write_text(WRK_SCRIPT)
            # One secret for both gateways: a token works through either.
            (folder / "tokens").write_text(
                "".join(a.headers(user)["Authorization"].removeprefix("Bearer ") + "\n" for user in users)
            )
            # Warm every path once: HAProxy's server connections, both gateways' pools.
            for path, mode in ENDPOINTS.values():
                await measure(targets[2], balancer, path, mode, 8, 2, folder)
            # Set-ups alternate inside each cell, so that drift on the shared machine hits all alike.
            for endpoint, (path, mode) in ENDPOINTS.items():
                for connections in CONNECTIONS:
                    for target in targets:
                        seconds = durations[mode]
                        result = await measure(target, balancer, path, mode, connections, seconds, folder)
                        results[(endpoint, connections, target.name)] = result
                        print(
                            f"  {endpoint} c={connections} {target.name}: {result.rps:.0f} req/s, "
                            f"p99 {result.p99_ms:.1f} ms",
                            flush=True,
                        )
    report(results, [t.name for t in targets], durations, user_count)


def report(
    results: dict[tuple[str, int, str], Result], targets: list[str], durations: dict[str, int], users: int
) -> None:
    print(f"\nAPI throughput and latency (wrk, {users} users, a wrk thread a connection)")
    header = (
        f"  {'':<24}{'c':>3}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'reqs':>8}{'errs':>7}"
        f"{'gw cpu%':>9}{'lb cpu%':>9}{'host%':>7}  split a/b"
    )
    for endpoint, (_, mode) in ENDPOINTS.items():
        print(f"\n{endpoint} ({durations[mode]} s a cell)")
        print(header)
        for connections in CONNECTIONS:
            for name in targets:
                r = results[(endpoint, connections, name)]
                latency = f"{r.rps:>9.1f}{r.p50_ms:>9.2f}{r.p99_ms:>9.1f}{r.requests:>8}{r.errors:>7}"
                cpu = f"{r.gateway_cpu:>9.0f}{r.balancer_cpu:>9.0f}{r.machine_busy:>7.0f}"
                print(f"  {name:<24}{connections:>3}{latency}{cpu}  {r.split}")
    print("\nTwo gateways behind HAProxy / one gateway alone (req/s ratio; p99 ratio)")
    print(f"  {'':<24}" + "".join(f"{f'c={c}':>16}" for c in CONNECTIONS))
    for endpoint in ENDPOINTS:
        cells = ""
        for c in CONNECTIONS:
            two, one = results[(endpoint, c, targets[2])], results[(endpoint, c, targets[0])]
            cells += f"{two.rps / one.rps:>9.2f}x;{two.p99_ms / one.p99_ms:>5.2f}x"
        print(f"  {endpoint:<24}{cells}")
    print("  (gw cpu%: the target's gateway processes together, in % of one core; host%: all 2 cores,")
    print("   whoever used them, other work on the machine included)")
    failed = [f"{endpoint} c={c} {name}" for (endpoint, c, name), r in results.items() if r.errors]
    if failed:
        # A 429, a 5xx, a timed-out run or an engine that went away: those cells measured something else.
        raise SystemExit("errors in " + "; ".join(failed) + ": those figures are not valid")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="of each GET cell")
    # exec runs at ~10/s on two cores: a cell needs longer for a p99 of more than a handful.
    parser.add_argument("--exec-seconds", type=int, default=20, help="of each exec cell")
    parser.add_argument("--users", type=int, default=32)
    arguments = parser.parse_args()
    asyncio.run(main({"get": arguments.seconds, "exec": arguments.exec_seconds}, arguments.users))
