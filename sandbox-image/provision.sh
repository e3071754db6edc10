#!/bin/bash
# Runs once while the image is built, as root, on either base (see Dockerfile).
set -euo pipefail

# The local base already has every package; the public node image lacks most of them.
wanted=(bash ca-certificates curl git less procps python3 python3-pip python3-venv tini vim-tiny)
missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    rm -rf /var/lib/apt/lists/*
fi
# vim-tiny only installs "vi" and "vim.tiny"; users type "vim".
ln -sf /usr/bin/vim.tiny /usr/local/bin/vim

# The public node images ship a user "node" with uid 1000, the uid the sandbox user must have.
if id -u node >/dev/null 2>&1; then
    userdel --remove node
fi
useradd --uid 1000 --user-group --create-home --shell /bin/bash sandbox
mkdir -p /workspace
chown sandbox:sandbox /workspace
