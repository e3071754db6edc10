"""The preview proxy side by side: direct to the published port, through the gateway (on the path
route /preview/<user>/, at the root of the sandbox's own origin, routed by Host, and at a port's own
origin `<port>-<label>`, through the sandbox's agent to a server on the sandbox's loopback), and
through configurable-http-proxy (JupyterHub's proxy), against the same upstream server in a sandbox.

    .venv/bin/python -m bench.proxy [--seconds S] [--rounds N]

HTTP: wrk against a 2-byte response at 1, 16 and 64 connections (requests/s, p50, p99), and curl
downloading 200 MB (MB/s). WebSocket: one connection, echo round trips one at a time (p50) and
messages/s with 64 in flight, from the same client for all three (ws_echo.js: Node.js and the `ws`
package; a Python client was slower than the proxies it measured). Needs wrk, curl and Node.js on the
host (scripts/bench.sh installs them); CHP and `ws` come from the npm registry into .state/bench/.
Every measurement is taken in interleaved rounds (direct, both gateway routes, CHP, then again) and
the medians are printed: on a shared machine one run alone varies by a fifth. Gateway / CHP is also
given round by round (median, lowest, highest), each round's two runs having met the same minute of
the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiodocker
import aiohttp

from .common import ROOT, Gateway, free_port, running_gateway

UPSTREAM_JS = ROOT / "tests" / "fixtures" / "upstream.js"
NODE_TOOLS = ROOT / ".state" / "bench" / "chp"
WS_ECHO_JS = Path(__file__).with_name("ws_echo.js")
CONNECTIONS = (1, 16, 64)
USER = "bench"
# The path route (/preview/<user>/ on the shared preview origin) and the sandbox's own origin.
GATEWAY_ROUTES = ("gateway", "gateway-root")
# A port reached through the agent, against the default route (the published 5173) it sits beside.
AGENT_ROUTE, AGENT_BASELINE = "gateway-port-via-agent", "gateway-root"
# The second copy of the upstream server, on the sandbox's loopback only: only the agent reaches it.
AGENT_PORT = 8001


@dataclass
class Route:
    name: str
    base: str  # up to and including /preview/bench/
    headers: dict[str, str] = field(default_factory=dict)


async def start_upstream(gateway: Gateway, docker: aiodocker.Docker) -> int:
    """Starts tests/fixtures/upstream.js on 5173 in the bench user's sandbox; returns the published port."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway.url}/api/sandbox", headers=gateway.headers(USER)) as response:
            assert response.status in (200, 201), await response.text()
        async with session.post(
            f"{gateway.url}/api/sandbox/exec",
            headers=gateway.headers(USER),
            json={
                "language": "bash",
                "code": "cat > /workspace/upstream.js",
                "stdin": UPSTREAM_JS.read_text(),
            },
        ) as response:
            assert (await response.json())["exit_code"] == 0
    container = await docker.containers.get(f"{gateway.settings.gateway_name}-{USER}")
    execution = await container.exec(["node", "/workspace/upstream.js"], user="sandbox")
    await execution.start(detach=True)
    loopback = await container.exec(
        ["node", "/workspace/upstream.js"],
        user="sandbox",
        environment=[f"PORT={AGENT_PORT}", "HOST=127.0.0.1"],
    )
    await loopback.start(detach=True)
    info = await container.show()
    port = int(info["NetworkSettings"]["Ports"]["5173/tcp"][0]["HostPort"])
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{port}/preview/{USER}/small") as response:
                    if response.status == 200:
                        return port
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the upstream server did not start")


async def answering(routes: list[Route]) -> None:
    """Waits until every route answers GET small (the loopback server starts beside the first)."""
    async with aiohttp.ClientSession() as session:
        for route in routes:
            for _ in range(100):
                async with session.get(route.base + "small", headers=route.headers) as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"{route.name} does not answer")


def install_node_tools() -> Path:
    """configurable-http-proxy and the `ws` package for ws_echo.js, from the npm registry, once."""
    binary = NODE_TOOLS / "node_modules" / ".bin" / "configurable-http-proxy"
    if not binary.exists() or not (NODE_TOOLS / "node_modules" / "ws").exists():
        NODE_TOOLS.mkdir(parents=True, exist_ok=True)
        npm = [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(NODE_TOOLS),
            "configurable-http-proxy@4",
            "ws@8",
        ]
        subprocess.run(npm, check=True, capture_output=True)
    return binary


@asynccontextmanager
async def chp(target_port: int) -> AsyncIterator[int]:
    """configurable-http-proxy in front of the upstream, installed once from the npm registry."""
    binary = await asyncio.to_thread(install_node_tools)
    port, api_port = free_port(), free_port()
    arguments = [
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-ip",
        "127.0.0.1",
        "--api-port",
        str(api_port),
    ]
    arguments += ["--default-target", f"http://127.0.0.1:{target_port}", "--log-level", "error"]
    process = await asyncio.create_subprocess_exec(
        str(binary), *arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/preview/{USER}/small") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        yield port
    finally:
        process.terminate()
        await process.wait()


def wrk(route: Route, connections: int, seconds: int) -> tuple[float, float, float]:
    """Requests/s, p50 ms and p99 ms of GET small through `route`."""
    command = [
        "wrk",
        "-t",
        "1" if connections == 1 else "2",
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--latency",
    ]
    for name, value in route.headers.items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run(
        [*command, route.base + "small"], check=True, capture_output=True, text=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    return rps, _latency(output, "50%"), _latency(output, "99%")


def _latency(output: str, percentile: str) -> float:
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)", output).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def download(route: Route, megabytes: int) -> float:
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}"]
    for name, value in route.headers.items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run(
        [*command, f"{route.base}big?mb={megabytes}"], check=True, capture_output=True, text=True
    )
    return float(output.stdout) / 1e6


def websocket(route: Route, round_trips: int, messages: int) -> tuple[float, float]:
    """p50 round trip in ms, and messages/s echoed with 64 in flight (ws_echo.js)."""
    url = route.base.replace("http://", "ws://") + "ws"
    output = subprocess.run(
        ["node", str(WS_ECHO_JS), url, json.dumps(route.headers), str(round_trips), str(messages), "64"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "NODE_PATH": str(NODE_TOOLS / "node_modules")},
    ).stdout
    result = json.loads(output)
    return float(result["p50_ms"]), float(result["rate"])


Measured = tuple[float, ...]


def median_of(samples: list[Measured]) -> Measured:
    """The median of each field across rounds."""
    return tuple(statistics.median(field) for field in zip(*samples, strict=True))


Samples = dict[str, dict[str, list[Measured]]]


def measure(routes: list[Route], rounds: int, seconds: int) -> Samples:
    """Every measurement of every route, `rounds` times, the routes taking turns within each round:
    on a shared 2-core machine one run varies by a fifth from minute to minute, and interleaved
    rounds spread that over every route alike. Every other round runs them in reverse order: the
    route that follows another on a hot machine measured up to a tenth slower than when it led."""
    samples: Samples = {r.name: defaultdict(list) for r in routes}
    for number in range(rounds):
        for route in routes if number % 2 == 0 else routes[::-1]:
            for c in CONNECTIONS:
                samples[route.name][f"c={c}"].append(wrk(route, c, seconds))
            samples[route.name]["download"].append((download(route, 200),))
            samples[route.name]["websocket"].append(websocket(route, 5000, 100_000))
    return samples


def medians(samples: Samples) -> dict[str, dict[str, Measured]]:
    return {
        name: {key: median_of(values) for key, values in by_key.items()} for name, by_key in samples.items()
    }


def round_ratios(
    samples: Samples, key: str, index: int, ours: str = "gateway", theirs: str = "configurable-http-proxy"
) -> str:
    """A gateway route / CHP (or `theirs`) within each round, where both met the same minute of the
    machine: the median, and the lowest and highest round."""
    rounds = zip(samples[ours][key], samples[theirs][key], strict=True)
    ratios = sorted(mine[index] / theirs[index] for mine, theirs in rounds)
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


async def preview_host(gateway: Gateway) -> str:
    """The host of the bench user's own preview origin, as the API gives it."""
    url = f"{gateway.url}/api/sandbox"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=gateway.headers(USER)) as response,
    ):
        preview_url: str = (await response.json())["preview_url"]
    return preview_url.split("//", 1)[1].rstrip("/")


async def main(seconds: int, rounds: int) -> None:
    async with running_gateway() as gateway, aiodocker.Docker() as docker:
        upstream_port = await start_upstream(gateway, docker)
        async with chp(upstream_port) as chp_port:
            gateway_port = gateway.port
            root_host = await preview_host(gateway)
            routes = [
                Route("direct", f"http://127.0.0.1:{upstream_port}/preview/{USER}/"),
                Route(
                    "gateway",
                    f"http://127.0.0.1:{gateway_port}/preview/{USER}/",
                    {"Host": gateway.settings.preview_host, **gateway.headers(USER)},
                ),
                # The sandbox's own origin: the dev server at the root, routed by Host.
                Route(
                    "gateway-root",
                    f"http://127.0.0.1:{gateway_port}/",
                    {"Host": root_host, **gateway.headers(USER)},
                ),
                # Another port of the sandbox, at its own origin, through the agent's relay.
                Route(
                    AGENT_ROUTE,
                    f"http://127.0.0.1:{gateway_port}/",
                    {"Host": f"{AGENT_PORT}-{root_host}", **gateway.headers(USER)},
                ),
                Route("configurable-http-proxy", f"http://127.0.0.1:{chp_port}/preview/{USER}/"),
            ]
            await answering(routes)
            samples = await asyncio.to_thread(measure, routes, rounds, seconds)
    report(samples, seconds, rounds)


def report(samples: Samples, seconds: int, rounds: int) -> None:
    results = medians(samples)
    direct = results["direct"]
    print(f"\nMedians of {rounds} interleaved rounds.")
    print(f"\nHTTP GET of 2 bytes (wrk, {seconds} s each)")
    print(
        f"  {'':<26}"
        + "".join(f"{f'c={c} req/s':>14}{'p50 ms':>8}{'p99 ms':>8}{'x':>6}" for c in CONNECTIONS)
    )
    for name, measured in results.items():
        cells = ""
        for c in CONNECTIONS:
            rps, p50, p99 = measured[f"c={c}"]
            cells += f"{rps:>14.0f}{p50:>8.2f}{p99:>8.2f}{rps / direct[f'c={c}'][0]:>6.2f}"
        print(f"  {name:<26}{cells}")
    for ours in GATEWAY_ROUTES:
        added = results[ours]["c=1"][1] - direct["c=1"][1]
        print(f"  {ours} adds {added:.2f} ms to the p50 at c=1")
        for c in CONNECTIONS:
            print(f"  {ours} / CHP req/s at c={c}, per round: {round_ratios(samples, f'c={c}', 0, ours)}")
    for c in CONNECTIONS:
        ratio = round_ratios(samples, f"c={c}", 0, AGENT_ROUTE, AGENT_BASELINE)
        print(f"  {AGENT_ROUTE} / {AGENT_BASELINE} req/s at c={c}, per round: {ratio} (target >= 0.7)")
    print("\nDownload of 200 MB (curl)")
    for name, measured in results.items():
        rate = measured["download"][0]
        print(f"  {name:<26}{rate:>10.0f} MB/s{rate / direct['download'][0]:>8.2f}x")
    print("\nWebSocket echo (one connection; node client with the ws package)")
    print(f"  {'':<26}{'p50 ms':>10}{'msg/s':>10}{'x msg/s':>9}")
    for name, measured in results.items():
        p50, rate = measured["websocket"]
        print(f"  {name:<26}{p50:>10.3f}{rate:>10.0f}{rate / direct['websocket'][1]:>9.2f}")
    for ours in GATEWAY_ROUTES:
        added_ws = results[ours]["websocket"][0] - direct["websocket"][0]
        print(f"  {ours} adds {added_ws:.3f} ms to the round-trip p50")
        print(f"  {ours} / CHP msg/s, per round: {round_ratios(samples, 'websocket', 1, ours)}")
    ratio = round_ratios(samples, "websocket", 1, AGENT_ROUTE, AGENT_BASELINE)
    print(f"  {AGENT_ROUTE} / {AGENT_BASELINE} msg/s, per round: {ratio} (target >= 0.7)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, help="each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.seconds, arguments.rounds))
