#!/bin/bash
# Creates .venv with the pinned dependencies; does nothing when the lock file has not changed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
lock=$ROOT/requirements.lock
stamp=$VENV/.lock-sha256
want=$(sha256sum "$lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    exit 0
fi
command -v python3 >/dev/null || apt_install python3 python3-venv
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
say "installing Python dependencies into .venv"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$lock"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e "$ROOT"
echo "$want" >"$stamp"
