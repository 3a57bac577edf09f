#!/usr/bin/env bash
# serve.sh: the one serve command. On a fresh machine: installs dependencies, builds, fetches the default
# model and runs it. Until the router/prefill/decode services land, this runs the engine in-process
# through `pdctl generate`; any arguments are passed to it (default: a chat prompt).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh >&2
MODEL="$(scripts/fetch_model.sh | tail -n 1)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
if [ $# -eq 0 ]; then
    set -- --chat --prompt "What is the capital of France? Answer in one sentence." --max-tokens 64
fi
exec build/deploy/pdctl generate --model "$MODEL" "$@"
