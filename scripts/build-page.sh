#!/bin/bash
# Builds the page (static/) with Vite when its sources or lock file changed since the last build.
# npm and Node run inside the sandbox image, which has Node 22 whatever the host has (Debian 12's
# own Node is too old for Vite), and trust the same CA bundle as the sandboxes.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
page=$ROOT/static

source_hash=$(cd "$page" && find index.html package.json package-lock.json vite.config.js src -type f -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
stamp=$page/dist/.source-hash
if [[ -f $stamp && $(cat "$stamp") == "$source_hash" ]]; then
    exit 0
fi
say "building the page (npm ci and vite build, in the sandbox image)"
ca_bundle=${SANDBOX_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
ca_mount=()
[[ -n $ca_bundle && -f $ca_bundle ]] && ca_mount=(-v "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
registry=()
[[ -n ${npm_config_registry:-} ]] && registry=(-e "npm_config_registry=$npm_config_registry")
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! docker run --rm --user "$(id -u):$(id -g)" -e HOME=/tmp "${registry[@]}" "${ca_mount[@]}" \
    -v "$page:/page" -w /page --entrypoint "" "$SANDBOX_IMAGE" \
    bash -c 'npm ci --no-audit --no-fund --loglevel=error && npm run build' >"$log" 2>&1; then
    cat "$log" >&2
    die "building the page failed"
fi
echo "$source_hash" >"$stamp"
