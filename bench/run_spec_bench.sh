#!/usr/bin/env bash
# run_spec_bench.sh: speculative decoding against none, on two workloads (bench/workloads/rag.jsonl: answers
# that quote a long prompt; chat.jsonl: answers that do not) at several concurrencies. For each spec mode
# it starts one cluster (pdctl up), then for each workload and concurrency C runs
# `pdctl bench --prompts W.jsonl --concurrency C --requests R` (closed loop: C requests in flight, greedy,
# ignore_eos, 128 tokens each; R = max(8, P * C) with P = --requests-per-conc (default 2), at most --max-requests) with the router's /metrics scraped before and after, and appends one
# JSON line per run (bench/spec_report.py result) to the results file. Ends with a markdown table: output
# tokens/s and each stream's decode speed, their ratios to spec=off at the same workload and concurrency (and round),
# ITL p50, acceptance rate and tokens per verification step. It measures; it does not judge (no thresholds, exit 0 unless it cannot run).
#
# usage: bench/run_spec_bench.sh BUILD_DIR [--draft PATH] [--quick] [options]
#   --draft PATH        also run spec=draft with this draft model (deploy/make_draft.py makes one)
#   --quick             smoke run: concurrency 1 only
#   --spec "M ..."      spec modes to run (default: off ngram, plus draft with --draft)
#   --workloads "W ..." workloads to run (default: rag chat)
#   --concurrency "C ..." (default: 1 8 32)
#   --spec-k K          draft tokens per step (--decode.spec_k; default: the service's)
#   --threads T         compute threads for the whole cluster (default 2, env PD_BENCH_THREADS)
#   --backend B         cpu (default) or cuda: the workers' engine (pdctl up --backend; a -DPDSERVE_CUDA=ON build)
#   --requests-per-conc P  R = max(8, P * C) (default 2; on a GPU, where a cell lasts a fraction of a second, a
#                       larger P measures steady state instead of the first steps' CUDA graph captures)
#   --warmup-per-conc W before each measured run, an unmeasured one of W * C requests of the same workload and
#                       concurrency (default 0). Why: on a GPU every new batch shape is first launched directly and
#                       then captured as a CUDA graph, a one-time cost of a long-running server that a cell lasting
#                       seconds pays in its timing, and drafts make more shapes (RAG at C = 1 with n-gram drafts
#                       captured 55 graphs and launched 81 forwards directly, against 26 and 29 without)
#   --max-requests N    cap on R per run (default 32, 0 = none). Why: on 2 cores one prefill thread
#                       takes ~7-8 s per 1.3k-token RAG prompt, so R = 64 at C = 32 would cost ~8 min per
#                       spec mode alone and the default run would not fit in 20 min
#   --prefill N         prefill workers (default 1; 0: the decode worker prefills locally, in its own batch: on a GPU
#                       shared by two workers the prefill process's forwards time-slice with the decode steps)
#   --kv-mem SIZE       KV pool of each worker (default 4GiB: 32 RAG sequences of up to ~2.2k tokens take
#                       ~3.1 GiB of f32 KV with SmolLM2-135M; the pool is touched only as it fills)
#   --repeat R          the whole run R times over (default 1): each round starts every spec mode's cluster afresh
#                       and runs every cell, so a cell's ratio to spec=off comes R times, from rounds run in turn
#                       (why: on a GPU two runs of the same cell differ by about 5%, as much as "never slower" is about)
#   --out FILE          results (default BUILD_DIR/spec_bench/results-DATE.jsonl; logs beside it)
#
# Why 1 prefill + 1 decode and not a colocated worker (--prefill 0): we measure decode. A colocated
# worker prefills the next 1-2k-token RAG prompts inside its decode batch, so decode steps and their
# tokens/step would mix prefill chunks with verification, and spec's gain would be diluted by prefill time
# differently at each concurrency. With 1P+1D the decode worker runs only decode steps (its counters are
# pure), at the price of one thread each on a 2-core machine.
#
# Prompts: the files hold the user message of a chat turn. pdctl bench sends JSONL prompts as raw
# completion text unless it has a --chat option (the wrapper uses it when `pdctl bench --help` lists it);
# each result line says which ("prompt_format": chat or raw).
#
# Time on 2 cores (1 thread each), measured with spec=off: RAG at C=1 (8 requests) 104 s, chat at C=1 17 s.
# RAG is bound by prefill (~7.7 s per 1.3k-token prompt), so a spec mode costs ~8 min of RAG (8 + 16 + 32
# prompts) plus ~1.5 min of chat: the default run (off, ngram) ~19 min, ~29 min with --draft; --quick
# ~2 min per spec mode.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '/^# usage:/,/^#   --out/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -h | --help) usage ;; esac
BUILD=$1
shift
BACKEND=cpu DRAFT="" QUICK=0 SPECS="" WORKLOADS="rag chat" CONCS="1 8 32" SPEC_K="" OUT="" MAX_REQ=32 N_PREFILL=1
REPEAT=1
THREADS=${PD_BENCH_THREADS:-2}
KV_MEM=4GiB
while [ $# -gt 0 ]; do
    case "$1" in
    --draft) DRAFT=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --spec) SPECS=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --concurrency) CONCS=$2; shift 2 ;;
    --spec-k) SPEC_K=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --kv-mem) KV_MEM=$2; shift 2 ;;
    --prefill) N_PREFILL=$2; shift 2 ;;
    --max-requests) MAX_REQ=$2; shift 2 ;;
    --requests-per-conc) REQ_PER_CONC=$2; shift 2 ;;
    --warmup-per-conc) WARMUP_PER_CONC=$2; shift 2 ;;
    --repeat) REPEAT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "run_spec_bench: unknown option $1" >&2; usage ;;
    esac
done
[ "$QUICK" = 1 ] && CONCS="1"
case "$REPEAT" in '' | *[!0-9]* | 0) echo "run_spec_bench: --repeat takes a count of 1 or more" >&2; usage ;; esac
if [ -z "$SPECS" ]; then
    SPECS="off ngram"
    [ -n "$DRAFT" ] && SPECS="$SPECS draft"
fi
PDCTL="$BUILD/deploy/pdctl"
for b in "$PDCTL" "$BUILD/router/pd-router" "$BUILD/prefill/pd-prefill" "$BUILD/decode/pd-decode"; do
    [ -x "$b" ] || { echo "run_spec_bench: $b not built (cmake --build $BUILD --target pdctl pd-router pd-prefill pd-decode)" >&2; exit 2; }
done
if [ -n "$DRAFT" ] && [ ! -f "$DRAFT" ]; then echo "run_spec_bench: no draft model at $DRAFT" >&2; exit 2; fi
for w in $WORKLOADS; do
    [ -f "bench/workloads/$w.jsonl" ] || { echo "run_spec_bench: no bench/workloads/$w.jsonl" >&2; exit 2; }
done
OUT=${OUT:-$BUILD/spec_bench/results-$(date +%Y%m%d-%H%M%S).jsonl}
WORK="${OUT%.jsonl}.d"
mkdir -p "$(dirname "$OUT")" "$WORK"
: >"$OUT"

# The services know --decode.spec only once speculation has landed: before that, only spec=off runs.
HAS_SPEC=0
"$BUILD/decode/pd-decode" --help 2>&1 | grep -q -- '--decode.spec=' && HAS_SPEC=1
CHAT_FLAG=() FORMAT=raw
if "$PDCTL" bench --help 2>&1 | grep -q -- '--chat'; then
    CHAT_FLAG=(--chat) FORMAT=chat
else
    echo "run_spec_bench: pdctl bench has no --chat: prompts go as raw completion text, not through the chat template" >&2
fi

n_runs=0
for _ in $SPECS; do for _ in $WORKLOADS; do for _ in $CONCS; do n_runs=$((n_runs + REPEAT)); done; done; done
echo "run_spec_bench: $n_runs runs (spec: $SPECS; workloads: $WORKLOADS; concurrency: $CONCS; $REPEAT round(s))," \
    "$THREADS threads, results in $OUT" >&2

CLUSTER_PID=""
stop_cluster() {
    [ -n "$CLUSTER_PID" ] || return 0
    kill -TERM "$CLUSTER_PID" 2>/dev/null || true
    wait "$CLUSTER_PID" 2>/dev/null || true
    CLUSTER_PID=""
}
trap stop_cluster EXIT
trap 'exit 130' INT TERM

start_cluster() { # spec mode, round; sets URL, API
    local spec=$1 log args=()
    log="$WORK/cluster-$1$(round_suffix "$2").log"
    if [ "$HAS_SPEC" = 1 ]; then
        args+=("--decode.spec=$spec")
        [ -n "$SPEC_K" ] && [ "$spec" != off ] && args+=("--decode.spec_k=$SPEC_K")
        [ "$spec" = draft ] && args+=("--decode.draft_model=$DRAFT")
        # SPEC_UP_ARGS (environment): more pdctl up flags for the speculating clusters, e.g.
        # "--decode.spec_fixed_k=true" (every row drafts all it can: what drafting gives before the guard decides)
        [ "$spec" != off ] && [ -n "${SPEC_UP_ARGS:-}" ] && read -r -a more <<<"$SPEC_UP_ARGS" && args+=("${more[@]}")
    fi
    # UP_ARGS (environment): more pdctl up flags for every cluster, e.g. "--mps off"
    [ -n "${UP_ARGS:-}" ] && read -r -a every <<<"$UP_ARGS" && args+=("${every[@]}")
    "$PDCTL" up --port 0 --threads "$THREADS" --prefill "$N_PREFILL" --decode 1 --backend "$BACKEND" \
        "--engine.kv_mem=$KV_MEM" \
        "${args[@]}" \
        >"$log" 2>&1 &
    CLUSTER_PID=$!
    URL="" API=""
    for _ in $(seq 1 900); do
        if grep -q '^pdserve up:' "$log"; then
            URL=$(grep -o '^pdserve up: http://[0-9.:]*' "$log" | head -n 1 | cut -d' ' -f3)
            API=$(grep -o 'api=tcp://[0-9.:]*' "$log" | head -n 1 | cut -d= -f2)
            break
        fi
        kill -0 "$CLUSTER_PID" 2>/dev/null || break
        sleep 0.2
    done
    if [ -z "$URL" ] || [ -z "$API" ]; then
        echo "run_spec_bench: cluster for spec=$spec did not come up; its log:" >&2
        tail -n 30 "$log" >&2
        stop_cluster
        return 1
    fi
    # Warm-up: first-touch of weights and KV pages, kv connections, so the first measured run is like the rest.
    "$PDCTL" bench --api "$API" --requests 2 --concurrency 2 --prompt-len 64 --output-len 8 --json >/dev/null
}

round_suffix() { # round -> "" for the only round, else "-rN" (file names as before a single round)
    if [ "$REPEAT" -gt 1 ]; then echo "-r$1"; fi
}

scrape() { # file; worker counters reach the router with heartbeats (250 ms): let the last one arrive
    sleep 1
    curl -sf "$URL/metrics" >"$1"
}

t_all=$(date +%s)
for round in $(seq 1 "$REPEAT"); do
    for spec in $SPECS; do
        if [ "$spec" != off ] && [ "$HAS_SPEC" = 0 ]; then
            echo "run_spec_bench: skipping spec=$spec: this build's pd-decode has no --decode.spec option" >&2
            continue
        fi
        if [ "$spec" = draft ] && [ -z "$DRAFT" ]; then
            echo "run_spec_bench: skipping spec=draft: no --draft PATH" >&2
            continue
        fi
        start_cluster "$spec" "$round" || continue
        for w in $WORKLOADS; do
            for c in $CONCS; do
                r=$((${REQ_PER_CONC:-2} * c > 8 ? ${REQ_PER_CONC:-2} * c : 8))
                [ "$MAX_REQ" -gt 0 ] && [ "$r" -gt "$MAX_REQ" ] && r=$MAX_REQ
                tag="$spec-$w-c$c$(round_suffix "$round")"
                t0=$(date +%s)
                if [ "${WARMUP_PER_CONC:-0}" -gt 0 ]; then
                    "$PDCTL" bench --api "$API" --prompts "bench/workloads/$w.jsonl" --concurrency "$c" \
                        --requests $((WARMUP_PER_CONC * c)) --json "${CHAT_FLAG[@]}" >/dev/null \
                        2>"$WORK/$tag.warmup.err" ||
                        echo "run_spec_bench: $tag: warm-up: $(tail -n 1 "$WORK/$tag.warmup.err")" >&2
                fi
                scrape "$WORK/$tag.before.txt"
                "$PDCTL" bench --api "$API" --prompts "bench/workloads/$w.jsonl" --concurrency "$c" --requests "$r" \
                    --json "${CHAT_FLAG[@]}" >"$WORK/$tag.bench.json" 2>"$WORK/$tag.bench.err" ||
                    echo "run_spec_bench: $tag: pdctl bench: $(tail -n 1 "$WORK/$tag.bench.err")" >&2
                scrape "$WORK/$tag.after.txt"
                if [ -s "$WORK/$tag.bench.json" ]; then
                    python3 bench/spec_report.py result --spec "$spec" --workload "$w" --concurrency "$c" \
                        --round "$round" \
                        --prompt-format "$FORMAT" --bench "$WORK/$tag.bench.json" --before "$WORK/$tag.before.txt" \
                        --after "$WORK/$tag.after.txt" >>"$OUT"
                    echo "run_spec_bench: $tag: $(tail -n 1 "$OUT" | cut -c1-160)... ($(($(date +%s) - t0)) s)" >&2
                else
                    echo "run_spec_bench: $tag: no result" >&2
                fi
            done
        done
        stop_cluster
    done
done
echo "run_spec_bench: done in $(($(date +%s) - t_all)) s; results $OUT" >&2
[ -s "$OUT" ] && python3 bench/spec_report.py table "$OUT"
