#!/bin/bash
# The first README command: sets up whatever is missing (venv, Docker engine, PostgreSQL, sandbox
# image), prints the URL to open, and runs the gateway in the foreground. Safe to run again.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

"$ROOT/scripts/ensure-venv.sh"
"$ROOT/scripts/ensure-docker.sh"
ensure_disk_tools
[[ ${SANDBOX_RUNTIME:-runc} != runsc ]] || "$ROOT/scripts/ensure-runsc.sh"
[[ ${SANDBOX_LXCFS:-auto} == off ]] || "$ROOT/scripts/ensure-lxcfs.sh"
if [[ -z ${DATABASE_URL:-} ]]; then
    DATABASE_URL=$("$ROOT/scripts/ensure-postgres.sh")
    export DATABASE_URL
fi
"$ROOT/scripts/build-image.sh"
"$ROOT/scripts/build-page.sh"
# The users' filesystems live in the state folder here; a production gateway's default is
# /var/lib/sandbox-gateway/disks.
export SANDBOX_DISK_DIR=${SANDBOX_DISK_DIR:-$STATE_DIR/disks}

dev_token=""
if [[ -z ${GATEWAY_JWT_SECRET:-} && -z ${GATEWAY_JWT_PUBLIC_KEY_FILE:-} ]]; then
    # Development convenience: a secret kept in the state folder, and a token for a demo user.
    secret_file=$STATE_DIR/dev-jwt-secret
    if [[ ! -s $secret_file ]]; then
        (umask 077 && head -c 48 /dev/urandom | base64 -w0 >"$secret_file")
    fi
    GATEWAY_JWT_SECRET=$(cat "$secret_file")
    export GATEWAY_JWT_SECRET
    dev_token=$("$VENV/bin/python" -m gateway.devtoken "${DEMO_USER:-demo}" 12)
fi

# The page lives on its public URL (previews on a sibling origin: README, "Preview isolation").
# Browsers resolve *.localhost to this machine by themselves.
url="${GATEWAY_PUBLIC_URL:-http://sandbox.localhost:${GATEWAY_PORT:-8080}}"
url="${url%/}/"
echo
if [[ -n $dev_token ]]; then
    # The token rides in the fragment, which browsers never send to a server or write to its logs.
    echo "  Open ${url}#token=$dev_token"
    echo
    echo "  DEVELOPMENT ONLY: that token is for user '${DEMO_USER:-demo}', valid 12 hours, signed with a secret"
    echo "  generated in $STATE_DIR/dev-jwt-secret. In production set GATEWAY_JWT_SECRET or"
    echo "  GATEWAY_JWT_PUBLIC_KEY_FILE, and tokens come from your identity provider."
    echo "  API clients can use http://127.0.0.1:${GATEWAY_PORT:-8080}/api/... with that token as a bearer token."
else
    echo "  Open $url (sign in with a token from your identity provider)"
fi
echo
exec "$VENV/bin/python" -m gateway
