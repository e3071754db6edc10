"""The egress policy as kernel rules: what a sandbox may reach (README, "Egress policy").

Every sandbox sits on one bridge whose name the gateway fixes (`bridge_name`), so rules can name it
before the network exists. Two chains of our own per bridge and address family:

    FORWARD -> DOCKER-USER -> -i <bridge> -j SBX-EGRESS-<bridge>   what leaves through the host
    INPUT                  -> -i <bridge> -j SBX-HOST-<bridge>     what is addressed to the host

The rules are data built from the policy (`rulesets`, pure, written exactly as `iptables -S`
prints them), installed in one `iptables-restore --noflush` transaction per family, so a chain is
replaced atomically, and checked by comparing `iptables-save` with them line by line. Nothing is
shell-interpolated: argv lists, and the ruleset on stdin.

Replies always pass (ESTABLISHED,RELATED): the preview is docker-proxy on the host connecting to
the container, whose answers come back through INPUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import EgressNotEnforced
from .settings import EgressPolicy, IPAddress, IPNetwork, SettingsError

log = logging.getLogger(__name__)

BRIDGE_OPTION = "com.docker.network.bridge.name"
ESTABLISHED = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN")
# Addressed to the host and rewritten to somewhere else: another container's published port.
DNAT = ("-m", "conntrack", "--ctstate", "DNAT")
REJECT = {
    4: ("-j", "REJECT", "--reject-with", "icmp-admin-prohibited"),
    6: ("-j", "REJECT", "--reject-with", "icmp6-adm-prohibited"),
}
# Neighbour solicitation and advertisement: without them no IPv6 packet leaves the bridge at all.
NEIGHBOUR_DISCOVERY = (135, 136)
# Not globally reachable, and where an operator's own things live (IANA's special-purpose registries).
# The documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) are left
# out: they are never routed on the internet, so nothing of the operator's is there, and some labs
# (this repository's CI machine among them) put their internet mirror in one. Deny them if yours
# holds something.
BLOCKED_IN_PUBLIC: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT, also cloud-internal (Alibaba's metadata)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local: cloud metadata (169.254.169.254)
        "172.16.0.0/12",  # private, Docker's own networks
        "192.0.0.0/24",  # IETF protocol assignments
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking, used as private space in practice
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
        "::/128",  # unspecified
        "::1/128",  # loopback
        "::ffff:0:0/96",  # IPv4-mapped: the IPv4 ranges above, spelt as IPv6
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated, still routed by some)
        "ff00::/8",  # multicast
    )
)
DOCKER_USER_BOTH = {4: "DOCKER-USER", 6: "DOCKER-USER"}
COMMAND_TIMEOUT_S = 10.0
HEALTH_CACHE_S = 5.0
RESOLV_CONF = Path("/etc/resolv.conf")
# Where Docker itself looks when /etc/resolv.conf names only systemd-resolved's loopback stub.
SYSTEMD_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")


def bridge_name(network: str) -> str:
    """The bridge interface of the sandbox network: fixed by its name, the same on every gateway,
    within Linux's 15 characters."""
    return "sbx" + hashlib.sha256(network.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Ruleset:
    """One address family's rules for one bridge, each line as `iptables-save` prints it."""

    family: int
    bridge: str
    forward: tuple[str, ...]
    host: tuple[str, ...]
    # DOCKER-USER where Docker manages the family's tables (IPv6 only when the engine runs with
    # "ip6tables": true), FORWARD itself otherwise.
    forward_parent: str = "DOCKER-USER"

    @property
    def forward_chain(self) -> str:
        return f"SBX-EGRESS-{self.bridge}"

    @property
    def host_chain(self) -> str:
        return f"SBX-HOST-{self.bridge}"

    @property
    def jumps(self) -> tuple[str, ...]:
        return (
            f"-A {self.forward_parent} -i {self.bridge} -j {self.forward_chain}",
            f"-A INPUT -i {self.bridge} -j {self.host_chain}",
        )

    def chains(self) -> dict[str, tuple[str, ...]]:
        return {self.forward_chain: self.forward, self.host_chain: self.host}

    def restore_input(self, current: Saved) -> str:
        """An iptables-restore --noflush script that makes `current` hold exactly this ruleset:
        our chains declared (created, or emptied) and refilled in one transaction, and each jump
        to them inserted first where it is missing."""
        lines = ["*filter", *(f":{chain} - [0:0]" for chain in self.chains())]
        for rules in self.chains().values():
            lines.extend(rules)
        for jump in self.jumps:
            if jump not in current.rules:
                lines.append(jump.replace("-A ", "-I ", 1).replace(" -i ", " 1 -i ", 1))
        return "\n".join([*lines, "COMMIT", ""])

    def problems(self, current: Saved) -> list[str]:
        """What differs between the kernel's rules and this ruleset, in words."""
        name = f"IPv{self.family}"
        found = []
        for chain, rules in self.chains().items():
            if chain not in current.chains:
                found.append(f"{name} chain {chain} is missing")
            elif current.chain_rules(chain) != list(rules):
                found.append(f"{name} chain {chain} does not hold the rules the policy needs")
        found.extend(f"{name} jump missing: {jump}" for jump in self.jumps if jump not in current.rules)
        return found


def rulesets(
    policy: EgressPolicy,
    bridge: str,
    resolvers: Sequence[IPAddress],
    forward_parents: Mapping[int, str] = DOCKER_USER_BOTH,
) -> list[Ruleset]:
    """The rules `policy` needs on `bridge`, per family in `forward_parents`; none in `open` mode."""
    if policy.mode == "open":
        return []
    return [
        Ruleset(
            family=family,
            bridge=bridge,
            forward=tuple(
                _line(f"SBX-EGRESS-{bridge}", r) for r in _forward(policy, family, bridge, resolvers)
            ),
            host=tuple(_line(f"SBX-HOST-{bridge}", r) for r in _host(policy, family, resolvers)),
            forward_parent=parent,
        )
        for family, parent in forward_parents.items()
    ]


def removal_input(bridge: str, current: Saved) -> str:
    """An iptables-restore --noflush script that removes every trace of `bridge`'s rules: each jump
    to its chains, wherever it is, then the chains."""
    ours = (f"SBX-EGRESS-{bridge}", f"SBX-HOST-{bridge}")
    lines = ["*filter"]
    lines.extend(
        rule.replace("-A ", "-D ", 1)
        for rule in current.rules
        if rule.split()[-1] in ours and rule.split()[1] not in ours
    )
    present = [chain for chain in ours if chain in current.chains]
    lines.extend(f"-F {chain}" for chain in present)
    lines.extend(f"-X {chain}" for chain in present)
    return "\n".join([*lines, "COMMIT", ""])


def _forward(
    policy: EgressPolicy, family: int, bridge: str, resolvers: Sequence[IPAddress]
) -> Iterable[tuple[str, ...]]:
    yield ESTABLISHED
    if policy.mode == "none":
        yield REJECT[family]
        return
    # Before the allow list: no hole reaches another sandbox or a port published on the host.
    yield (*DNAT, *REJECT[family])
    yield ("-o", bridge, *REJECT[family])
    yield from _holes(policy, family, resolvers)
    for network in _of_family(family, (*policy.deny, *BLOCKED_IN_PUBLIC)):
        yield ("-d", str(network), *REJECT[family])


def _host(policy: EgressPolicy, family: int, resolvers: Sequence[IPAddress]) -> Iterable[tuple[str, ...]]:
    yield ESTABLISHED
    if family == 6:
        for icmp_type in NEIGHBOUR_DISCOVERY:
            yield ("-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", str(icmp_type), "-j", "RETURN")
    if policy.mode == "public":
        # A mirror or resolver on one of the host's own addresses is reached only when listed.
        yield from _holes(policy, family, resolvers)
    yield REJECT[family]


def _holes(policy: EgressPolicy, family: int, resolvers: Sequence[IPAddress]) -> Iterable[tuple[str, ...]]:
    for network in _of_family(family, policy.allow):
        yield ("-d", str(network), "-j", "RETURN")
    for resolver in resolvers:
        if resolver.version == family:
            prefix = 32 if family == 4 else 128
            for protocol in ("udp", "tcp"):
                yield (
                    "-d",
                    f"{resolver}/{prefix}",
                    "-p",
                    protocol,
                    "-m",
                    protocol,
                    "--dport",
                    "53",
                    "-j",
                    "RETURN",
                )


def _of_family(family: int, networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    return [network for network in networks if network.version == family]


def _line(chain: str, rule: tuple[str, ...]) -> str:
    return " ".join(("-A", chain, *rule))


def parse_resolvers(text: str) -> list[IPAddress]:
    """The nameservers of a resolv.conf, loopback ones left out (Docker never forwards to those)."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1].split("%")[0])
            except ValueError:
                continue
            if not address.is_loopback:
                found.append(address)
    return found


def host_resolvers() -> list[IPAddress]:
    """Where Docker's embedded DNS forwards the sandboxes' queries: the host's nameservers (read
    the way dockerd reads them). Its queries leave from the container's namespace, through the
    bridge, so a private resolver needs its hole in `public` mode."""
    for path in (RESOLV_CONF, SYSTEMD_RESOLV_CONF):
        try:
            found = parse_resolvers(path.read_text())
        except OSError:
            continue
        if found:
            return found
    return []


@dataclass(frozen=True)
class Saved:
    """The filter table as `iptables-save -t filter` printed it."""

    chains: frozenset[str]
    rules: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Saved:
        lines = text.splitlines()
        chains = frozenset(line[1:].split()[0] for line in lines if line.startswith(":"))
        return cls(
            chains=chains, rules=tuple(_spelt_as_python(line) for line in lines if line.startswith("-A "))
        )

    def chain_rules(self, chain: str) -> list[str]:
        return [rule for rule in self.rules if rule.split(" ", 2)[1] == chain]


def _spelt_as_python(rule: str) -> str:
    """The rule with its addresses written as the ipaddress module writes them (iptables writes
    ::ffff:0.0.0.0/96 where Python writes ::ffff:0:0/96), so that rules compare as text."""
    tokens = rule.split(" ")
    for index in range(1, len(tokens)):
        if tokens[index - 1] in ("-d", "-s"):
            with contextlib.suppress(ValueError):
                tokens[index] = str(ipaddress.ip_network(tokens[index], strict=False))
    return " ".join(tokens)


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
