#!/bin/bash
# Makes sure a Docker engine answers. When none does (and DOCKER_HOST names none), installs Debian's
# docker.io if needed and starts dockerd in the background, its log and pid file under the state folder.
# Never starts a second engine next to one that answers.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

engine_answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if command -v docker >/dev/null && engine_answers; then
    exit 0
fi
if [[ -n ${DOCKER_HOST:-} ]]; then
    die "DOCKER_HOST=$DOCKER_HOST does not answer; start that engine or unset DOCKER_HOST"
fi
command -v dockerd >/dev/null && command -v docker >/dev/null || apt_install docker.io
# A package install may have started the engine through its init script.
if engine_answers; then
    exit 0
fi
[[ $(id -u) == 0 ]] || die "no Docker engine answers and starting dockerd needs root"
mkdir -p "$STATE_DIR/docker"
write_dockerd_config
say "starting dockerd (log: $STATE_DIR/docker/dockerd.log)"
setsid nohup dockerd --pidfile "$STATE_DIR/docker/dockerd.pid" --config-file "$DOCKERD_CONFIG" \
    >>"$STATE_DIR/docker/dockerd.log" 2>&1 </dev/null &
wait_for 60 engine_answers || die "dockerd did not answer within 60 s; see $STATE_DIR/docker/dockerd.log"
