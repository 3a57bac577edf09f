#!/usr/bin/env bash
# run_py.sh TEST.py [ARGS]: runs one Python integration test with the venv's python (scripts/pyenv.sh makes
# the venv at $PD_PYENV or build/pyenv on first use; later calls only check it).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="$("$ROOT/scripts/pyenv.sh" | tail -n 1)"
cd "$(dirname "$1")"
exec "$PY" -u "$@"
