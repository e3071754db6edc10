"""What disk quotas cost: starts and write throughput with each user's own filesystem vs. without.

    .venv/bin/python -m bench.disk [--runs N]

Two gateways side by side: one with SANDBOX_DISK_MB (its own ext4 image per user, loop-mounted, a
read-only root with tmpfs), one with SANDBOX_DISK_MB=0 (a Docker volume and the container's layer,
as before quotas). Starts: the first start of a new user (the filesystem is made then) and restarts of
a known one, each followed by an untimed stop. Writes: `dd bs=1M count=256 conv=fsync` into
/workspace and into /tmp, as dd reports it. Runs alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import time

import aiohttp

from .common import Gateway, report, running_gateway

DD = "dd if=/dev/zero of={path}/bench.bin bs=1M count=256 conv=fsync 2>&1 | tail -1; rm -f {path}/bench.bin"
# Room for 256 MiB in /tmp's tmpfs, which counts as memory.
ROOMY = {"SANDBOX_TMP_MB": "320", "SANDBOX_MEMORY_MB": "1024"}
SANDBOX_TMP = "/tmp"  # noqa: S108 (inside the sandbox)
THROUGHPUT = re.compile(r"copied, ([0-9.]+) s")


async def start(session: aiohttp.ClientSession, gateway: Gateway, user: str) -> float:
    started = time.perf_counter()
    async with session.post(f"{gateway.url}/api/sandbox", headers=gateway.headers(user)) as response:
        assert response.status == 201, await response.text()
    return time.perf_counter() - started


async def stop(session: aiohttp.ClientSession, gateway: Gateway, user: str) -> None:
    async with session.delete(f"{gateway.url}/api/sandbox", headers=gateway.headers(user)) as response:
        assert response.status == 204, await response.text()


async def write_seconds(session: aiohttp.ClientSession, gateway: Gateway, user: str, path: str) -> float:
    """The seconds dd took for 256 MiB (so that report's ratios read as slowdowns)."""
    body = {"language": "bash", "code": DD.format(path=path), "timeout_ms": 60_000}
    async with session.post(
        f"{gateway.url}/api/sandbox/exec", headers=gateway.headers(user), json=body
    ) as response:
        result = await response.json()
    found = THROUGHPUT.search(result["stdout"])
    assert found, result
    return float(found.group(1))


async def main(runs: int) -> None:
    async with (
        running_gateway(**ROOMY) as quota,
        running_gateway(SANDBOX_DISK_MB="0", **ROOMY) as plain,
        aiohttp.ClientSession() as session,
    ):
        rows: dict[str, list[float]] = {
            "no quota: first start": [],
            "quota: first start": [],
            "no quota: restart": [],
            "quota: restart": [],
        }
        for gateway in (quota, plain):  # warm up: networks, image layers
            await start(session, gateway, "warm")
            await stop(session, gateway, "warm")
        for _ in range(runs):
            for gateway, kind in ((plain, "no quota"), (quota, "quota")):
                user = f"new-{secrets.token_hex(4)}"
                rows[f"{kind}: first start"].append(await start(session, gateway, user))
                await stop(session, gateway, user)
                rows[f"{kind}: restart"].append(await start(session, gateway, user))
                await stop(session, gateway, user)
        report(f"sandbox start ({runs} runs each, alternating)", rows, baseline="no quota: restart")

        writes: dict[str, list[float]] = {
            "no quota: /workspace (volume)": [],
            "quota: /workspace (ext4 image)": [],
            "no quota: /tmp (layer)": [],
            "quota: /tmp (tmpfs)": [],
        }
        for gateway in (plain, quota):
            await start(session, gateway, "writer")
        for _ in range(runs):
            writes["no quota: /workspace (volume)"].append(
                await write_seconds(session, plain, "writer", "/workspace")
            )
            writes["quota: /workspace (ext4 image)"].append(
                await write_seconds(session, quota, "writer", "/workspace")
            )
            writes["no quota: /tmp (layer)"].append(
                await write_seconds(session, plain, "writer", SANDBOX_TMP)
            )
            writes["quota: /tmp (tmpfs)"].append(await write_seconds(session, quota, "writer", SANDBOX_TMP))
        report(
            f"dd bs=1M count=256 conv=fsync: the time dd reports ({runs} runs each; MiB/s = 256000 / ms)",
            writes,
            baseline="no quota: /workspace (volume)",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
