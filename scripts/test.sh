#!/bin/bash
# The second README command: sets up what the suite needs (venv, Docker engine, sandbox image,
# PostgreSQL binaries; the suite starts its own throwaway cluster), checks style and types, and runs
# every test. Arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

"$ROOT/scripts/ensure-venv.sh"
"$ROOT/scripts/ensure-docker.sh"
"$ROOT/scripts/build-image.sh"
"$ROOT/scripts/build-page.sh"
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_install postgresql
# The browser tests drive Debian's Chromium with Playwright (whose own browser downloads need more
# than a package registry).
[[ -x /usr/bin/chromium ]] || apt_install chromium

cd "$ROOT"
say "ruff and mypy"
"$VENV/bin/ruff" check gateway tests bench
"$VENV/bin/ruff" format --check --quiet gateway tests bench
"$VENV/bin/mypy" gateway
say "pytest"
exec "$VENV/bin/pytest" "$@"
