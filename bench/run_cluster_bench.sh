#!/usr/bin/env bash
# run_cluster_bench.sh: the same pdctl bench load against a disaggregated cluster (1 prefill + 1 decode) and
# against a single colocated worker (pdctl up --prefill 0: the decode worker prefills locally), one after the
# other on this machine, with the same threads in total. Prints one JSON line per configuration.
# usage: bench/run_cluster_bench.sh [BUILD_DIR] [pdctl bench options...]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
shift || true
BENCH_ARGS=("$@")
[ ${#BENCH_ARGS[@]} -gt 0 ] || BENCH_ARGS=(--rate 1 --requests 32 --prompt-len uniform:64:512 --output-len 32)
PDCTL="$BUILD/deploy/pdctl"
THREADS=${PD_BENCH_THREADS:-$(nproc)}

run_one() { # name, pdctl up args...
    local name=$1
    shift
    local log
    log=$(mktemp)
    "$PDCTL" up --port 0 --threads "$THREADS" "$@" >"$log" 2>&1 &
    local pid=$!
    local api=""
    for _ in $(seq 1 600); do
        api=$(grep -o 'api=tcp://[0-9.:]*' "$log" | head -n 1 | cut -d= -f2 || true)
        if [ -n "$api" ] && grep -q '^pdserve up:' "$log"; then break; fi
        sleep 0.2
    done
    if [ -z "$api" ]; then
        echo "cluster '$name' did not come up:" >&2
        cat "$log" >&2
        kill "$pid" 2>/dev/null || true
        return 1
    fi
    echo -n "{\"config\": \"$name\", \"result\": "
    "$PDCTL" bench --api "$api" --json "${BENCH_ARGS[@]}"
    echo "}"
    kill -TERM "$pid"
    wait "$pid" || true
    rm -f "$log"
}

run_one "1 prefill + 1 decode" --prefill 1 --decode 1
run_one "1 colocated worker (decode prefills locally)" --prefill 0 --decode 1
