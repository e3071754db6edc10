"""The "ports" operation: what listens in the sandbox, from the kernel's own tables.

  gateway: J {"op": "ports"}
  agent:   J {"ok": true, "ports": [{"port", "address", "pid", "command"}, ...]}  (one per socket)

/proc/net/tcp and tcp6 list every listening socket of the sandbox's network namespace with its
inode. Which process holds an inode is in /proc/<pid>/fd, which the agent, root without
CAP_SYS_PTRACE, may not read for the user's processes; so a short helper, started as the user like
any of the user's programs, reads its own uid's descriptors and says which pids hold which inodes.
(A process of another uid, such as the agent itself, stays without a pid; the agent's port is left
out anyway.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import sys
from typing import Any

from . import server, spawn
from .protocol import OpError
from .server import Connection

LISTEN = "0A"
# Docker's embedded DNS resolver listens in every sandbox's network namespace on a random port of this
# address: the engine's socket, not the user's server.
DOCKER_DNS = "127.0.0.11"
TABLES = (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6))
HELPER_TIMEOUT_S = 5.0
MAX_COMMAND = 200
# Run as the user: reads inodes from stdin, prints {inode: [pids]} for those it finds.
HELPER = """
import json, os, sys
wanted = set(sys.stdin.read().split())
found = {}
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in wanted:
            found.setdefault(target[8:-1], []).append(int(pid))
print(json.dumps(found))
"""


def _address(hex_address: str, family: int) -> str:
    """/proc/net/tcp's address: the bytes of each 32-bit word in the host's order."""
    raw = bytes.fromhex(hex_address)
    order = sys.byteorder
    words = b"".join(int.from_bytes(raw[i : i + 4], order).to_bytes(4, "big") for i in range(0, len(raw), 4))
    address = ipaddress.IPv4Address(words) if family == 4 else ipaddress.IPv6Address(words)
    return str(address)


def listening() -> list[tuple[int, str, str]]:
    """(port, address, inode) of every listening TCP socket of this network namespace."""
    found = []
    for path, family in TABLES:
        try:
            with open(path) as table:
                lines = table.readlines()[1:]
        except OSError:
            continue  # no IPv6 here
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != LISTEN:
                continue
            hex_address, hex_port = fields[1].split(":")
            port = int(hex_port, 16)
            address = _address(hex_address, family)
            if port != server.PORT and address != DOCKER_DNS:
                found.append((port, address, fields[9]))
    return sorted(found)


async def _holders(inodes: list[str]) -> dict[str, list[int]]:
    """Which of the user's processes hold each inode, as the helper finds them."""
    if not inodes:
        return {}
    tag = spawn.new_tag()
    try:
        helper = await spawn.spawn(
            [sys.executable, "-IS", "-c", HELPER],
            tag=tag,
            env=spawn.base_environment(),
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(HELPER_TIMEOUT_S):
            out, _ = await helper.communicate(" ".join(inodes).encode())
        found = json.loads(out or b"{}")
    except (OSError, TimeoutError, ValueError) as err:
        raise OpError("ports_failed", f"could not list the sandbox's processes: {err!r}") from None
    finally:
        spawn.kill_tagged(tag)
    return found if isinstance(found, dict) else {}


def _command(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read(4096).replace(b"\0", b" ").decode(errors="replace").strip()[:MAX_COMMAND]
    return ""


async def ports(connection: Connection, _: dict[str, Any]) -> None:
    sockets = await asyncio.to_thread(listening)
    holders = await _holders(sorted({inode for _, _, inode in sockets if inode != "0"}))
    listed = []
    for port, address, inode in sockets:
        pids = sorted(holders.get(inode, []))
        pid = pids[0] if pids else None
        command = await asyncio.to_thread(_command, pid) if pid is not None else None
        listed.append({"port": port, "address": address, "pid": pid, "command": command})
    await connection.send_json({"ok": True, "ports": listed})
