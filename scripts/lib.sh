# Sourced by the other scripts: paths and small helpers shared by the set-up steps.
# shellcheck shell=bash
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=${SANDBOX_GATEWAY_STATE:-$ROOT/.state}
VENV=$ROOT/.venv
SANDBOX_IMAGE=${SANDBOX_IMAGE:-sandbox-gateway/sandbox:latest}
# The daemon configuration of a dockerd the set-up starts (ensure-docker.sh), and gVisor's runtime
# arguments in it: the ptrace platform (KVM, where /dev/kvm exists, can hang), and the container's
# network namespace used through the host's stack, since the 2022 runsc's own network stack mistakes
# any namespace of a newer kernel for the root one and refuses to start (README, "Runtimes").
DOCKERD_CONFIG=$STATE_DIR/docker/daemon.json
RUNSC_ARGS='["--platform=ptrace", "--network=host"]'

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages by name, running apt-get update only once per call.
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
    say "installing $* from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# What the gateway needs to give each sandbox its own filesystem (README, "Disk quotas"): mkfs.ext4,
# e2fsck and resize2fs, and loop devices.
ensure_disk_tools() {
    command -v mkfs.ext4 >/dev/null && command -v resize2fs >/dev/null || apt_install e2fsprogs
    [[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || say "no loop devices here: set SANDBOX_DISK_MB=0 (no disk quota) or load the loop module"
}

# Writes DOCKERD_CONFIG: runsc registered as a runtime (the package need not be installed for dockerd
# to start; a sandbox under it fails until it is).
write_dockerd_config() {
    mkdir -p "$(dirname "$DOCKERD_CONFIG")"
    printf '{\n  "runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": %s}}\n}\n' \
        "$RUNSC_ARGS" >"$DOCKERD_CONFIG"
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

# The hash of sandbox-image/ (names, modes and contents of every file: what its build can see), which
# the sandbox image carries in the label sandbox-gateway.source-hash.
sandbox_source_hash() {
    (cd "$ROOT/sandbox-image" && find . -type f -printf '%p %m\n' | LC_ALL=C sort |
        while read -r path mode; do echo "$path $mode $(sha256sum <"$path")"; done | sha256sum | cut -c1-16)
}

# Prints the tag of the local base (sandbox-image/local-base.sh: Debian bookworm by debootstrap, Node.js
# 22 from the npm registry, no image registry needed), building it first when it is missing.
local_base_image() {
    local base
    base=sandbox-gateway/base:bookworm-node22-$(sha256sum "$ROOT/sandbox-image/local-base.sh" | cut -c1-12)
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        say "no image registry answers: building a local base with debootstrap (about a minute)"
        command -v debootstrap >/dev/null || apt_install debootstrap
        command -v npm >/dev/null || apt_install npm
        "$ROOT/sandbox-image/local-base.sh" "$base" >&2
    fi
    echo "$base"
}

# Prints the public image $1 when it is here or a registry gives it, and the local base otherwise.
public_or_local_base() {
    if docker image inspect "$1" >/dev/null 2>&1 || timeout 300 docker pull -q "$1" >/dev/null 2>&1; then
        echo "$1"
    else
        local_base_image
    fi
}

# env_setting FILE NAME: the value of NAME as Compose sees it, the environment first and then the env
# file (KEY=VALUE lines; quotes around the value are dropped).
env_setting() {
    if [[ -n ${!2:-} ]]; then
        echo "${!2}"
    elif [[ -f $1 ]]; then
        sed -n "s/^[[:space:]]*$2[[:space:]]*=[[:space:]]*//p" "$1" | tail -n1 |
            sed -e 's/[[:space:]]*$//' -e "s/^\(['\"]\)\(.*\)\1\$/\2/"
    fi
}
