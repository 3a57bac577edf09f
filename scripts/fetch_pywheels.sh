#!/usr/bin/env bash
# fetch_pywheels.sh: downloads (pip download, no install) the pure-Python wheels our Python tools need into
# .whl/ (git-ignored), for a machine that reaches no package registry (the lent GPU machine, which has python3
# and numpy). Carry .whl/ there: deploy/make_random_gguf.py imports gguf from .whl/gguf-*.whl by itself when
# it is not installed (other scripts: PYTHONPATH=.whl/gguf-0.19.0-py3-none-any.whl, a wheel is a zip).
# gguf is pinned as in tests/integration/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(gguf==0.19.0)
mkdir -p .whl
if ls .whl/gguf-0.19.0-*.whl >/dev/null 2>&1; then
    echo "fetch_pywheels: .whl/ already holds $(ls .whl/*.whl | wc -l) wheels"
    exit 0
fi
PY="$(scripts/pyenv.sh | tail -n 1)"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
echo "fetch_pywheels: $(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
