#!/bin/bash
# Builds the sandbox image when sandbox-image/ has changed since the image was last built: the image
# carries a label with a hash of that folder. The base is the public node:22 image where a registry
# answers, and otherwise a local one built without any registry (sandbox-image/local-base.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
context=$ROOT/sandbox-image
public_base=node:22-bookworm-slim

source_hash=$(sandbox_source_hash)
built_hash=$(docker image inspect --format '{{ index .Config.Labels "sandbox-gateway.source-hash" }}' \
    "$SANDBOX_IMAGE" 2>/dev/null || true)
if [[ $built_hash == "$source_hash" ]]; then
    exit 0
fi

base=$(public_or_local_base "$public_base")
say "building $SANDBOX_IMAGE from $base"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! docker build -q --build-arg BASE_IMAGE="$base" --label sandbox-gateway.source-hash="$source_hash" \
    -t "$SANDBOX_IMAGE" "$context" >"$log" 2>&1; then
    cat "$log" >&2
    die "building $SANDBOX_IMAGE failed"
fi
