# Sourced by the other scripts: paths and small helpers shared by the set-up steps.
# shellcheck shell=bash
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=${SANDBOX_GATEWAY_STATE:-$ROOT/.state}
VENV=$ROOT/.venv
SANDBOX_IMAGE=${SANDBOX_IMAGE:-sandbox-gateway/sandbox:latest}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages by name, running apt-get update only once per call.
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
    say "installing $* from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Polls "$@" until it succeeds or SECONDS_LEFT runs out.
wait_for() {
    local seconds_left=$1
    shift
    local deadline=$((SECONDS + seconds_left))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}
