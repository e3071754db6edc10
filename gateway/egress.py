"""The egress policy in the kernel: installing and checking egress_rules' rules, and a CLI.

Each family's rules go in one `iptables-restore --noflush` transaction, so a chain is replaced
atomically, and are checked by comparing `iptables-save` with them line by line. Nothing is
shell-interpolated: argv lists, and the ruleset on stdin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .egress_rules import (
    Ruleset,
    Saved,
    bridge_name,
    host_resolvers,
    removal_input,
    rulesets,
)
from .errors import EgressNotEnforced
from .settings import EgressPolicy, SettingsError

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 10.0
HEALTH_CACHE_S = 5.0


def ipv6_enabled() -> bool:
    return Path("/proc/net/if_inet6").exists()


class CommandFailed(Exception):
    pass


async def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as err:
        raise CommandFailed(f"{argv[0]}: {err.strerror}") from err
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            stdout, stderr = await process.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise CommandFailed(f"{argv[0]} did not finish within {COMMAND_TIMEOUT_S:.0f} s") from None
    if process.returncode != 0:
        said = stderr.decode(errors="replace").strip()
        raise CommandFailed(f"{argv[0]}: {said or f'exit status {process.returncode}'}")
    return stdout.decode()


def _tool(family: int, name: str) -> str:
    return f"{'ip6tables' if family == 6 else 'iptables'}-{name}"


async def _saved(family: int) -> Saved:
    return Saved.parse(await _run([_tool(family, "save"), "-t", "filter"]))


async def _restore(family: int, script: str) -> None:
    await _run([_tool(family, "restore"), "--noflush", "--wait"], stdin=script)


class EgressGuard:
    """Installs and checks the rules of this deployment's policy. Starts read the kernel's rules
    again every time; only /healthz takes a verdict up to HEALTH_CACHE_S old."""

    def __init__(self, policy: EgressPolicy, network: str) -> None:
        self.policy = policy
        self.bridge = bridge_name(network)
        self._health: tuple[bool, float] | None = None
        self._health_lock = asyncio.Lock()

    async def holds_recently(self) -> bool:
        """Whether the rules held at a check no older than HEALTH_CACHE_S: health checks come
        often, and each check is two processes."""
        async with self._health_lock:
            if self._health is None or time.monotonic() - self._health[1] > HEALTH_CACHE_S:
                self._health = (not await self.problems(), time.monotonic())
            return self._health[0]

    async def current(self) -> dict[int, Saved]:
        """The filter tables, IPv4 and (where the kernel has it) IPv6."""
        families = (4, 6) if await asyncio.to_thread(ipv6_enabled) else (4,)
        return {family: await _saved(family) for family in families}

    async def expected(self, current: Mapping[int, Saved]) -> list[Ruleset]:
        resolvers = self.policy.dns
        if resolvers is None:
            resolvers = tuple(await asyncio.to_thread(host_resolvers))
        parents = {
            family: "DOCKER-USER" if "DOCKER-USER" in saved.chains else "FORWARD"
            for family, saved in current.items()
        }
        return rulesets(self.policy, self.bridge, resolvers, parents)

    async def install(self) -> None:
        """Makes the kernel hold exactly this policy's rules; in `open` mode, removes ours."""
        try:
            if self.policy.mode == "open":
                await self.remove()
                return
            current = await self.current()
            for ruleset in await self.expected(current):
                await _restore(ruleset.family, ruleset.restore_input(current[ruleset.family]))
        except CommandFailed as err:
            raise EgressNotEnforced(f"could not install the egress rules: {err}") from err

    async def remove(self) -> None:
        """Removes this bridge's chains and the jumps to them, in both families."""
        for family, saved in (await self.current()).items():
            await _restore(family, removal_input(self.bridge, saved))

    async def problems(self) -> list[str]:
        """Why the kernel does not enforce the policy; empty when it does."""
        if self.policy.mode == "open":
            return []
        try:
            current = await self.current()
        except CommandFailed as err:
            return [f"cannot read the rules ({err}): the check needs CAP_NET_ADMIN"]
        found = []
        for ruleset in await self.expected(current):
            found.extend(ruleset.problems(current[ruleset.family]))
        return found

    async def require(self) -> None:
        """Raises EgressNotEnforced unless the kernel enforces the policy."""
        found = await self.problems()
        if found:
            raise EgressNotEnforced(
                f"sandboxes are not started: the egress policy {self.policy.mode!r} is not enforced"
                f" ({'; '.join(found)}); the operator must install its rules (README, Egress policy)"
            )


async def install_at_start(guard: EgressGuard) -> None:
    """The gateway's start: installs the rules where it may, then says whether they hold."""
    policy = guard.policy
    if policy.install:
        began = time.perf_counter()
        try:
            await guard.install()
            log.info(
                "egress policy %s: rules for bridge %s installed in %.0f ms",
                policy.mode,
                guard.bridge,
                (time.perf_counter() - began) * 1000,
            )
        except EgressNotEnforced as err:
            # The check below says what this leaves missing, as an error.
            log.warning("%s", err.message)
    found = await guard.problems()
    if found:
        log.error(
            "egress policy %s is NOT enforced, no sandbox will start until it is: %s",
            policy.mode,
            "; ".join(found),
        )
    elif policy.mode == "open":
        log.warning("egress policy open: sandboxes reach the host, its networks and cloud metadata")
    else:
        log.info("egress policy %s is enforced on bridge %s", policy.mode, guard.bridge)


def main(argv: Sequence[str] = sys.argv[1:]) -> int:
    """`python -m gateway.egress install|check|remove|show`, with the gateway's settings from the
    environment (SANDBOX_NETWORK and the egress ones): for a set-up that runs as root while the
    gateway does not."""
    commands = ("install", "check", "remove", "show")
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: python -m gateway.egress {'|'.join(commands)}", file=sys.stderr)
        return 2
    try:
        policy = EgressPolicy.from_env(os.environ)
    except SettingsError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    guard = EgressGuard(policy, os.environ.get("SANDBOX_NETWORK", "sandbox-gateway"))
    return asyncio.run(_command(guard, argv[0]))


async def _command(guard: EgressGuard, command: str) -> int:
    if command == "show":
        for ruleset in await guard.expected(await guard.current()):
            print(f"# IPv{ruleset.family}, bridge {ruleset.bridge}")
            print("\n".join((*ruleset.forward, *ruleset.host, *ruleset.jumps)))
        return 0
    try:
        if command == "install":
            await guard.install()
        elif command == "remove":
            await guard.remove()
    except (EgressNotEnforced, CommandFailed) as err:
        print(err, file=sys.stderr)
        return 1
    found = await guard.problems() if command != "remove" else []
    for problem in found:
        print(problem, file=sys.stderr)
    if not found and command != "remove":
        print(f"egress policy {guard.policy.mode} is enforced on bridge {guard.bridge}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
