#!/usr/bin/env bash
# run_device_host.sh: builds pdserve on the lent GPU machine (no package registry there: carry .debs/ made
# by scripts/fetch_debs.sh) and runs the host-side benchmarks, writing logs under $OUT (or ./device-out).
# Usage (through the device tool, carrying .debs): bash bench/run_device_host.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
source scripts/device_env.sh
{
    echo "== host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(free -g | awk '/Mem:/{print $2}') GiB"
    cmake --version | head -1
    cmake -S . -B build-dev -DCMAKE_BUILD_TYPE=Release -DPDSERVE_TESTS=OFF >/dev/null && \
        cmake --build build-dev -j"$(nproc)" --target kv_transfer 2>&1 | grep -E "error|warning" || true
    for ct in 2 1; do # the receiver's shared-pool copies on two threads (the default), then on one
        echo "== bench/kv_transfer, KVT_COPY_THREADS=$ct"
        KVT_COPY_THREADS=$ct ./build-dev/bench/kv_transfer
    done
} 2>&1 | tee "$OUT/host_bench.log"
