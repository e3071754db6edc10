#!/bin/bash
# Creates .venv with the pinned dependencies; does nothing when neither the lock file nor the
# interpreter has changed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# Debian's own Python, when it is new enough, before whatever python3 comes first on PATH: Debian
# builds it with profile-guided and link-time optimisation, and a pyenv or source build without
# --enable-optimizations ran the preview proxy's Python a fifth slower (bench/proxy.py).
# SANDBOX_GATEWAY_PYTHON names another interpreter.
new_enough() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

pick_python() {
    if [[ -n ${SANDBOX_GATEWAY_PYTHON:-} ]]; then
        echo "$SANDBOX_GATEWAY_PYTHON"
    elif new_enough /usr/bin/python3; then
        echo /usr/bin/python3
    else
        command -v python3 >/dev/null || apt_install python3 python3-venv
        command -v python3
    fi
}

python=$(pick_python)
new_enough "$python" ||
    die "$python is not a Python 3.11 or newer (SANDBOX_GATEWAY_PYTHON names the interpreter)"
lock=$ROOT/requirements.lock
stamp=$VENV/.lock-sha256
want=$( (sha256sum "$lock" "$ROOT/pyproject.toml"; readlink -f "$python") | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    exit 0
fi
if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
say "installing Python dependencies into .venv ($("$python" --version), $python)"
"$python" -m venv --clear "$VENV"
# -qq: errors only. Debian's pip 23.0 warns once per package about every find-links location a
# machine's pip configuration names and lacks, which buried the set-up's own output.
"$VENV/bin/pip" install -qq --disable-pip-version-check -r "$lock"
"$VENV/bin/pip" install -qq --disable-pip-version-check --no-deps -e "$ROOT"
echo "$want" >"$stamp"
