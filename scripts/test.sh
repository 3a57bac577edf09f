#!/usr/bin/env bash
# test.sh: the one test command. On a fresh machine: installs dependencies, fetches the default model,
# builds, and runs every unit test twice: a Release build, then an AddressSanitizer +
# UndefinedBehaviorSanitizer build. Then builds the libFuzzer targets and runs each briefly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

scripts/install_deps.sh
export PDSERVE_MODEL="$(scripts/fetch_model.sh | tail -n 1)"

echo "== clang-format check"
git ls-files '*.c' '*.h' '*.cu' '*.cuh' | xargs clang-format --dry-run --Werror

echo "== Release build + unit tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
(cd build && ctest -L unit --output-on-failure)

echo "== CUDA backend: compile and link (no GPU here; tests/gpu/run_gpu.sh runs it on the lent GPU machine)"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DPDSERVE_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" >/dev/null
# every CUDA program, so that the GPU machine's run_gpu.sh stages never meet code that only ever compiled there
cuda_tests="test_cuda_parity test_cuda_gemv test_cuda_attn test_cuda_sample"
cmake --build build-cuda -j"$(nproc)" --target $cuda_tests test_eng_forward engine_cuda gemm_lt >/dev/null
echo "built: $(cd build-cuda && ls $(printf 'tests/%s ' $cuda_tests) bench/engine_cuda bench/gemm_lt | tr '\n' ' ')"

echo "== ASan+UBSan build + unit tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Asan >/dev/null
cmake --build build-asan -j"$(nproc)" >/dev/null
(cd build-asan && PD_TEST_QUICK=1 ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest -L unit -LE release_only --output-on-failure)

echo "== libFuzzer smoke run"
CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPDSERVE_FUZZ=ON -DPDSERVE_TESTS=ON >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target fuzz_gguf fuzz_tok fuzz_kvt fuzz_pb >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in gguf tok kvt pb; do
    mkdir -p "$work/$target"
    # libFuzzer writes new inputs into the first corpus folder: a scratch one, never the committed seeds
    "$ROOT/build-fuzz/tests/fuzz_$target" -max_total_time="${PD_FUZZ_SECONDS:-12}" "$work/$target" \
        "$ROOT/tests/fuzz/corpus_$target" > "$work/$target.log" 2>&1 || { tail -n 40 "$work/$target.log"; exit 1; }
    echo "fuzz_$target: $(grep -o 'Done [0-9]* runs' "$work/$target.log"), no crash"
done
