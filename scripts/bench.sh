#!/bin/bash
# Runs every benchmark, each against its baseline; needs what scripts/run.sh sets up.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/ensure-venv.sh"
"$ROOT/scripts/ensure-docker.sh"
ensure_disk_tools
"$ROOT/scripts/ensure-runsc.sh"
"$ROOT/scripts/build-image.sh"
if [[ -z ${DATABASE_URL:-} ]]; then
    DATABASE_URL=$("$ROOT/scripts/ensure-postgres.sh")
    export DATABASE_URL
fi
command -v wrk >/dev/null || apt_install wrk
command -v curl >/dev/null || apt_install curl
command -v npm >/dev/null || apt_install npm
command -v haproxy >/dev/null || apt_install haproxy
cd "$ROOT"
# abuse last: it exits 1 when a target is missed, and its terminal case can wedge a gateway until it is killed.
for bench in lifecycle exec terminal proxy api disk runtime files abuse; do
    "$VENV/bin/python" -m "bench.$bench"
done
