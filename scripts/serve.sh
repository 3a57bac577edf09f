#!/usr/bin/env bash
# serve.sh: the one serve command. On a fresh machine: installs dependencies, builds, fetches the default
# model and runs the cluster on this machine with `pdctl up`: pd-router (OpenAI-compatible HTTP on port 8000,
# native API on a free loopback port), one pd-prefill and one pd-decode worker. Arguments go to `pdctl up`
# (e.g. --prefill 2 --decode 2 --port 8080 --threads 4, or --section.key=value for the services);
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh >&2
MODEL="$(scripts/fetch_model.sh | tail -n 1)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
exec build/deploy/pdctl up --model "$MODEL" --prefill 1 --decode 1 --port 8000 "$@"
