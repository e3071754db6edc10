#!/bin/bash
# Makes sure the Docker engine knows gVisor's runtime, runsc (README, "Runtimes"). Installs Debian's
# runsc when missing. An engine the set-up started (ensure-docker.sh) reads the daemon configuration
# the set-up owns, which registers runsc; it is rewritten and reloaded with SIGHUP (dockerd reloads its
# runtimes without a restart). Any other engine is left alone: this says what to add, and fails.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

knows_runsc() { docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; }

command -v runsc >/dev/null || apt_install runsc
knows_runsc && exit 0
pid=$(cat "$STATE_DIR/docker/dockerd.pid" 2>/dev/null || true)
if [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--config-file $DOCKERD_CONFIG"; then
    write_dockerd_config
    say "registering runsc with the engine started by the set-up (SIGHUP to dockerd $pid)"
    kill -HUP "$pid"
    wait_for 10 knows_runsc && exit 0
    die "dockerd did not pick up runsc from $DOCKERD_CONFIG; see $STATE_DIR/docker/dockerd.log"
fi
die "the Docker engine has no runtime runsc, and the set-up did not start it. Add to its daemon.json
(usually /etc/docker/daemon.json):
  \"runtimes\": {\"runsc\": {\"path\": \"$(command -v runsc)\", \"runtimeArgs\": $RUNSC_ARGS}}
then reload it without a restart: kill -HUP \$(pidof dockerd)"
