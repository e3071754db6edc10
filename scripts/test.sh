#!/bin/bash
# The second README command: sets up what the suite needs (venv, Docker engine, sandbox image,
# PostgreSQL binaries; the suite starts its own throwaway cluster), checks style and types, and runs
# every test. Arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

"$ROOT/scripts/ensure-venv.sh"
"$ROOT/scripts/ensure-docker.sh"
ensure_disk_tools
# The core tests run under gVisor too, and the resource tests read lxcfs's files.
"$ROOT/scripts/ensure-runsc.sh"
"$ROOT/scripts/ensure-lxcfs.sh"
"$ROOT/scripts/build-image.sh"
"$ROOT/scripts/build-page.sh"
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_install postgresql
# The browser tests drive Debian's Chromium with Playwright (whose own browser downloads need more
# than a package registry).
[[ -x /usr/bin/chromium ]] || apt_install chromium
# The Compose test runs docker-compose.yml: Compose v2 where Docker's plugin is here, else Debian's.
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || apt_install docker-compose

cd "$ROOT"
say "ruff and mypy"
"$VENV/bin/ruff" check gateway tests bench sandbox-image/agent
"$VENV/bin/ruff" format --check --quiet gateway tests bench sandbox-image/agent
"$VENV/bin/mypy" gateway
"$VENV/bin/mypy" --strict sandbox-image/agent/sandbox_agent
say "pytest"
exec "$VENV/bin/pytest" "$@"
