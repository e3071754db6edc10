"""Configuration from the environment."""

from __future__ import annotations

import pytest

from gateway.settings import DiskSettings, Settings, SettingsError

BASE = {"GATEWAY_JWT_SECRET": "s" * 32, "DATABASE_URL": "postgresql:///x"}


def test_defaults() -> None:
    settings = Settings.from_env({**BASE, "SANDBOX_CA_BUNDLE": ""})
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.jwt_algorithm == "HS256"
    assert (settings.limits.memory_mb, settings.limits.cpus, settings.limits.pids) == (512, 1.0, 256)
    assert settings.idle_timeout_s == 1800
    assert settings.exec.max_output_bytes == 1024 * 1024
    assert settings.ca_bundle is None
    assert settings.disk == DiskSettings(
        size_mb=2048, directory="/var/lib/sandbox-gateway/disks", tmp_mb=256, min_free_mb=2048
    )


def test_disk_settings_are_read() -> None:
    env = {"SANDBOX_DISK_MB": "0", "SANDBOX_DISK_DIR": "/srv/disks", "SANDBOX_TMP_MB": "64"}
    settings = Settings.from_env({**BASE, **env, "SANDBOX_MIN_FREE_DISK_MB": "0"})
    assert settings.disk == DiskSettings(size_mb=0, directory="/srv/disks", tmp_mb=64, min_free_mb=0)
    assert not settings.disk.quota


def test_values_are_read() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "GATEWAY_PORT": "9000",
            "MAX_SANDBOXES": "7",
            "SANDBOX_MEMORY_MB": "1024",
            "SANDBOX_CPUS": "0.5",
            "SANDBOX_PIDS": "64",
            "EXEC_DEFAULT_TIMEOUT_MS": "2000",
            "GATEWAY_PUBLIC_URL": "https://x.example/",
        }
    )
    assert settings.port == 9000
    assert settings.max_sandboxes == 7
    assert (settings.limits.memory_mb, settings.limits.cpus, settings.limits.pids) == (1024, 0.5, 64)
    assert settings.exec.default_timeout_ms == 2000
    assert settings.public_url == "https://x.example"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"DATABASE_URL": "x"}, "GATEWAY_JWT_SECRET"),
        ({"GATEWAY_JWT_SECRET": "s" * 32}, "DATABASE_URL"),
        ({**BASE, "GATEWAY_JWT_SECRET": "short"}, "32 bytes"),
        ({**BASE, "GATEWAY_PORT": "eighty"}, "GATEWAY_PORT"),
        ({**BASE, "MAX_SANDBOXES": "0"}, "MAX_SANDBOXES"),
        ({**BASE, "SANDBOX_CPUS": "-1"}, "SANDBOX_CPUS"),
        ({**BASE, "GATEWAY_JWT_ALGORITHM": "none"}, "unsupported"),
        ({**BASE, "GATEWAY_JWT_ALGORITHM": "RS256"}, "PEM public key"),
        ({**BASE, "SANDBOX_CA_BUNDLE": "/does/not/exist"}, "SANDBOX_CA_BUNDLE"),
        ({**BASE, "EXEC_DEFAULT_TIMEOUT_MS": "70000"}, "EXEC_DEFAULT_TIMEOUT_MS"),
        ({**BASE, "SANDBOX_DISK_MB": "8"}, "SANDBOX_DISK_MB must be 0"),
        ({**BASE, "SANDBOX_DISK_MB": "-1"}, "SANDBOX_DISK_MB"),
        ({**BASE, "SANDBOX_DISK_DIR": "disks"}, "SANDBOX_DISK_DIR must be an absolute path"),
        ({**BASE, "SANDBOX_TMP_MB": "0"}, "SANDBOX_TMP_MB"),
        ({**BASE, "SANDBOX_MIN_FREE_DISK_MB": "lots"}, "SANDBOX_MIN_FREE_DISK_MB"),
        ({**BASE, "SANDBOX_RUNTIME": "runsc --debug"}, "SANDBOX_RUNTIME"),
        ({**BASE, "SANDBOX_LXCFS": "maybe"}, "SANDBOX_LXCFS"),
        ({**BASE, "SANDBOX_CPU_PINNING": "pack"}, "SANDBOX_CPU_PINNING"),
    ],
)
def test_bad_configuration_names_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env(env)
