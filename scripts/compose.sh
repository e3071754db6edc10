#!/bin/bash
# scripts/compose.sh ARGS...: Compose on docker-compose.yml with the deployment's env file, e.g.
# `scripts/compose.sh ps`, `scripts/compose.sh logs -f gateway`, `scripts/compose.sh down`.
# For the commands that build (up, build, create, run) it also picks the base images this machine can
# have: the public ones where a registry answers, the local base (sandbox-image/local-base.sh) where
# none does. Installs Debian's docker-compose when no Compose is here (README, "Deploying with
# Compose", says why that one).
#
# Environment: SANDBOX_GATEWAY_ENV_FILE (default: .env at the top), COMPOSE_PROJECT_NAME, and COMPOSE
# to name another Compose command (e.g. COMPOSE="docker compose").
set -euo pipefail
. "$(dirname "$0")/lib.sh"

env_file=${SANDBOX_GATEWAY_ENV_FILE:-$ROOT/.env}
[[ -f $env_file ]] || die "$env_file not found: scripts/compose-up.sh creates it (or copy deploy/env.example)"
SANDBOX_GATEWAY_ENV_FILE=$(realpath "$env_file")
export SANDBOX_GATEWAY_ENV_FILE
setting() { env_setting "$SANDBOX_GATEWAY_ENV_FILE" "$1"; }

if [[ -n ${COMPOSE:-} ]]; then
    read -ra compose <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    command -v docker-compose >/dev/null || apt_install docker-compose
    compose=(docker-compose)
fi

# The subcommand: the first argument that is neither an option nor an option's value.
subcommand=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
    -p | --project-name | -f | --file | --profile | --env-file | --project-directory | -H | --host | --context)
        ((i += 1)) ;;
    -*) ;;
    *)
        subcommand=${args[i]}
        break
        ;;
    esac
done

if [[ -z $(setting DOCKER_GID) ]]; then
    DOCKER_GID=$(stat -c %g "$(setting DOCKER_SOCKET || true)" 2>/dev/null || stat -c %g /var/run/docker.sock)
    export DOCKER_GID
fi

case $subcommand in
up | build | create | run)
    "$ROOT/scripts/ensure-docker.sh"
    for pair in NODE_BASE_IMAGE=node:22-bookworm-slim PYTHON_BASE_IMAGE=python:3.11-slim-bookworm \
        POSTGRES_BASE_IMAGE=postgres:15-bookworm; do
        name=${pair%%=*}
        value=$(setting "$name")
        [[ -n $value ]] || value=$(public_or_local_base "${pair#*=}")
        export "$name=$value"
    done
    SANDBOX_SOURCE_HASH=$(sandbox_source_hash)
    export SANDBOX_SOURCE_HASH
    # npm and pip in the gateway's build stages trust what the host trusts (deploy/build-ca/README).
    build_ca=$(setting BUILD_CA_BUNDLE)
    build_ca=${build_ca:-$(setting SANDBOX_CA_BUNDLE)}
    build_ca=${build_ca:-/etc/ssl/certs/ca-certificates.crt}
    if [[ -f $build_ca ]]; then
        cmp -s "$build_ca" "$ROOT/deploy/build-ca/ca-certificates.crt" ||
            cp "$build_ca" "$ROOT/deploy/build-ca/ca-certificates.crt"
    else
        rm -f "$ROOT/deploy/build-ca/ca-certificates.crt"
    fi
    ;;
esac

exec "${compose[@]}" --project-directory "$ROOT" -f "$ROOT/docker-compose.yml" \
    --env-file "$SANDBOX_GATEWAY_ENV_FILE" "$@"
