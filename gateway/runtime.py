"""What a sandbox gets from its host besides its container's own configuration: the engine's OCI
runtime (runc, or gVisor's runsc), lxcfs's /proc files that show it its own memory and CPUs, and the
CPUs it is pinned to.

Checked before a sandbox starts, so that a host lacking what the settings ask for refuses starts and
says what to fix, rather than starting sandboxes that are weaker or that misstate their limits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker

from .containers import docker_errors
from .errors import HostMisconfigured
from .settings import Settings

log = logging.getLogger(__name__)

# Where Debian's lxcfs package (and lxcfs's own default) mounts its filesystem.
LXCFS_DIR = Path("/var/lib/lxcfs")
# Every file lxcfs computes from the reader's cgroups. cpuinfo, stat and cpu/online count the CPUs of
# the cpuset (and, with --enable-cfs, of the CPU quota); meminfo and swaps follow the memory limit.
LXCFS_FILES = (
    "proc/cpuinfo",
    "proc/diskstats",
    "proc/loadavg",
    "proc/meminfo",
    "proc/stat",
    "proc/swaps",
    "proc/uptime",
    "sys/devices/system/cpu/online",
)
# A FUSE server that hangs would hang whatever reads its files; the check gives up after this.
LXCFS_CHECK_TIMEOUT_S = 2.0
# The CPUs a sandbox is pinned to, on its container: what the next start counts to spread the load.
LABEL_CPUS = "sandbox-gateway.cpus"
# Measured about 10 per task at a fork bomb's peak (1,324 of a 1,344 cgroup for 128 guest tasks; the
# sentry reaps its stubs late under load, and a full cgroup ended the sandbox once in ten loaded
# bombs): 16 and 128 leave two fifths of the cgroup free at that peak.
GVISOR_HOST_PIDS_PER_TASK = 16
GVISOR_HOST_PIDS_AT_REST = 128
RUNSC_DOCS = (
    'add to the engine\'s daemon.json: "runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs":'
    ' ["--platform=ptrace", "--network=host"]}} (apt-get install runsc), then send dockerd SIGHUP;'
    " README, Runtimes"
)


@dataclass(frozen=True)
class Placement:
    """What container_config adds from the host: by default, nothing."""

    cpuset: str = ""
    mounts: tuple[dict[str, Any], ...] = field(default=())
    # Under gVisor, the sandbox's process limit is kept by gVisor itself (see gvisor_pids).
    pids: GvisorPids | None = None

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL_CPUS: self.cpuset} if self.cpuset else {}

    @property
    def host_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"CpusetCpus": self.cpuset}
        if self.pids:
            config["PidsLimit"] = self.pids.host
            config["Ulimits"] = [{"Name": "nproc", "Soft": self.pids.guest, "Hard": self.pids.guest}]
        return config


@dataclass(frozen=True)
class GvisorPids:
    guest: int
    host: int


def gvisor_pids(pids: int) -> GvisorPids:
    """The process limits of a gVisor sandbox of `pids` processes.

    On the ptrace platform every guest process and thread costs the host stub processes and tracer
    threads in the sandbox's pids cgroup (measured with the 2022 runsc: about 50 at rest, then 1.5
    per thread and 9 per process, 10 at a fork bomb's peak), and when the cgroup is full the sentry
    panics ("creating stub process: resource temporarily unavailable") and the whole sandbox dies.
    So the guest's limit is RLIMIT_NPROC, which the sentry counts for its own user namespace alone
    (fork fails with EAGAIN, as under runc's pids cgroup), and the cgroup only bounds the host's
    cost, well above it.
    (Under runc RLIMIT_NPROC would count the uid's processes across every sandbox on the host.)"""
    return GvisorPids(guest=pids, host=pids * GVISOR_HOST_PIDS_PER_TASK + GVISOR_HOST_PIDS_AT_REST)


UNPLACED = Placement()


@dataclass(frozen=True)
class Engine:
    ncpu: int
    # gVisor shows its sandbox its own /proc, which already follows the memory limit and the cpuset.
    gvisor: bool


class SandboxHost:
    def __init__(self, settings: Settings, docker: aiodocker.Docker) -> None:
        self._settings = settings
        self._docker = docker
        # Cached once it passed: a runtime the engine knows stays known until dockerd's configuration
        # changes, and a container created without it then fails with the engine's own words.
        self._engine: Engine | None = None

    async def check(self) -> Engine:
        """The engine's facts; HostMisconfigured when it lacks the runtime or lxcfs is required and
        missing."""
        engine = await self._engine_facts()
        await self._lxcfs_mounts(engine)
        return engine

    async def placement(self) -> Placement:
        engine = await self._engine_facts()
        mounts = await self._lxcfs_mounts(engine)
        cpuset = ""
        if self._settings.sandbox_cpu_pinning == "spread":
            needed = min(engine.ncpu, math.ceil(self._settings.limits.cpus))
            cpuset = least_used_cpus(engine.ncpu, needed, await self._pinned_cpusets())
        pids = gvisor_pids(self._settings.limits.pids) if engine.gvisor else None
        return Placement(cpuset=cpuset, mounts=mounts, pids=pids)

    async def _engine_facts(self) -> Engine:
        if self._engine is None:
            self._engine = await engine_facts(self._docker, self._settings.sandbox_runtime)
            log.info(
                "sandboxes run under runtime %s%s on %d CPUs; lxcfs %s, CPU pinning %s",
                self._settings.sandbox_runtime,
                " (gVisor)" if self._engine.gvisor else "",
                self._engine.ncpu,
                self._settings.sandbox_lxcfs,
                self._settings.sandbox_cpu_pinning,
            )
        return self._engine

    async def _lxcfs_mounts(self, engine: Engine) -> tuple[dict[str, Any], ...]:
        mode = self._settings.sandbox_lxcfs
        if mode == "off" or engine.gvisor:
            # Under gVisor, lxcfs's files would be read by gVisor's file proxy, in its cgroup, and
            # mix with gVisor's own /proc: its own figures are the honest ones there.
            return ()
        if await lxcfs_serving():
            return tuple(
                {"Type": "bind", "Source": str(LXCFS_DIR / name), "Target": f"/{name}", "ReadOnly": True}
                for name in LXCFS_FILES
            )
        if mode == "on":
            raise HostMisconfigured(
                f"SANDBOX_LXCFS=on but lxcfs does not serve {LXCFS_DIR}: apt-get install lxcfs and start"
                f" it (scripts/ensure-lxcfs.sh), or set SANDBOX_LXCFS=auto"
            )
        return ()

    async def _pinned_cpusets(self) -> list[str]:
        """The cpusets of every running sandbox on the engine, of any deployment: they share its CPUs."""
        filters = json.dumps({"label": [LABEL_CPUS], "status": ["running"]})
        with docker_errors("listing pinned sandboxes"):
            listed = await self._docker.containers.list(filters=filters)
        return [container._container["Labels"][LABEL_CPUS] for container in listed]


async def engine_facts(docker: aiodocker.Docker, runtime: str) -> Engine:
    with docker_errors("asking the engine for its runtimes"):
        info = await docker.system.info()
    runtimes: dict[str, Any] = info.get("Runtimes") or {}
    if runtime not in runtimes:
        known = ", ".join(sorted(runtimes)) or "none"
        raise HostMisconfigured(
            f"the Docker engine has no runtime {runtime!r} (SANDBOX_RUNTIME; it knows {known}):"
            + (f" {RUNSC_DOCS}" if runtime == "runsc" else " register it in the engine's daemon.json")
        )
    described = runtimes[runtime]
    program = f"{described.get('path', '')} {described.get('runtimeType', '')}"
    return Engine(ncpu=int(info.get("NCPU") or os.cpu_count() or 1), gvisor="runsc" in program)


def least_used_cpus(ncpu: int, needed: int, pinned: Iterable[str]) -> str:
    """`needed` of CPUs 0..ncpu-1, those the fewest running sandboxes are pinned to (lowest first on
    a tie), as Docker's CpusetCpus. Starts at the same moment may pick the same CPU: the spread is a
    balance, not a reservation."""
    load: Counter[int] = Counter()
    for cpuset in pinned:
        for cpu in _cpus_of(cpuset):
            load[cpu] += 1
    chosen = sorted(range(ncpu), key=lambda cpu: (load[cpu], cpu))[:needed]
    return ",".join(str(cpu) for cpu in sorted(chosen))


def _cpus_of(cpuset: str) -> list[int]:
    cpus: list[int] = []
    for part in cpuset.split(","):
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


async def lxcfs_serving() -> bool:
    """Whether lxcfs is mounted at LXCFS_DIR and answers (a dead lxcfs leaves its mount behind, whose
    files then fail to read with ENOTCONN inside every sandbox)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(_lxcfs_serving), LXCFS_CHECK_TIMEOUT_S)
    except TimeoutError:
        log.warning("lxcfs at %s did not answer within %s s", LXCFS_DIR, LXCFS_CHECK_TIMEOUT_S)
        return False


def _lxcfs_serving() -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            mounted = any(
                line.split()[1:3] == [str(LXCFS_DIR), "fuse.lxcfs"] for line in mounts if line.strip()
            )
        return mounted and (LXCFS_DIR / "proc/meminfo").stat().st_size >= 0
    except OSError:
        return False
