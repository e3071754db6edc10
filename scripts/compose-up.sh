#!/bin/bash
# Brings the Compose deployment up (README, "Deploying with Compose"): creates the env file with
# generated secrets where it has none, builds what changed (scripts/compose.sh picks the bases),
# starts PostgreSQL, the sandbox image build and the gateway, and waits until the gateway's /healthz
# says ok. Safe to run again. Arguments go to `compose up`.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

"$ROOT/scripts/ensure-docker.sh"
env_file=${SANDBOX_GATEWAY_ENV_FILE:-$ROOT/.env}
if [[ ! -f $env_file ]]; then
    (umask 077 && cp "$ROOT/deploy/env.example" "$env_file")
    say "created $env_file from deploy/env.example"
fi
export SANDBOX_GATEWAY_ENV_FILE=$env_file
setting() { env_setting "$env_file" "$1"; }
# Fills in an empty NAME= line of the env file, or adds one.
generate() {
    if grep -q "^$1=\$" "$env_file"; then
        sed -i "s|^$1=\$|$1=$2|" "$env_file"
    else
        echo "$1=$2" >>"$env_file"
    fi
    say "generated $1 in $env_file${3:+: $3}"
}

if [[ -z $(setting GATEWAY_JWT_SECRET) && -z $(setting GATEWAY_JWT_PUBLIC_KEY_FILE) ]]; then
    generate GATEWAY_JWT_SECRET "$(head -c 48 /dev/urandom | base64 -w0 | tr '+/' '-_')" \
        "your identity provider must sign tokens with it"
fi
if [[ -z $(setting POSTGRES_PASSWORD) ]]; then
    generate POSTGRES_PASSWORD "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
fi

say "building and starting the deployment"
"$ROOT/scripts/compose.sh" up -d --build "$@"

host=$(setting GATEWAY_HOST)
[[ -z $host || $host == 0.0.0.0 || $host == :: ]] && host=127.0.0.1
port=$(setting GATEWAY_PORT)
port=${port:-8080}
# One GET /healthz over bash's /dev/tcp (the host needs no curl); true when it says 200.
gateway_healthy() (
    exec 3<>"/dev/tcp/$host/$port" || exit 1
    printf 'GET /healthz HTTP/1.0\r\nHost: %s:%s\r\n\r\n' "$host" "$port" >&3
    read -r -t 5 _ status _ <&3 && [[ $status == 200 ]]
)
if ! wait_for "${COMPOSE_UP_TIMEOUT_S:-120}" gateway_healthy 2>/dev/null; then
    "$ROOT/scripts/compose.sh" ps >&2 || true
    "$ROOT/scripts/compose.sh" logs --tail=40 gateway postgres >&2 || true
    die "the gateway did not answer healthy on $host:$port within ${COMPOSE_UP_TIMEOUT_S:-120} s"
fi
say "the gateway answers on http://$host:$port (put your TLS proxy for GATEWAY_PUBLIC_URL in front)"
echo "  a development token: scripts/compose.sh exec gateway python -m gateway.devtoken USER" >&2
