#!/usr/bin/env bash
# pyenv.sh: creates (or refreshes) the Python venv the integration tests run in, at $PD_PYENV (default
# build/pyenv), with tests/integration/requirements.txt installed from PyPI. Idempotent: when the venv
# exists and the requirements file has not changed since the last install, it does nothing.
# Prints the venv's python path last, so callers can do PY="$(scripts/pyenv.sh | tail -n 1)".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="${PD_PYENV:-$ROOT/build/pyenv}"
REQ="$ROOT/tests/integration/requirements.txt"
STAMP="$VENV/.requirements.sha256"

want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "$VENV/bin/python"
    exit 0
fi
# Two test processes may call this at once (ctest -j): one installs, the other waits for it.
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "$VENV/bin/python"
    exit 0
fi
echo "pyenv: creating $VENV" >&2
python3 -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ" >&2
echo "$want" > "$STAMP"
echo "$VENV/bin/python"
