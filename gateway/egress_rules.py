"""The egress policy as kernel rules, as data: what a sandbox may reach (README, "Egress policy").

Every sandbox sits on one bridge whose name the gateway fixes (`bridge_name`), so rules can name it
before the network exists. Two chains of our own per bridge and address family:

    FORWARD -> DOCKER-USER -> -i <bridge> -j SBX-EGRESS-<bridge>   what leaves through the host
    INPUT                  -> -i <bridge> -j SBX-HOST-<bridge>     what is addressed to the host

The rules are built from the policy (`rulesets`, pure, written exactly as `iptables -S` prints
them), and the kernel's are read back as `Saved`, so that the two compare line by line. Installing
and checking them is egress.py's.

Replies always pass (ESTABLISHED,RELATED): the preview is docker-proxy on the host connecting to
the container, whose answers come back through INPUT.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .settings import EgressPolicy, IPAddress, IPNetwork

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
