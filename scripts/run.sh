#!/bin/bash
# The first README command: sets up whatever is missing (venv, Docker engine, PostgreSQL, sandbox
# image), prints the URL to open, and runs the gateway in the foreground. Safe to run again.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

"$ROOT/scripts/ensure-venv.sh"
"$ROOT/scripts/ensure-docker.sh"
if [[ -z ${DATABASE_URL:-} ]]; then
    DATABASE_URL=$("$ROOT/scripts/ensure-postgres.sh")
    export DATABASE_URL
fi
"$ROOT/scripts/build-image.sh"
"$ROOT/scripts/build-page.sh"

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

host=${GATEWAY_HOST:-127.0.0.1}
[[ $host == 0.0.0.0 || $host == :: ]] && host=127.0.0.1
url="http://$host:${GATEWAY_PORT:-8080}/"
echo
if [[ -n $dev_token ]]; then
    # The token rides in the fragment, which browsers never send to a server or write to its logs.
    echo "  Open ${url}#token=$dev_token"
    echo
    echo "  DEVELOPMENT ONLY: that token is for user '${DEMO_USER:-demo}', valid 12 hours, signed with a secret"
    echo "  generated in $STATE_DIR/dev-jwt-secret. In production set GATEWAY_JWT_SECRET or"
    echo "  GATEWAY_JWT_PUBLIC_KEY_FILE, and tokens come from your identity provider."
else
    echo "  Open $url (send Authorization: Bearer <token> from your identity provider)"
fi
echo
exec "$VENV/bin/python" -m gateway
