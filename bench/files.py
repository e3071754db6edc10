"""The files API (gateway/files_api.py, the agent's files.py) side by side with what Docker offers.

    .venv/bin/python -m bench.files [--runs N] [--rounds R]

1 KiB: a write (PUT /api/sandbox/files/content) and a read (GET of the same route) through the
gateway, and a read as the page downloads (POST /files/download-link, then GET of the link with no
token); the same through the gateway's own files.write/files.read straight to the agent (no HTTP,
auth or PostgreSQL: where the gateway's share ends); `docker exec` as user sandbox (read: `cat file`;
write: `sh -c 'cat > file'` with the content on stdin) through aiodocker; and the engine's archive
API, what `docker cp` uses (aiodocker's get_archive / put_archive, a one-file tar). Each path runs in
blocks of ten in turn, the first of a block not kept: a docker exec leaves the engine busy cleaning up
after it returns, and whatever runs next pays for it (see bench/exec.py). p50, p99 and mean.

100 MB of random bytes (incompressible), up and down: through the API (the upload streamed from a
file on the host, the download written to one), through files.write/files.read straight to the
agent, and with the `docker cp` CLI both ways (host file to the workspace and back), in R rounds,
each round running every path once (starting at another path each round), so each round's paths met
the same minute of the machine. MB/s is 10^6 bytes per second; the ratio API / docker cp is given per
round too (median, lowest, highest). With them, the CPU seconds each process on the way used
(/proc/<pid>/stat, the sandbox's cgroup, this process's children for the CLI): on a machine of few
cores the API's extra hops (the gateway, the docker-proxy of the agent's published port) cost
throughput whenever something else wants the cores.

Gateway memory: VmRSS of the gateway process (/proc/<pid>/status), sampled every 5 ms during a
200 MB upload through the API, before it, at its peak and after; VmHWM (the process's high-water mark)
before and after says whether a peak slipped between two samples.

Watch: a WebSocket on /workspace/watched (subprotocol sandbox-files.v1); a background process in the
sandbox (the processes API) creates a file every 200 ms, each named by time.time_ns() just before it
is opened; the client notes time.time_ns() when the "created" event naming it arrives. Sandbox and
host read the same kernel clock, so the difference is the time from the write to the client.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import resource
import statistics
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import aiohttp

from gateway import files
from gateway.agent import AgentAddress
from gateway.files import WriteOptions

from .common import Gateway, quantile, running_gateway
from .exec import agent_address

USER = "bench"
CONTENT = "/api/sandbox/files/content"
SMALL = os.urandom(1024)
# Runs of one path in a row (see the docstring); the first of each is not kept.
BLOCK = 10
BIG_BYTES = 100 * 1000 * 1000
RSS_BYTES = 200 * 1000 * 1000
CHUNK = 1024 * 1024
SANDBOX_UID = 1000
RSS_SAMPLE_S = 0.005
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WATCHED = "/workspace/watched"
WATCH_SPACING_S = 0.2
WRITER = """
import os, time
os.makedirs({folder!r}, exist_ok=True)
time.sleep(0.5)
for _ in range({n}):
    stamp = time.time_ns()
    with open(f"{folder}/{{stamp}}.txt", "w") as f:
        f.write("x")
    time.sleep({spacing})
"""


@dataclass
class Sandbox:
    gateway: Gateway
    session: aiohttp.ClientSession
    headers: dict[str, str]
    container: aiodocker.containers.DockerContainer
    address: AgentAddress

    def url(self, route: str) -> str:
        return f"{self.gateway.url}{route}"


# 1 KiB, each path: a write and a read.


async def api_write(box: Sandbox, path: str, body: bytes) -> None:
    async with box.session.put(box.url(CONTENT), params={"path": path}, headers=box.headers, data=body) as r:
        assert r.status in (200, 201), await r.text()
        await r.read()


async def api_read(box: Sandbox, path: str) -> bytes:
    async with box.session.get(box.url(CONTENT), params={"path": path}, headers=box.headers) as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def link_read(box: Sandbox, path: str) -> bytes:
    """What the page does: a one-use download link (POST), then the download with no token (GET)."""
    async with box.session.post(
        box.url("/api/sandbox/files/download-link"), json={"path": path}, headers=box.headers
    ) as r:
        assert r.status == 201, await r.text()
        url = (await r.json())["url"]
    async with box.session.get(box.url(url)) as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def agent_write(box: Sandbox, path: str, body: bytes) -> None:
    await files.write(box.address, path, _one(body), WriteOptions(), len(body))


async def agent_read(box: Sandbox, path: str) -> bytes:
    async with files.read(box.address, path, None, None) as reading:
        return b"".join([chunk async for chunk in reading.chunks()])


async def exec_write(box: Sandbox, path: str, body: bytes) -> None:
    execution = await box.container.exec(
        ["sh", "-c", f"cat > {path}"], stdin=True, user="sandbox", workdir="/workspace"
    )
    async with execution.start(detach=False) as stream:
        await stream.write_in(body)
        # aiodocker's close() would also drop the connection before the exit; only half-close, as
        # the docker CLI does at the end of its stdin.
        assert stream._resp is not None
        assert stream._resp.connection is not None
        transport = stream._resp.connection.transport
        assert transport is not None
        transport.write_eof()
        while await stream.read_out() is not None:
            pass
    assert (await execution.inspect())["ExitCode"] == 0


async def exec_read(box: Sandbox, path: str) -> bytes:
    execution = await box.container.exec(["cat", path], user="sandbox", workdir="/workspace")
    output = b""
    async with execution.start(detach=False) as stream:
        while (message := await stream.read_out()) is not None:
            output += message.data
    assert (await execution.inspect())["ExitCode"] == 0
    return output


def _tar_of(name: str, body: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.uid, info.gid, info.mode, info.mtime = (
            len(body),
            SANDBOX_UID,
            SANDBOX_UID,
            0o644,
            time.time(),
        )
        tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


async def archive_write(box: Sandbox, path: str, body: bytes) -> None:
    folder, name = path.rsplit("/", 1)
    await box.container.put_archive(folder, _tar_of(name, body))  # type: ignore[no-untyped-call]


async def archive_read(box: Sandbox, path: str) -> bytes:
    tar = await box.container.get_archive(path)
    member = tar.extractfile(tar.getmembers()[0])
    assert member is not None
    return member.read()


SMALL_PATHS: dict[
    str, tuple[Callable[[Sandbox, str, bytes], Awaitable[None]], Callable[[Sandbox, str], Awaitable[bytes]]]
] = {
    "API (PUT/GET content)": (api_write, api_read),
    # Its write is the API's; its read is the page's download.
    "API, read by a link": (api_write, link_read),
    "agent op (no HTTP)": (agent_write, agent_read),
    "docker exec cat": (exec_write, exec_read),
    "docker cp (archive API)": (archive_write, archive_read),
}


async def small(box: Sandbox, runs: int) -> dict[str, dict[str, list[float]]]:
    """{"write"|"read": {path: seconds per run}}."""
    source = "/workspace/bench-read.bin"
    await api_write(box, source, SMALL)
    targets = {name: f"/workspace/bench-write-{i}.bin" for i, name in enumerate(SMALL_PATHS)}
    samples: dict[str, dict[str, list[float]]] = {"write": {}, "read": {}}

    async def timed_write(name: str) -> float:
        started = time.perf_counter()
        await SMALL_PATHS[name][0](box, targets[name], SMALL)
        return time.perf_counter() - started

    async def timed_read(name: str) -> float:
        started = time.perf_counter()
        data = await SMALL_PATHS[name][1](box, source)
        elapsed = time.perf_counter() - started
        assert data == SMALL, (name, len(data))
        return elapsed

    for name in SMALL_PATHS:  # warm every path (a files worker starts on the first call)
        for _ in range(3):
            await timed_write(name)
            await timed_read(name)
    for _ in range(math.ceil(runs / BLOCK)):
        for op, timed in (("write", timed_write), ("read", timed_read)):
            for name in SMALL_PATHS:
                block = [await timed(name) for _ in range(BLOCK + 1)][1:]
                samples[op].setdefault(name, []).extend(block)
    for name in SMALL_PATHS:
        assert await api_read(box, targets[name]) == SMALL, name
    return samples


def latency_table(title: str, rows: Mapping[str, Sequence[float]], baselines: Sequence[str]) -> None:
    print(f"\n{title}")
    ratio_heads = "".join(f"{'x p50 ' + b.split()[1]:>13}" for b in baselines)
    print(f"  {'':<26}{'n':>5}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{ratio_heads}")
    for name, samples in rows.items():
        p50 = statistics.median(samples) * 1000
        ratios = "".join(f"{p50 / (statistics.median(rows[b]) * 1000):>13.2f}" for b in baselines)
        print(
            f"  {name:<26}{len(samples):>5}{p50:>9.2f}{quantile(samples, 0.99):>9.2f}"
            f"{statistics.mean(samples) * 1000:>9.2f}{ratios}"
        )


# 100 MB, each path: an upload from a host file and a download into one.


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            yield chunk


async def api_upload(box: Sandbox, source: Path, target: str) -> None:
    with source.open("rb") as body:
        async with box.session.put(
            box.url(CONTENT), params={"path": target}, headers=box.headers, data=body
        ) as r:
            assert r.status in (200, 201), await r.text()
            await r.read()


async def api_download(box: Sandbox, source: str, target: Path) -> None:
    async with box.session.get(box.url(CONTENT), params={"path": source}, headers=box.headers) as r:
        assert r.status == 200, await r.text()
        with target.open("wb") as out:
            async for chunk in r.content.iter_chunked(CHUNK):
                out.write(chunk)


async def agent_upload(box: Sandbox, source: Path, target: str) -> None:
    await files.write(box.address, target, _file_chunks(source), WriteOptions(), 1 << 40)


async def agent_download(box: Sandbox, source: str, target: Path) -> None:
    async with files.read(box.address, source, None, None) as reading:
        with target.open("wb") as out:
            async for chunk in reading.chunks():
                out.write(chunk)


async def _docker_cp(source: str, target: str) -> None:
    process = await asyncio.create_subprocess_exec("docker", "cp", "-q", source, target)
    assert await process.wait() == 0, (source, target)


async def cp_upload(box: Sandbox, source: Path, target: str) -> None:
    await _docker_cp(str(source), f"{box.container.id}:{target}")


async def cp_download(box: Sandbox, source: str, target: Path) -> None:
    await _docker_cp(f"{box.container.id}:{source}", str(target))


BIG_PATHS: dict[
    str,
    tuple[Callable[[Sandbox, Path, str], Awaitable[None]], Callable[[Sandbox, str, Path], Awaitable[None]]],
] = {
    "API (PUT/GET content)": (api_upload, api_download),
    "agent op (no HTTP)": (agent_upload, agent_download),
    "docker cp (CLI)": (cp_upload, cp_download),
}


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as out:
        for start in range(0, size, CHUNK):
            out.write(os.urandom(min(CHUNK, size - start)))
    return path


@dataclass
class CpuMeter:
    """CPU seconds used so far by each process a transfer goes through: this client, the docker CLI
    (this process's children), the gateway, the docker-proxy of the agent's published port, the
    sandbox (its container's cgroup: the agent, its files worker, the kernel's work for them) and
    dockerd. Processes and cgroups it cannot find count as 0."""

    gateway_pid: int
    proxy_pids: list[int]
    dockerd_pids: list[int]
    sandbox_cgroup: Path | None

    @classmethod
    async def of(cls, box: Sandbox) -> CpuMeter:
        info = await box.container.show()
        proxies = [
            pid
            for pid in _pids_named("docker-proxy")
            if str(box.address.port).encode() in _cmdline(pid).split(b"\0")
        ]
        cgroup = _cpu_cgroup(int(info["State"]["Pid"]))
        return cls(box.gateway.pid, proxies, _pids_named("dockerd"), cgroup)

    def read(self) -> dict[str, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "client": _cpu_of_pid(os.getpid()),
            "docker CLI": children.ru_utime + children.ru_stime,
            "gateway": _cpu_of_pid(self.gateway_pid),
            "docker-proxy": sum(map(_cpu_of_pid, self.proxy_pids)),
            "sandbox": _cgroup_cpu(self.sandbox_cgroup) if self.sandbox_cgroup else 0.0,
            # A docker cp's tar and untar run in a child of dockerd's (docker-untar, up to Docker 23).
            "dockerd": sum(_cpu_of_pid(pid, children=True) for pid in self.dockerd_pids),
        }


def _pids_named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _cpu_of_pid(pid: int, *, children: bool = False) -> float:
    """utime and stime, and with children those of its children it has waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(field) for field in fields[11 : 15 if children else 13])
    return ticks / CLOCK_TICKS


def _cpu_cgroup(pid: int) -> Path | None:
    """The container's cgroup that counts CPU: v1's cpuacct, else v2's unified one."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):
            for mount in ("cpuacct", "cpu,cpuacct"):
                if (candidate := Path("/sys/fs/cgroup", mount, path.lstrip("/"))).is_dir():
                    return candidate
    for line in lines:
        if line.startswith("0::") and (candidate := Path("/sys/fs/cgroup", line[3:].lstrip("/"))).is_dir():
            return candidate
    return None


def _cgroup_cpu(cgroup: Path) -> float:
    if (usage := cgroup / "cpuacct.usage").exists():
        return int(usage.read_text()) / 1e9
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1e6
    return 0.0


@dataclass
class Transfers:
    rates: dict[str, dict[str, list[float]]]  # {"upload"|"download": {path: MB/s per round}}
    cpu: dict[str, dict[str, list[dict[str, float]]]]  # the same, CPU seconds per process


async def big(box: Sandbox, scratch: Path, rounds: int) -> Transfers:
    source = random_file(scratch / "big.bin", BIG_BYTES)
    inside = "/workspace/bench-big.bin"
    await api_upload(box, source, inside)
    meter = await CpuMeter.of(box)
    found = Transfers(
        {direction: {name: [] for name in BIG_PATHS} for direction in ("upload", "download")},
        {direction: {name: [] for name in BIG_PATHS} for direction in ("upload", "download")},
    )

    async def timed(direction: str, name: str, round_: int, run: Awaitable[None]) -> None:
        before, started = meter.read(), time.perf_counter()
        await run
        elapsed, after = time.perf_counter() - started, meter.read()
        if round_:
            found.rates[direction][name].append(BIG_BYTES / elapsed / 1e6)
            used = {part: after[part] - before[part] for part in after}
            found.cpu[direction][name].append(used)

    names = list(BIG_PATHS)
    for round_ in range(rounds + 1):  # round 0 warms every path and is not kept
        # Each round starts at another path: whatever one leaves behind (dirty pages being written
        # back, the engine's clean-up after a docker cp) falls on each path in turn.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            upload, download = BIG_PATHS[name]
            target = f"/workspace/bench-up-{name.split()[0].lower()}.bin"
            await timed("upload", name, round_, upload(box, source, target))
            assert (await files.stat(box.address, target))["size"] == BIG_BYTES, name
            landed = scratch / "down.bin"
            await timed("download", name, round_, download(box, inside, landed))
            assert landed.stat().st_size == BIG_BYTES, name
            landed.unlink()
            await files.delete(box.address, target, False)
    assert await agent_read(box, inside) == source.read_bytes()
    await files.delete(box.address, inside, False)
    source.unlink()
    return found


def cpu_table(title: str, rows: dict[str, list[dict[str, float]]]) -> None:
    parts = list(next(iter(rows.values()))[0])
    print(f"\n{title}")
    print(f"  {'':<26}" + "".join(f"{part:>13}" for part in parts) + f"{'all':>8}")
    for name, used in rows.items():
        medians = [statistics.median(u[part] for u in used) for part in parts]
        print(f"  {name:<26}" + "".join(f"{m:>13.2f}" for m in medians) + f"{sum(medians):>8.2f}")


def rate_table(title: str, rows: dict[str, list[float]], baseline: str) -> None:
    print(f"\n{title}")
    print(f"  {'':<26}{'n':>4}{'median MB/s':>13}{'lowest':>9}{'highest':>9}{'x median':>10}")
    base = statistics.median(rows[baseline])
    for name, rates in rows.items():
        median = statistics.median(rates)
        print(
            f"  {name:<26}{len(rates):>4}{median:>13.1f}{min(rates):>9.1f}{max(rates):>9.1f}"
            f"{median / base:>10.2f}"
        )
    per_round = [a / b for a, b in zip(rows["API (PUT/GET content)"], rows[baseline], strict=True)]
    print(
        f"  API / {baseline} round by round: median {statistics.median(per_round):.2f},"
        f" lowest {min(per_round):.2f}, highest {max(per_round):.2f}"
    )


# Gateway memory during a 200 MB upload.


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


async def rss_during_upload(box: Sandbox, scratch: Path) -> dict[str, float]:
    source = random_file(scratch / "rss.bin", RSS_BYTES)
    pid = box.gateway.pid
    before = memory_kib(pid)
    samples: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(memory_kib(pid)["VmRSS"])
            await asyncio.sleep(RSS_SAMPLE_S)

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    try:
        await api_upload(box, source, "/workspace/bench-rss.bin")
    finally:
        done.set()
        await sampler
    elapsed = time.perf_counter() - started
    await asyncio.sleep(0.5)
    after = memory_kib(pid)
    source.unlink()
    await files.delete(box.address, "/workspace/bench-rss.bin", False)
    return {
        "before": before["VmRSS"] / 1024,
        "peak": max(samples) / 1024,
        "after": after["VmRSS"] / 1024,
        "hwm_before": before["VmHWM"] / 1024,
        "hwm_after": after["VmHWM"] / 1024,
        "samples": len(samples),
        "mb_s": RSS_BYTES / elapsed / 1e6,
    }


# Watch latency.


async def watch_latency(box: Sandbox, n: int) -> list[float]:
    await files.make_folder(box.address, files.FolderBody(path=WATCHED, parents=True))
    latencies: list[float] = []
    async with box.session.ws_connect(
        box.url("/api/sandbox/files/watch"),
        params={"path": WATCHED},
        headers=box.headers,
        protocols=["sandbox-files.v1"],
    ) as ws:
        ready = await ws.receive_json(timeout=10)
        assert ready["type"] == "ready", ready
        code = WRITER.format(folder=WATCHED, n=n, spacing=WATCH_SPACING_S)
        body = {"language": "python", "code": code, "background": True}
        async with box.session.post(box.url("/api/sandbox/processes"), headers=box.headers, json=body) as r:
            assert r.status == 201, await r.text()
        deadline = time.monotonic() + n * WATCH_SPACING_S + 15
        while len(latencies) < n:
            message = await ws.receive_json(timeout=max(0.1, deadline - time.monotonic()))
            received = time.time_ns()
            assert message["type"] == "changes", message
            for change in message["changes"]:
                name = change["path"].rsplit("/", 1)[-1]
                if change["event"] == "created" and name.endswith(".txt"):
                    latencies.append((received - int(name[: -len(".txt")])) / 1e9)
    await files.delete(box.address, WATCHED, True)
    return latencies


async def main(runs: int, rounds: int, watches: int) -> None:
    async with (
        running_gateway() as gateway,
        aiohttp.ClientSession() as session,
        aiodocker.Docker() as docker,
    ):
        headers = gateway.headers(USER)
        async with session.post(f"{gateway.url}/api/sandbox", headers=headers) as response:
            assert response.status in (200, 201), await response.text()
        container = await docker.containers.get(f"{gateway.settings.gateway_name}-{USER}")
        box = Sandbox(gateway, session, headers, container, await agent_address(gateway, USER))
        with tempfile.TemporaryDirectory(prefix="bench-files-") as scratch:
            small_samples = await small(box, runs)
            memory = await rss_during_upload(box, Path(scratch))
            transfers = await big(box, Path(scratch), rounds)
        watch = await watch_latency(box, watches)
    baselines = ("docker exec cat", "docker cp (archive API)")
    for op in ("write", "read"):
        latency_table(f"1 KiB {op} (in alternating blocks of {BLOCK})", small_samples[op], baselines)
    for direction in ("upload", "download"):
        rate_table(f"100 MB {direction} ({rounds} rounds)", transfers.rates[direction], "docker cp (CLI)")
    for direction in ("upload", "download"):
        cpu_table(f"CPU seconds per 100 MB {direction}, by process (median)", transfers.cpu[direction])
    print(
        f"\ngateway VmRSS during a 200 MB upload through the API ({memory['mb_s']:.0f} MB/s,"
        f" {memory['samples']:.0f} samples): before {memory['before']:.1f} MiB,"
        f" peak {memory['peak']:.1f} MiB, after {memory['after']:.1f} MiB;"
        f" VmHWM {memory['hwm_before']:.1f} -> {memory['hwm_after']:.1f} MiB"
    )
    watch.sort()
    print(
        f"\nwatch write-to-client latency ({len(watch)} files, {WATCH_SPACING_S * 1000:.0f} ms apart):"
        f" p50 {statistics.median(watch) * 1000:.1f} ms, p95 {quantile(watch, 0.95):.1f} ms,"
        f" max {watch[-1] * 1000:.1f} ms, min {watch[0] * 1000:.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="1 KiB runs per path and operation")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the 100 MB transfers")
    parser.add_argument("--watches", type=int, default=50, help="files written under the watch")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.runs, arguments.rounds, arguments.watches))
