#!/bin/bash
# Runs every benchmark, each against its baseline; needs what scripts/run.sh sets up.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/ensure-venv.sh"
"$ROOT/scripts/ensure-docker.sh"
"$ROOT/scripts/build-image.sh"
if [[ -z ${DATABASE_URL:-} ]]; then
    DATABASE_URL=$("$ROOT/scripts/ensure-postgres.sh")
    export DATABASE_URL
fi
cd "$ROOT"
for bench in lifecycle exec terminal; do
    "$VENV/bin/python" -m "bench.$bench"
done
