#!/bin/bash
# Builds the sandbox image when sandbox-image/ has changed since the image was last built: the image
# carries a label with a hash of that folder. The base is the public node:22 image where a registry
# answers, and otherwise a local one built without any registry (sandbox-image/local-base.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
context=$ROOT/sandbox-image
public_base=node:22-bookworm-slim

# Names, modes and contents of every file: what the build can see.
source_hash=$(cd "$context" && find . -type f -printf '%p %m\n' | LC_ALL=C sort |
    while read -r path mode; do echo "$path $mode $(sha256sum <"$path")"; done | sha256sum | cut -c1-16)
built_hash=$(docker image inspect --format '{{ index .Config.Labels "sandbox-gateway.source-hash" }}' \
    "$SANDBOX_IMAGE" 2>/dev/null || true)
if [[ $built_hash == "$source_hash" ]]; then
    exit 0
fi

if docker image inspect "$public_base" >/dev/null 2>&1 || timeout 300 docker pull -q "$public_base" >/dev/null 2>&1; then
    base=$public_base
else
    base=sandbox-gateway/base:bookworm-node22-$(sha256sum "$context/local-base.sh" | cut -c1-12)
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        say "no image registry answers: building a local base with debootstrap (about a minute)"
        command -v debootstrap >/dev/null || apt_install debootstrap
        command -v npm >/dev/null || apt_install npm
        "$context/local-base.sh" "$base"
    fi
fi
say "building $SANDBOX_IMAGE from $base"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! docker build -q --build-arg BASE_IMAGE="$base" --label sandbox-gateway.source-hash="$source_hash" \
    -t "$SANDBOX_IMAGE" "$context" >"$log" 2>&1; then
    cat "$log" >&2
    die "building $SANDBOX_IMAGE failed"
fi
