"""The egress policy (gateway/egress.py): the rules as data, the rules as the kernel holds them once a
gateway has started, and real connections from a sandbox.

This machine's network rule holds here too: the only addresses a sandbox is sent toward are test
hosts in network namespaces this file creates (a veth pair each, a route on the host for exactly
their /30), and every attempt is preceded by `ip route get` showing the route goes to that veth.
The host, its bridge address, link-local and real private networks are checked as rules only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from gateway.containers import LABEL_GATEWAY
from gateway.egress import EgressGuard
from gateway.egress_rules import BRIDGE_OPTION, Ruleset, Saved, bridge_name, parse_resolvers, rulesets
from gateway.settings import EgressPolicy, IPAddress, Settings, SettingsError

from .helpers import MakeClient, auth, poll, running_container_id
from .test_preview import ready_preview

BRIDGE = "sbxtest000000"
RESOLVER = ipaddress.ip_address("10.255.255.53")
BASE_ENV = {"GATEWAY_JWT_SECRET": "s" * 32, "DATABASE_URL": "postgresql:///x"}


# --- The rules as data -------------------------------------------------------------------------


def verdict(ruleset: Ruleset, chain_rules: tuple[str, ...], address: str, port: int = 80) -> str:
    """What a chain does with the first packet of a new TCP connection to `address`: the first rule
    that matches decides (RETURN lets Docker's rules forward it, REJECT stops it)."""
    target = ipaddress.ip_address(address)
    for rule in chain_rules:
        tokens = rule.split()[2:]
        if "--ctstate" in tokens:
            continue  # a new connection is neither a reply nor addressed to a published port
        if "-o" in tokens and tokens[tokens.index("-o") + 1] == ruleset.bridge:
            continue  # goes out toward the internet, not back onto the bridge
        if "-p" in tokens and tokens[tokens.index("-p") + 1] != "tcp":
            continue
        if "--dport" in tokens and int(tokens[tokens.index("--dport") + 1]) != port:
            continue
        if "-d" in tokens and target not in ipaddress.ip_network(tokens[tokens.index("-d") + 1]):
            continue
        return tokens[tokens.index("-j") + 1]
    return "RETURN"


def public(policy: EgressPolicy | None = None) -> dict[int, Ruleset]:
    return {r.family: r for r in rulesets(policy or EgressPolicy(), BRIDGE, [RESOLVER])}


BLOCKED = [
    "169.254.169.254",  # cloud metadata
    "10.1.2.3",
    "172.18.0.1",  # a Docker bridge address
    "172.17.0.2",  # a container on Docker's default bridge
    "192.168.1.1",
    "100.64.0.1",
    "127.0.0.1",
    "0.0.0.0",  # noqa: S104 - an address to block, not one to bind
    "198.18.0.1",
    "224.0.0.251",
    "255.255.255.255",
    "fd00::2",
    "fe80::1",
    "::1",
    "::ffff:10.0.0.1",
    "ff02::1",
]
REACHED = ["93.184.215.14", "8.8.8.8", "203.0.113.80", "198.51.100.2", "2606:4700::1111", "2001:db8::1"]


@pytest.mark.parametrize("address", BLOCKED)
def test_public_blocks_private_link_local_and_reserved(address: str) -> None:
    ruleset = public()[ipaddress.ip_address(address).version]
    assert verdict(ruleset, ruleset.forward, address) == "REJECT"


@pytest.mark.parametrize("address", REACHED)
def test_public_lets_the_internet_through(address: str) -> None:
    ruleset = public()[ipaddress.ip_address(address).version]
    assert verdict(ruleset, ruleset.forward, address) == "RETURN"


def test_the_host_is_closed_but_for_replies_and_dns() -> None:
    rules = public()[4]
    # Whatever is addressed to the host itself, any of its addresses, is refused...
    for address in ("172.18.0.1", "192.0.2.2", "10.213.0.1", "8.8.8.8"):
        assert verdict(rules, rules.host, address) == "REJECT"
    # ...but replies pass (the preview: docker-proxy's connections to the dev server).
    assert rules.host[0] == f"-A SBX-HOST-{BRIDGE} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    # The resolver Docker's embedded DNS forwards to is private here: port 53 only.
    assert verdict(rules, rules.forward, str(RESOLVER), port=53) == "RETURN"
    assert verdict(rules, rules.forward, str(RESOLVER), port=80) == "REJECT"
    ipv6 = public()[6]
    assert f"-A SBX-HOST-{BRIDGE} -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j RETURN" in ipv6.host
    assert ipv6.host[-1] == f"-A SBX-HOST-{BRIDGE} -j REJECT --reject-with icmp6-adm-prohibited"


def test_other_sandboxes_and_published_ports_stay_closed_whatever_is_allowed() -> None:
    rules = public(EgressPolicy(allow=(ipaddress.ip_network("0.0.0.0/0"),)))[4]
    assert rules.forward[1:3] == (
        f"-A SBX-EGRESS-{BRIDGE} -m conntrack --ctstate DNAT -j REJECT --reject-with icmp-admin-prohibited",
        f"-A SBX-EGRESS-{BRIDGE} -o {BRIDGE} -j REJECT --reject-with icmp-admin-prohibited",
    )


def test_allow_punches_holes_and_deny_adds_blocks() -> None:
    policy = EgressPolicy.from_env(
        {
            "SANDBOX_EGRESS_ALLOW": "10.213.0.0/30, fd00:1::/64",
            "SANDBOX_EGRESS_DENY": "198.51.100.0/24,2001:db8::/32",
        }
    )
    rules = public(policy)
    assert verdict(rules[4], rules[4].forward, "10.213.0.2") == "RETURN"
    assert verdict(rules[4], rules[4].forward, "10.213.0.5") == "REJECT"
    assert verdict(rules[4], rules[4].forward, "198.51.100.2") == "REJECT"
    assert verdict(rules[6], rules[6].forward, "fd00:1::5") == "RETURN"
    assert verdict(rules[6], rules[6].forward, "2001:db8::1") == "REJECT"
    # Each list lands in its own family only, and a listed host address is reachable too.
    assert not any("10.213" in line for line in rules[6].forward)
    assert verdict(rules[4], rules[4].host, "10.213.0.1") == "RETURN"


def test_none_rejects_everything_but_replies_and_ignores_the_lists() -> None:
    policy = EgressPolicy(mode="none", allow=(ipaddress.ip_network("10.213.0.0/30"),))
    rules = public(policy)[4]
    assert rules.forward == (
        f"-A SBX-EGRESS-{BRIDGE} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A SBX-EGRESS-{BRIDGE} -j REJECT --reject-with icmp-admin-prohibited",
    )
    for address in ("8.8.8.8", "10.213.0.2", str(RESOLVER)):
        assert verdict(rules, rules.forward, address, port=53) == "REJECT"
        assert verdict(rules, rules.host, address, port=53) == "REJECT"


def test_open_needs_no_rules() -> None:
    assert rulesets(EgressPolicy(mode="open"), BRIDGE, [RESOLVER]) == []


def test_restore_input_replaces_our_chains_and_adds_only_missing_jumps() -> None:
    rules = public()[4]
    empty = Saved.parse(
        "*filter\n:INPUT ACCEPT [0:0]\n:DOCKER-USER - [0:0]\n-A DOCKER-USER -j RETURN\nCOMMIT\n"
    )
    script = rules.restore_input(empty).splitlines()
    assert script[:3] == ["*filter", f":SBX-EGRESS-{BRIDGE} - [0:0]", f":SBX-HOST-{BRIDGE} - [0:0]"]
    assert f"-I DOCKER-USER 1 -i {BRIDGE} -j SBX-EGRESS-{BRIDGE}" in script
    assert f"-I INPUT 1 -i {BRIDGE} -j SBX-HOST-{BRIDGE}" in script
    assert script[-1] == "COMMIT"
    installed = Saved.parse("\n".join([":SBX-EGRESS-x - [0:0]", *rules.forward, *rules.host, *rules.jumps]))
    assert not any(line.startswith("-I ") for line in rules.restore_input(installed).splitlines())


def test_saved_rules_compare_whatever_the_spelling_of_addresses() -> None:
    ipv6 = public()[6]
    spelt_by_iptables = [line.replace("::ffff:0:0/96", "::ffff:0.0.0.0/96") for line in ipv6.forward]
    saved = Saved.parse(
        "\n".join([f":{c} - [0:0]" for c in ipv6.chains()] + spelt_by_iptables + list(ipv6.host))
    )
    assert saved.chain_rules(ipv6.forward_chain) == list(ipv6.forward)
    assert ipv6.problems(saved) == [f"IPv6 jump missing: {jump}" for jump in ipv6.jumps]


def test_settings_are_validated_and_name_the_variable() -> None:
    assert Settings.from_env(BASE_ENV).egress == EgressPolicy()
    assert EgressPolicy().mode == "public"
    for name, value in (
        ("SANDBOX_NETWORK_MODE", "closed"),
        ("SANDBOX_EGRESS_ALLOW", "10.0.0.1/8"),
        ("SANDBOX_EGRESS_DENY", "example.com"),
        ("SANDBOX_EGRESS_DNS", "10.0.0.0/8"),
        ("SANDBOX_EGRESS_INSTALL", "yes"),
    ):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({**BASE_ENV, name: value})
    policy = Settings.from_env({**BASE_ENV, "SANDBOX_EGRESS_DNS": "", "SANDBOX_EGRESS_INSTALL": "off"}).egress
    assert (policy.dns, policy.install) == ((), False)


def test_resolvers_come_from_resolv_conf_without_loopback() -> None:
    text = "# generated\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\nsearch x\n"
    found: list[IPAddress] = [RESOLVER, ipaddress.ip_address("fe80::1")]
    assert parse_resolvers(text) == found


def test_bridge_name_is_fixed_and_fits_linux() -> None:
    assert bridge_name("sandbox-gateway") == bridge_name("sandbox-gateway")
    assert bridge_name("a") != bridge_name("b")
    assert len(bridge_name("x" * 200)) <= 15


# --- The rules as the kernel holds them --------------------------------------------------------


def iptables(family: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip6tables" if family == 6 else "iptables", *args], capture_output=True, text=True, check=False
    )


def remove_chain(bridge: str) -> None:
    """What a firewall reload does to our rules: the jump and the chain go."""
    assert iptables(4, "-D", "DOCKER-USER", "-i", bridge, "-j", f"SBX-EGRESS-{bridge}").returncode == 0
    assert iptables(4, "-F", f"SBX-EGRESS-{bridge}").returncode == 0
    assert iptables(4, "-X", f"SBX-EGRESS-{bridge}").returncode == 0


async def start_code(client: TestClient, user: str) -> tuple[int, str]:
    response = await client.post("/api/sandbox", headers=auth(user))
    body = await response.json()
    return response.status, body.get("error", {}).get("code", "")


@pytest.mark.docker
@pytest.mark.postgres
async def test_gateway_installs_its_rules_and_names_the_bridge(
    client: TestClient, settings: Settings, docker: aiodocker.Docker
) -> None:
    bridge = bridge_name(settings.sandbox_network)
    guard = EgressGuard(settings.egress, settings.sandbox_network)
    expected = {r.family: r for r in await guard.expected(await guard.current())}
    listed = iptables(4, "-S", f"SBX-EGRESS-{bridge}").stdout.splitlines()
    assert listed == [f"-N SBX-EGRESS-{bridge}", *expected[4].forward]
    assert iptables(4, "-S", f"SBX-HOST-{bridge}").stdout.splitlines() == [
        f"-N SBX-HOST-{bridge}",
        *expected[4].host,
    ]
    assert iptables(4, "-C", "DOCKER-USER", "-i", bridge, "-j", f"SBX-EGRESS-{bridge}").returncode == 0
    assert iptables(4, "-C", "INPUT", "-i", bridge, "-j", f"SBX-HOST-{bridge}").returncode == 0
    assert f"-A SBX-EGRESS-{bridge} -d 169.254.0.0/16 -j REJECT --reject-with icmp-admin-prohibited" in listed
    if 6 in expected:
        assert (
            iptables(6, "-S", f"SBX-HOST-{bridge}").stdout.splitlines()[-1].endswith("icmp6-adm-prohibited")
        )

    assert (await start_code(client, "alice"))[0] == 201
    network = await (await docker.networks.get(settings.sandbox_network)).show()
    assert network["Options"][BRIDGE_OPTION] == bridge
    assert f": {bridge}:" in run("ip", "-o", "link", "show", "dev", bridge)
    health = await client.get("/healthz")
    assert (await health.json())["egress"] is True


@pytest.mark.docker
@pytest.mark.postgres
async def test_a_start_is_refused_while_the_rules_are_missing(
    client: TestClient, make_client: MakeClient, settings: Settings
) -> None:
    remove_chain(bridge_name(settings.sandbox_network))
    assert await start_code(client, "alice") == (503, "egress_not_enforced")

    async def health_says_so() -> bool:
        response = await client.get("/healthz")
        return response.status == 503 and (await response.json())["egress"] is False

    await poll(health_says_so, timeout_s=15)
    # The next gateway to start puts them back, and then the first one starts sandboxes again.
    await make_client()
    assert (await start_code(client, "alice"))[0] == 201


@pytest.mark.docker
@pytest.mark.postgres
async def test_without_install_a_gateway_says_so_at_start_and_refuses(
    make_client: MakeClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.egress"):
        client = await make_client(egress=EgressPolicy(install=False))
    assert any("NOT enforced" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert await start_code(client, "alice") == (503, "egress_not_enforced")
    # The next gateway that may install does, and then starts go through, on either gateway.
    installer = await make_client()
    assert (await start_code(installer, "alice"))[0] == 201
    assert (await start_code(client, "bob"))[0] == 201


@pytest.mark.docker
@pytest.mark.postgres
async def test_a_network_without_the_fixed_bridge_is_refused(
    client: TestClient, settings: Settings, docker: aiodocker.Docker
) -> None:
    """What a gateway from before the egress policy made: its bridge is br-<id>, which no rule names."""
    await docker.networks.create(
        {
            "Name": settings.sandbox_network,
            "Driver": "bridge",
            "Labels": {LABEL_GATEWAY: settings.gateway_name},
        }
    )
    status, code = await start_code(client, "alice")
    assert (status, code) == (503, "egress_not_enforced")


@pytest.mark.docker
@pytest.mark.postgres
async def test_open_mode_removes_the_rules(make_client: MakeClient, settings: Settings) -> None:
    bridge = bridge_name(settings.sandbox_network)
    await make_client()
    assert iptables(4, "-S", f"SBX-EGRESS-{bridge}").returncode == 0
    client = await make_client(egress=EgressPolicy(mode="open"))
    assert iptables(4, "-S", f"SBX-EGRESS-{bridge}").returncode != 0
    assert f"SBX-HOST-{bridge}" not in iptables(4, "-S", "INPUT").stdout
    assert (await start_code(client, "alice"))[0] == 201


# --- Real connections, to test hosts in network namespaces of our own ---------------------------


@dataclass
class NamespaceHost:
    """A host in a network namespace of its own, behind a veth pair: `address` listens on PORT."""

    namespace: str
    veth: str
    address: str
    listener: subprocess.Popen[bytes] | None = None


PORT = 8080


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def make_test_host(prefix: str) -> NamespaceHost:
    """`prefix` is a /30: the host side of the veth takes its first address, the namespace the
    second. The kernel's connected route for the /30 is the only route added on the host."""
    network = ipaddress.ip_network(prefix)
    host_side, far_side = (str(a) for a in list(network.hosts())[:2])
    tag = secrets.token_hex(3)
    host = NamespaceHost(namespace=f"sgegress-{tag}", veth=f"vegh{tag}", address=far_side)
    run("ip", "netns", "add", host.namespace)
    run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", f"vegn{tag}")
    run("ip", "link", "set", f"vegn{tag}", "netns", host.namespace)
    run("ip", "addr", "add", f"{host_side}/30", "dev", host.veth)
    run("ip", "link", "set", host.veth, "up")
    inside = ("ip", "netns", "exec", host.namespace)
    run(*inside, "ip", "addr", "add", f"{far_side}/30", "dev", f"vegn{tag}")
    run(*inside, "ip", "link", "set", f"vegn{tag}", "up")
    run(*inside, "ip", "link", "set", "lo", "up")
    # The sandbox's packets arrive masqueraded to the host side's address, which is on the link;
    # the default route is for anything else, and leads only back into the host.
    run(*inside, "ip", "route", "add", "default", "via", host_side)
    host.listener = subprocess.Popen(
        [*inside, "python3", "-m", "http.server", "--bind", far_side, str(PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return host


def remove_test_host(host: NamespaceHost) -> None:
    if host.listener is not None:
        host.listener.kill()
        host.listener.wait()
    subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, check=False)
    # Gone with its peer already, unless the namespace never got the peer.
    subprocess.run(["ip", "link", "del", host.veth], capture_output=True, check=False)


def assert_routed_to_veth(host: NamespaceHost) -> None:
    """The guard before every attempt: the host routes this address to our veth, nowhere else."""
    route = run("ip", "-o", "route", "get", host.address)
    assert f" dev {host.veth} " in route, f"{host.address} is not routed to {host.veth}: {route}"


@pytest.fixture
def test_hosts() -> Iterator[tuple[NamespaceHost, NamespaceHost]]:
    """A private-range host (10.213.x.y, blocked in `public`) and one on a documentation range
    that `public` does not block (198.51.100.x: never routed on the internet, so it stands for a
    public address here)."""
    made: list[NamespaceHost] = []
    try:
        third = secrets.randbelow(64) * 4
        made.append(make_test_host(f"10.213.{secrets.randbelow(250)}.{third}/30"))
        made.append(make_test_host(f"198.51.100.{third}/30"))
        for host in made:
            assert_routed_to_veth(host)
        yield made[0], made[1]
    finally:
        for host in made:
            remove_test_host(host)


async def listening(host: NamespaceHost) -> bool:
    assert_routed_to_veth(host)
    try:
        _, writer = await asyncio.open_connection(host.address, PORT)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def sandbox_output(docker: aiodocker.Docker, container_id: str, command: list[str]) -> str:
    execution = await docker.containers.container(container_id).exec(command, user="sandbox")
    chunks = []
    async with execution.start(detach=False) as stream:
        while (message := await stream.read_out()) is not None:
            chunks.append(message.data)
    return b"".join(chunks).decode(errors="replace")


# Runs in the sandbox: the HTTP status, or the errno name of the failure.
PROBE = """
import errno, sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except OSError as failure:
    reason = getattr(failure, "reason", failure)
    print(errno.errorcode.get(getattr(reason, "errno", None) or 0, repr(reason)))
"""


async def attempt(docker: aiodocker.Docker, container_id: str, host: NamespaceHost) -> str:
    """From inside the sandbox: "reached" (an HTTP answer from the test host), "rejected" (our
    REJECT, an ICMP administratively-prohibited that the sandbox sees as EHOSTUNREACH), or what
    else happened (a timeout would be a silent drop, not our rules)."""
    assert_routed_to_veth(host)
    said = (
        await sandbox_output(docker, container_id, ["python3", "-c", PROBE, f"http://{host.address}:{PORT}/"])
    ).strip()
    return {"200": "reached", "EHOSTUNREACH": "rejected"}.get(said, f"other: {said}")


@pytest.fixture
async def sandbox(client: TestClient, docker: aiodocker.Docker, settings: Settings) -> str:
    """Alice's running sandbox, with the fixture dev server on its preview."""
    await ready_preview(client, settings, docker)
    return await running_container_id(client, "alice")


@pytest.mark.docker
@pytest.mark.postgres
async def test_connections_from_a_sandbox_in_each_mode(
    client: TestClient,
    make_client: MakeClient,
    settings: Settings,
    docker: aiodocker.Docker,
    test_hosts: tuple[NamespaceHost, NamespaceHost],
    sandbox: str,
) -> None:
    private, public_host = test_hosts
    for host in test_hosts:
        await poll(lambda host=host: listening(host), timeout_s=10)

    async def outcomes() -> tuple[str, str]:
        return await attempt(docker, sandbox, private), await attempt(docker, sandbox, public_host)

    async def preview_answers(gateway: TestClient) -> bool:
        preview = await gateway.get(
            "/preview/alice/echo", headers={"Host": settings.preview_host, **auth("alice")}
        )
        return preview.status == 200

    # The default, `public`, installed by the fixture's gateway.
    assert await outcomes() == ("rejected", "reached")
    assert await preview_answers(client)
    # Each new gateway's policy replaces the rules on the bridge, for the sandbox that runs already.
    cases = [
        (EgressPolicy(allow=(ipaddress.ip_network(f"{private.address}/32"),)), ("reached", "reached")),
        (EgressPolicy(deny=(ipaddress.ip_network(f"{public_host.address}/32"),)), ("rejected", "rejected")),
        (EgressPolicy(mode="none"), ("rejected", "rejected")),
        (EgressPolicy(mode="open"), ("reached", "reached")),
        (EgressPolicy(), ("rejected", "reached")),
    ]
    for policy, expected in cases:
        gateway = await make_client(egress=policy)
        assert await outcomes() == expected, policy
        assert await preview_answers(gateway), policy


@pytest.mark.docker
@pytest.mark.postgres
async def test_npm_reaches_its_registry_in_public_mode(client: TestClient, docker: aiodocker.Docker) -> None:
    """DNS through Docker's embedded resolver (forwarded to a private resolver on this machine) and
    HTTPS to the registry both pass `public`."""
    assert (await start_code(client, "alice"))[0] == 201
    container = await running_container_id(client, "alice")
    said = await sandbox_output(
        docker, container, ["npm", "view", "--fetch-retries=0", "left-pad", "version"]
    )
    assert said.strip() == "1.3.0", said
