"""Configuration, read once from the environment into an immutable Settings."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "EdDSA"})
DEFAULT_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MIN_DISK_MB = 16
# A DNS name of at least two labels, with an optional port: what a wildcard *.<domain> can cover.
PREVIEW_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{1,63}(?::\d{1,5})?"
)

# What dockerd accepts as a runtime's name in its configuration.
RUNTIME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LXCFS_MODES = ("auto", "on", "off")
CPU_PINNING_MODES = ("spread", "off")


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NETWORK_MODES = ("none", "public", "open")


@dataclass(frozen=True, kw_only=True)
class EgressPolicy:
    """What a sandbox may reach (README, "Egress policy"); the rules that enforce it: egress_rules.py."""

    # none: nothing; public: the internet but not the host, link-local or private ranges; open: all.
    mode: str = "public"
    # Holes in what `public` blocks (an internal package mirror), and blocks on top of it.
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    # The resolvers Docker's embedded DNS forwards to, reachable on port 53 in `public` mode (they are
    # often private addresses). None: the host's, from /etc/resolv.conf, read when rules are made.
    dns: tuple[IPAddress, ...] | None = None
    # Whether the gateway installs the rules at start (it needs CAP_NET_ADMIN); off: the set-up does.
    install: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EgressPolicy:
        return cls(
            mode=_choice(env, "SANDBOX_NETWORK_MODE", "public", NETWORK_MODES),
            allow=_networks(env, "SANDBOX_EGRESS_ALLOW"),
            deny=_networks(env, "SANDBOX_EGRESS_DENY"),
            dns=_addresses(env, "SANDBOX_EGRESS_DNS") if "SANDBOX_EGRESS_DNS" in env else None,
            install=_choice(env, "SANDBOX_EGRESS_INSTALL", "auto", ("auto", "off")) == "auto",
        )

    def __post_init__(self) -> None:
        if self.mode not in NETWORK_MODES:
            raise SettingsError(f"SANDBOX_NETWORK_MODE must be one of {', '.join(NETWORK_MODES)}")


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    memory_mb: int = 512
    cpus: float = 1.0
    pids: int = 256


@dataclass(frozen=True, kw_only=True)
class DiskSettings:
    """What a sandbox may write (README, "Disk quotas")."""

    # Each user's own ext4 filesystem, holding /workspace and /home/sandbox; 0: no quota at all (an
    # unbounded Docker volume and a writable container layer, as before quotas), unsafe.
    size_mb: int = 2048
    # Where the filesystems' image files and mount points live, on the engine's host.
    directory: str = "/var/lib/sandbox-gateway/disks"
    # /tmp and /var/tmp inside: tmpfs of this size each, whose pages count as the sandbox's memory.
    tmp_mb: int = 256
    # Starts are refused while the disks' or Docker's filesystem has less free space than this; 0: off.
    min_free_mb: int = 2048

    @property
    def quota(self) -> bool:
        return self.size_mb > 0


@dataclass(frozen=True, kw_only=True)
class ExecSettings:
    default_timeout_ms: int = 10_000
    max_timeout_ms: int = 60_000
    max_output_bytes: int = 1024 * 1024
    # Code travels as one argv string, which Linux caps at 128 KiB (MAX_ARG_STRLEN).
    max_code_bytes: int = 100 * 1024
    max_stdin_bytes: int = 1024 * 1024
    max_concurrent_per_user: int = 4


@dataclass(frozen=True, kw_only=True)
class ProcessSettings:
    """The processes API (processes.py, README "Processes"); the agent keeps the processes and
    enforces the first four, so they hold across gateways."""

    # Running at once in one user's sandbox (background and foreground).
    max_per_user: int = 16
    # Output kept per process for readers who come later; past it the oldest bytes are dropped.
    max_buffer_bytes: int = 1024 * 1024
    # How long an ended process stays listed with its exit code and output, and how many are kept.
    retention_s: int = 600
    max_ended_per_user: int = 32
    # Output streams (SSE) open at once per user, per gateway process.
    max_streams_per_user: int = 8
    # A foreground process's timeout when none is given, and the longest one.
    default_timeout_ms: int = 60_000
    max_timeout_ms: int = 3_600_000
    max_env_vars: int = 64
    max_env_bytes: int = 32 * 1024
    # A comment line on an idle stream this often, so that proxies keep it open.
    heartbeat_s: float = 15.0


@dataclass(frozen=True, kw_only=True)
class FileSettings:
    """The files API (files.py, README "Files"). Each sandbox's disk quota bounds what it may hold;
    these bound what one call may ask of the agent and the gateway."""

    # One file written (PUT, or a part of an upload): past it 413, and the file stays as it was.
    max_write_bytes: int = 1024 * 1024 * 1024
    # A listing's entries, and how deep a recursive one goes.
    max_list_entries: int = 10_000
    max_list_depth: int = 32
    # Files in one upload.
    max_upload_files: int = 1000
    # Uploads, downloads and archives streaming at once per user, per gateway process.
    max_streams_per_user: int = 8
    # Watches at once in one sandbox (its agent enforces it), and folders one watch may follow.
    max_watches_per_sandbox: int = 8
    max_watch_folders: int = 8192


@dataclass(frozen=True, kw_only=True)
class TerminalSettings:
    """Terminals kept by each sandbox's agent (README, "The web terminal"); sent with every open."""

    # How long a terminal opened with sandbox-terminal.v2 lives with no socket attached.
    grace_s: int = 300
    # The recent output replayed to a socket that attaches (at least 64 KiB: a screen and then some).
    replay_bytes: int = 256 * 1024
    # Terminals a sandbox may hold, attached or detached.
    max_per_sandbox: int = 10
    # A socket with this much output unsent holds the shell's output up; if it takes nothing for
    # viewer_stall_s, it is dropped (close code 4008) and the shell goes on.
    viewer_buffer_bytes: int = 256 * 1024
    viewer_stall_s: int = 10


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    """A token bucket: `per_minute` actions a minute on average, and as many in a burst; 0 is no limit."""

    per_minute: int

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Either a shared secret (HS*) or a public key file (RS*/ES*/PS*/EdDSA); the algorithm is pinned here.
    jwt_algorithm: str = "HS256"
    jwt_key: str = field(repr=False)
    database_url: str = field(repr=False)
    docker_host: str | None = None
    # Names this deployment's containers, volumes and network; labels carry it too.
    gateway_name: str = "sandbox-gateway"
    sandbox_image: str = "sandbox-gateway/sandbox:latest"
    sandbox_network: str = "sandbox-gateway"
    ca_bundle: str | None = DEFAULT_CA_BUNDLE
    # The engine's OCI runtime for sandboxes, by the name the engine knows it: runc, or runsc (gVisor).
    sandbox_runtime: str = "runc"
    # lxcfs's /proc files over the sandbox's (runc only): "auto" when lxcfs is mounted, "on" (refuse to
    # start sandboxes without it), "off".
    sandbox_lxcfs: str = "auto"
    # Each sandbox on ceil(cpus) of the engine's CPUs, the least used ones ("spread"), or on all ("off").
    sandbox_cpu_pinning: str = "spread"
    max_sandboxes: int = 50
    limits: SandboxLimits = SandboxLimits()
    disk: DiskSettings = DiskSettings()
    idle_timeout_s: float = 1800
    reaper_interval_s: float = 60
    # last_activity is written at most this often per user (and per terminal) by ordinary use.
    activity_interval_s: float = 5.0
    exec: ExecSettings = ExecSettings()
    processes: ProcessSettings = ProcessSettings()
    files: FileSettings = FileSettings()
    egress: EgressPolicy = EgressPolicy()
    # Where browsers reach the page and API. Previews are served on a sibling origin of the same domain
    # and port (README, "Preview isolation"), which is why the default is a name, not 127.0.0.1.
    public_url: str = "http://sandbox.localhost:8080"
    # Where browsers reach path previews (/preview/<user>/); by default preview.<host of public_url>,
    # same scheme and port.
    preview_url: str | None = None
    # Each sandbox's own preview origin is <label>.<preview_domain> (host[:port]), with the preview
    # URL's scheme; by default the host of the preview URL. Needs a wildcard DNS name (and certificate).
    preview_domain: str | None = None
    # A stopped sandbox's owner opening its preview: "ask" (a Start button), "auto" (start it), "off".
    preview_wake: str = "ask"
    # Share links of a preview: the longest lifetime one may ask for, and how many may be live per user.
    share_max_lifetime_s: int = 7 * 24 * 3600
    max_shares_per_user: int = 20
    # How long a dev server may take to start answering a preview request before the gateway says 504.
    preview_response_timeout_s: float = 30.0
    # Connections open at once per sandbox through its agent to its ports (<port>-<label> origins,
    # and 5173 when its dev server listens on loopback only); the agent caps it at 1024.
    preview_port_relays: int = 256
    # Origins besides the gateway's own from which browsers may open WebSockets (terminal, preview HMR).
    allowed_origins: frozenset[str] = frozenset()
    max_terminals_per_user: int = 5
    terminal: TerminalSettings = TerminalSettings()
    # Per user, across every gateway on the database.
    start_rate: RateLimit = RateLimit(per_minute=20)
    exec_rate: RateLimit = RateLimit(per_minute=600)
    # The longest a user's token may live (exp - iat); None: no cap.
    max_token_lifetime_s: int | None = None
    # A token whose `admin_claim` holds `admin_value` (alone or in a list) may administer every sandbox.
    admin_claim: str = "role"
    admin_value: str = "admin"
    # /metrics on the main listener answers only to this bearer token; unset, it is not served there.
    metrics_token: str | None = field(default=None, repr=False)
    # A second listener (host:port) that serves /metrics alone, without a token: for a private network.
    metrics_address: tuple[str, int] | None = None
    # "json" (one object per line) or "text".
    log_format: str = "json"
    # Client connections (connections.py): the time a request head may take, how many connections
    # one peer address may hold (0: no bound), how many all may hold (None: from the open-file limit).
    header_timeout_s: float = 10.0
    max_connections_per_client: int = 256
    max_connections: int | None = None

    # Cached: the preview proxy asks for these on every request, and Settings never changes.
    @cached_property
    def public_origin(self) -> str:
        """scheme://host[:port] of the page and API, as browsers see it (also behind a proxy)."""
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"

    @cached_property
    def public_host(self) -> str:
        return urlsplit(self.public_url).netloc

    @cached_property
    def preview_origin(self) -> str:
        if self.preview_url:
            parts = urlsplit(self.preview_url)
            return f"{parts.scheme}://{parts.netloc}"
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://preview.{parts.netloc}"

    @cached_property
    def preview_host(self) -> str:
        return urlsplit(self.preview_origin).netloc

    @cached_property
    def preview_scheme(self) -> str:
        return urlsplit(self.preview_origin).scheme

    @cached_property
    def preview_root_suffix(self) -> str:
        """What every sandbox's own preview host ends with: "." and the preview domain, lower case."""
        return "." + (self.preview_domain or self.preview_host).lower()

    def on_preview_domain(self, host: str) -> bool:
        """Whether a Host names some sandbox's own preview origin (well-formed or not)."""
        return host.lower().endswith(self.preview_root_suffix)

    def preview_root_origin(self, label: str) -> str:
        return f"{self.preview_scheme}://{label}{self.preview_root_suffix}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            host=env.get("GATEWAY_HOST", "127.0.0.1"),
            port=_int(env, "GATEWAY_PORT", 8080, minimum=0),
            jwt_algorithm=env.get("GATEWAY_JWT_ALGORITHM", "").strip() or _default_algorithm(env),
            jwt_key=_jwt_key(env),
            database_url=_required(env, "DATABASE_URL"),
            docker_host=env.get("DOCKER_HOST") or None,
            gateway_name=env.get("GATEWAY_NAME", "sandbox-gateway"),
            sandbox_image=env.get("SANDBOX_IMAGE", "sandbox-gateway/sandbox:latest"),
            sandbox_network=env.get("SANDBOX_NETWORK", "sandbox-gateway"),
            ca_bundle=_ca_bundle(env),
            sandbox_runtime=env.get("SANDBOX_RUNTIME", "").strip() or "runc",
            sandbox_lxcfs=_choice(env, "SANDBOX_LXCFS", "auto", LXCFS_MODES),
            sandbox_cpu_pinning=_choice(env, "SANDBOX_CPU_PINNING", "spread", CPU_PINNING_MODES),
            max_sandboxes=_int(env, "MAX_SANDBOXES", 50, minimum=1),
            limits=SandboxLimits(
                memory_mb=_int(env, "SANDBOX_MEMORY_MB", 512, minimum=16),
                cpus=_float(env, "SANDBOX_CPUS", 1.0),
                pids=_int(env, "SANDBOX_PIDS", 256, minimum=16),
            ),
            disk=DiskSettings(
                size_mb=_disk_mb(env),
                directory=env.get("SANDBOX_DISK_DIR", "").strip() or "/var/lib/sandbox-gateway/disks",
                tmp_mb=_int(env, "SANDBOX_TMP_MB", 256, minimum=1),
                min_free_mb=_int(env, "SANDBOX_MIN_FREE_DISK_MB", 2048, minimum=0),
            ),
            idle_timeout_s=_int(env, "SANDBOX_IDLE_TIMEOUT_S", 1800, minimum=1),
            reaper_interval_s=_int(env, "REAPER_INTERVAL_S", 60, minimum=1),
            exec=ExecSettings(
                default_timeout_ms=_int(env, "EXEC_DEFAULT_TIMEOUT_MS", 10_000, minimum=1),
                max_timeout_ms=_int(env, "EXEC_MAX_TIMEOUT_MS", 60_000, minimum=1),
                max_output_bytes=_int(env, "EXEC_MAX_OUTPUT_BYTES", 1024 * 1024, minimum=1),
                max_stdin_bytes=_int(env, "EXEC_MAX_STDIN_BYTES", 1024 * 1024, minimum=0),
                max_concurrent_per_user=_int(env, "EXEC_MAX_CONCURRENT_PER_USER", 4, minimum=1),
            ),
            processes=ProcessSettings(
                max_per_user=_int(env, "PROCESSES_MAX_PER_USER", 16, minimum=1),
                max_buffer_bytes=_int(env, "PROCESSES_MAX_BUFFER_BYTES", 1024 * 1024, minimum=1024),
                retention_s=_int(env, "PROCESSES_RETENTION_S", 600, minimum=0),
                max_ended_per_user=_int(env, "PROCESSES_MAX_ENDED_PER_USER", 32, minimum=0),
                max_streams_per_user=_int(env, "PROCESSES_MAX_STREAMS_PER_USER", 8, minimum=1),
                default_timeout_ms=_int(env, "PROCESSES_DEFAULT_TIMEOUT_MS", 60_000, minimum=1),
                max_timeout_ms=_int(env, "PROCESSES_MAX_TIMEOUT_MS", 3_600_000, minimum=1),
                heartbeat_s=_int(env, "PROCESSES_HEARTBEAT_S", 15, minimum=1),
            ),
            egress=EgressPolicy.from_env(env),
            public_url=(env.get("GATEWAY_PUBLIC_URL") or "").rstrip("/") or _default_public_url(env),
            preview_url=(env.get("GATEWAY_PREVIEW_URL") or "").rstrip("/") or None,
            preview_domain=env.get("GATEWAY_PREVIEW_DOMAIN", "").strip().rstrip("/") or None,
            preview_wake=_choice(env, "GATEWAY_PREVIEW_WAKE", "ask", ("ask", "auto", "off")),
            share_max_lifetime_s=_int(env, "PREVIEW_SHARE_MAX_LIFETIME_S", 7 * 24 * 3600, minimum=60),
            max_shares_per_user=_int(env, "PREVIEW_MAX_SHARES_PER_USER", 20, minimum=0),
            preview_response_timeout_s=_int(env, "PREVIEW_RESPONSE_TIMEOUT_S", 30, minimum=1),
            preview_port_relays=_int(env, "PREVIEW_PORT_RELAYS", 256, minimum=1),
            allowed_origins=frozenset(
                origin.strip().rstrip("/")
                for origin in env.get("GATEWAY_ALLOWED_ORIGINS", "").split(",")
                if origin.strip()
            ),
            max_terminals_per_user=_int(env, "MAX_TERMINALS_PER_USER", 5, minimum=1),
            files=FileSettings(
                max_write_bytes=_int(env, "FILES_MAX_WRITE_BYTES", 1024 * 1024 * 1024, minimum=0),
                max_list_entries=_int(env, "FILES_MAX_LIST_ENTRIES", 10_000, minimum=1),
                max_list_depth=_int(env, "FILES_MAX_LIST_DEPTH", 32, minimum=1),
                max_upload_files=_int(env, "FILES_MAX_UPLOAD_FILES", 1000, minimum=1),
                max_streams_per_user=_int(env, "FILES_MAX_STREAMS_PER_USER", 8, minimum=1),
                max_watches_per_sandbox=_int(env, "FILES_MAX_WATCHES_PER_SANDBOX", 8, minimum=1),
                max_watch_folders=_int(env, "FILES_MAX_WATCH_FOLDERS", 8192, minimum=1),
            ),
            terminal=TerminalSettings(
                grace_s=_int(env, "TERMINAL_GRACE_S", 300, minimum=0),
                replay_bytes=_int(env, "TERMINAL_REPLAY_BYTES", 256 * 1024, minimum=64 * 1024),
                max_per_sandbox=_int(env, "MAX_TERMINALS_PER_SANDBOX", 10, minimum=1),
                viewer_buffer_bytes=_int(env, "TERMINAL_VIEWER_BUFFER_BYTES", 256 * 1024, minimum=16 * 1024),
                viewer_stall_s=_int(env, "TERMINAL_VIEWER_STALL_S", 10, minimum=1),
            ),
            start_rate=RateLimit(per_minute=_int(env, "RATE_LIMIT_STARTS_PER_MINUTE", 20, minimum=0)),
            exec_rate=RateLimit(per_minute=_int(env, "RATE_LIMIT_EXECS_PER_MINUTE", 600, minimum=0)),
            max_token_lifetime_s=_int(env, "GATEWAY_MAX_TOKEN_LIFETIME_S", 0, minimum=0) or None,
            admin_claim=env.get("GATEWAY_ADMIN_CLAIM", "").strip() or "role",
            admin_value=env.get("GATEWAY_ADMIN_VALUE", "").strip() or "admin",
            metrics_token=env.get("GATEWAY_METRICS_TOKEN", "").strip() or None,
            metrics_address=_address(env, "GATEWAY_METRICS_ADDRESS"),
            log_format=_choice(env, "GATEWAY_LOG_FORMAT", "json", ("json", "text")),
            header_timeout_s=_int(env, "GATEWAY_HEADER_TIMEOUT_S", 10, minimum=1),
            max_connections_per_client=_int(env, "GATEWAY_MAX_CONNECTIONS_PER_CLIENT", 256, minimum=0),
            max_connections=_int(env, "GATEWAY_MAX_CONNECTIONS", 0, minimum=0) or None,
        )

    def __post_init__(self) -> None:
        if self.jwt_algorithm not in SYMMETRIC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
            raise SettingsError(f"GATEWAY_JWT_ALGORITHM: unsupported algorithm {self.jwt_algorithm!r}")
        # A public key used as an HMAC secret would let anyone who has the key forge tokens.
        is_pem = self.jwt_key.lstrip().startswith("-----BEGIN")
        if self.jwt_algorithm in SYMMETRIC_ALGORITHMS:
            if is_pem:
                raise SettingsError(f"{self.jwt_algorithm} needs GATEWAY_JWT_SECRET, not a key file")
            if len(self.jwt_key.encode()) < 32:
                raise SettingsError("GATEWAY_JWT_SECRET must be at least 32 bytes long")
        elif not is_pem:
            raise SettingsError(f"{self.jwt_algorithm} needs a PEM public key in GATEWAY_JWT_PUBLIC_KEY_FILE")
        for name, url in (("GATEWAY_PUBLIC_URL", self.public_url), ("GATEWAY_PREVIEW_URL", self.preview_url)):
            parts = urlsplit(url or "http://unset")
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise SettingsError(f"{name} must be an http(s) URL, got {url!r}")
        if self.preview_origin == self.public_origin:
            raise SettingsError("GATEWAY_PREVIEW_URL must be another origin than GATEWAY_PUBLIC_URL")
        if self.preview_domain is not None and not PREVIEW_DOMAIN.fullmatch(self.preview_domain):
            raise SettingsError(
                "GATEWAY_PREVIEW_DOMAIN must be a host name with an optional port,"
                f" got {self.preview_domain!r}"
            )
        if self.public_host.lower().endswith(self.preview_root_suffix):
            # The page would then be some user's preview origin.
            raise SettingsError("GATEWAY_PUBLIC_URL must not lie under GATEWAY_PREVIEW_DOMAIN")
        if self.preview_wake not in ("ask", "auto", "off"):
            raise SettingsError(f"GATEWAY_PREVIEW_WAKE must be ask, auto or off, got {self.preview_wake!r}")
        if self.metrics_token is not None and len(self.metrics_token) < 16:
            raise SettingsError("GATEWAY_METRICS_TOKEN must be at least 16 characters long")
        if not Path(self.disk.directory).is_absolute():
            raise SettingsError(f"SANDBOX_DISK_DIR must be an absolute path, got {self.disk.directory!r}")
        if not RUNTIME_NAME.fullmatch(self.sandbox_runtime):
            raise SettingsError(f"SANDBOX_RUNTIME must be a runtime's name, got {self.sandbox_runtime!r}")
        if self.sandbox_lxcfs not in LXCFS_MODES:
            raise SettingsError(f"SANDBOX_LXCFS must be auto, on or off, got {self.sandbox_lxcfs!r}")
        if self.sandbox_cpu_pinning not in CPU_PINNING_MODES:
            raise SettingsError(
                f"SANDBOX_CPU_PINNING must be spread or off, got {self.sandbox_cpu_pinning!r}"
            )
        if self.processes.default_timeout_ms > self.processes.max_timeout_ms:
            raise SettingsError("PROCESSES_DEFAULT_TIMEOUT_MS must not exceed PROCESSES_MAX_TIMEOUT_MS")
        # The agent's own ceilings (sandbox-image/agent/sandbox_agent/processes.py).
        if self.processes.max_per_user > 256 or self.processes.max_ended_per_user > 1024:
            raise SettingsError("PROCESSES_MAX_PER_USER is at most 256, PROCESSES_MAX_ENDED_PER_USER 1024")
        if self.processes.max_buffer_bytes > 64 * 1024 * 1024:
            raise SettingsError("PROCESSES_MAX_BUFFER_BYTES is at most 64 MiB")
        if self.processes.max_timeout_ms > 24 * 3600 * 1000 or self.processes.retention_s > 7 * 24 * 3600:
            raise SettingsError("PROCESSES_MAX_TIMEOUT_MS is at most a day, PROCESSES_RETENTION_S a week")
        # The agent's own ceilings (sandbox-image/agent/sandbox_agent/files_watch.py).
        if self.files.max_watches_per_sandbox > 64 or self.files.max_watch_folders > 65_536:
            raise SettingsError("FILES_MAX_WATCHES_PER_SANDBOX is at most 64, FILES_MAX_WATCH_FOLDERS 65536")
        if self.files.max_list_entries > 100_000:
            raise SettingsError("FILES_MAX_LIST_ENTRIES is at most 100000")
        if self.exec.default_timeout_ms > self.exec.max_timeout_ms:
            raise SettingsError("EXEC_DEFAULT_TIMEOUT_MS must not exceed EXEC_MAX_TIMEOUT_MS")


def _default_public_url(env: Mapping[str, str]) -> str:
    # *.localhost names reach this machine in browsers without any DNS set-up.
    return f"http://sandbox.localhost:{env.get('GATEWAY_PORT', '').strip() or 8080}"


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SettingsError(f"{name} is required")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _disk_mb(env: Mapping[str, str]) -> int:
    size_mb = _int(env, "SANDBOX_DISK_MB", 2048, minimum=0)
    # ext4 with a journal needs a few MiB of its own; smaller would fail at mkfs, on the first start.
    if 0 < size_mb < MIN_DISK_MB:
        raise SettingsError(f"SANDBOX_DISK_MB must be 0 (no quota) or at least {MIN_DISK_MB}, got {size_mb}")
    return size_mb


def _address(env: Mapping[str, str], name: str) -> tuple[str, int] | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{name} must be host:port, got {raw!r}")
    return host.strip("[]"), int(port)


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _networks(env: Mapping[str, str], name: str) -> tuple[IPNetwork, ...]:
    """A comma-separated list of CIDRs (IPv4 or IPv6; a bare address is one host)."""
    networks = []
    for item in env.get(name, "").split(","):
        if not item.strip():
            continue
        try:
            # strict: 10.1.2.3/8 is a typo for something, not 10.0.0.0/8.
            networks.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as err:
            raise SettingsError(f"{name}: {item.strip()!r} is not a CIDR ({err})") from None
    return tuple(networks)


def _addresses(env: Mapping[str, str], name: str) -> tuple[IPAddress, ...]:
    addresses = []
    for item in env.get(name, "").split(","):
        if not item.strip():
            continue
        try:
            addresses.append(ipaddress.ip_address(item.strip()))
        except ValueError:
            raise SettingsError(f"{name}: {item.strip()!r} is not an IP address") from None
    return tuple(addresses)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not 0 < value <= 1024:
        raise SettingsError(f"{name} must be between 0 and 1024, got {value}")
    return value


def _default_algorithm(env: Mapping[str, str]) -> str:
    return "RS256" if env.get("GATEWAY_JWT_PUBLIC_KEY_FILE") else "HS256"


def _jwt_key(env: Mapping[str, str]) -> str:
    key_file = env.get("GATEWAY_JWT_PUBLIC_KEY_FILE", "").strip()
    secret = env.get("GATEWAY_JWT_SECRET", "")
    if key_file and secret:
        raise SettingsError("set GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY_FILE, not both")
    if key_file:
        try:
            return Path(key_file).read_text()
        except OSError as err:
            raise SettingsError(f"GATEWAY_JWT_PUBLIC_KEY_FILE: cannot read {key_file}: {err}") from err
    if not secret:
        raise SettingsError("GATEWAY_JWT_SECRET (or GATEWAY_JWT_PUBLIC_KEY_FILE) is required")
    return secret


def _ca_bundle(env: Mapping[str, str]) -> str | None:
    # An explicit empty value means: mount no bundle, keep the image's own.
    if "SANDBOX_CA_BUNDLE" in env:
        value = env["SANDBOX_CA_BUNDLE"].strip()
        if value and not Path(value).is_file():
            raise SettingsError(f"SANDBOX_CA_BUNDLE: {value} is not a file")
        return value or None
    return DEFAULT_CA_BUNDLE if Path(DEFAULT_CA_BUNDLE).is_file() else None
