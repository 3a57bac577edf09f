#!/usr/bin/env bash
# run_gpu.sh: the GPU checks and benchmarks of issue 6, run on the lent GPU machine (through the device tool,
# carrying .debs/ from scripts/fetch_debs.sh and .whl/ from scripts/fetch_pywheels.sh). Logs go to $OUT.
#   tests/gpu/run_gpu.sh build         configure + build with -DPDSERVE_CUDA=ON (sm_90a) into build-gpu/
#   tests/gpu/run_gpu.sh parity        CPU vs CUDA on random-weight models of three head layouts
#   tests/gpu/run_gpu.sh golden        test_eng_forward on CUDA (needs the default model at $PDSERVE_MODEL)
#   tests/gpu/run_gpu.sh bench SHAPE   bench/engine_cuda on a random llama-3.2-1b, llama-3.1-8b or smollm2-135m (bf16),
#                                      greedy
#   tests/gpu/run_gpu.sh profile SHAPE per-phase GPU times (ENG_CUDA_PROFILE=1) of decode and prefill
#   tests/gpu/run_gpu.sh kernels       test_cuda_attn: paged attention (CUDA-core and tensor-core decode kernels,
#                                      with and without key splits) vs a double reference, then their time and KV
#                                      bandwidth on 8B decode batches next to a device copy; test_cuda_gemv: the
#                                      matrix-vector kernel vs a double reference, then its weight bandwidth next to
#                                      cuBLAS and a device copy; test_cuda_sample: the GPU sampler vs the host's on
#                                      hard logits, then its time
#   tests/gpu/run_gpu.sh ab SHAPE      decode under each setting in AB_ENVS (default: ENG_CUDA_GEMV=0 / 4, each twice)
#   tests/gpu/run_gpu.sh cluster       pdctl up --backend cuda: router -> prefill -> decode on the GPU
#   tests/gpu/run_gpu.sh spec          bench/run_spec_bench.sh --backend cuda (PDSERVE_MODELS: the default model's folder)
#   tests/gpu/run_gpu.sh host          bench/kv_transfer on the host CPU (issue 3), three runs
#   tests/gpu/run_gpu.sh hf SHAPE      bench/hf_peer.py, the HF transformers peer, same shapes
#   tests/gpu/run_gpu.sh kvstream SHAPE prefill with each forward's KV to the host mirror (engine_cuda --kv-to-host),
#                                      streamed layer by layer and copied after the forward (ENG_CUDA_KV_STREAM=0), twice
#   tests/gpu/run_gpu.sh kvtail SHAPE  pdctl up with SHAPE: 4096-token prompts, the prefill worker's KV-ready -> decode
#                                      commit time, KV streamed per layer and sent after the step (kv_tail.py)
#   tests/gpu/run_gpu.sh ncu SHAPE B   decode at batch B under Nsight Compute: GPU time per kernel (ncu_kernels.py)
#   tests/gpu/run_gpu.sh gemmlt S      bench/gemm_lt: cuBLAS's default GEMM against cuBLASLt's offered algorithms on the
#                                      products of shape S (8b or 1b), decode and prefill token counts
# Several stages may follow one another in one call: run_gpu.sh build parity bench llama-3.2-1b
# PD_GPUS=0,1 (cluster, kvtail): pdctl up --gpus 0,1, the prefill worker on GPU 0 and the decode worker on GPU 1
# The default model (94 MB) is over the device tool's 64 MiB per-call limit. The golden, cluster-with-SmolLM2 and
# spec stages get it in three parts over three back-to-back calls (the machine stays warm only 30 s):
#   here:  mkdir -p .relay && split -n 3 -d MODEL.gguf .relay/p && sha256sum MODEL.gguf | cut -c1-64 > .relay/sha
#   call 1 (carry .relay/p00): mkdir -p /tmp/pdrelay && cp .relay/p00 /tmp/pdrelay/
#   call 2 (carry .relay/p01): cp .relay/p01 /tmp/pdrelay/
#   call 3 (carry .debs .whl .relay/p02 .relay/sha): cat /tmp/pdrelay/p00 /tmp/pdrelay/p01 .relay/p02 >
#          /tmp/pdm/SmolLM2-135M-Instruct.Q4_1.gguf, check the sha, then PDSERVE_MODEL=that PDSERVE_MODELS=/tmp/pdm
#          bash tests/gpu/run_gpu.sh build golden ...
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT="${OUT:-$ROOT/device-out}"
MODELS="${PD_GPU_MODELS:-/tmp/pdmodels}"
mkdir -p "$OUT" "$MODELS"
source scripts/device_env.sh
export PYTHONUNBUFFERED=1

s_model() { # shape -> path, generated once per machine
    local shape=$1 path="$MODELS/$1.gguf"
    shift
    if [ ! -f "$path" ]; then
        python3 deploy/make_random_gguf.py "$path" --jobs "$(nproc)" "$@" >>"$OUT/models.log" 2>&1 || {
            echo "cannot make $shape (see models.log)"
            tail -5 "$OUT/models.log"
            return 1
        }
    fi
    echo "$path"
}

s_shape_model() { # a named shape (llama-3.2-1b, llama-3.1-8b, or smollm2-135m: SmolLM2-135M's layout) -> path
    case "$1" in
    smollm2-135m) s_model "$1" --shape custom --dim 576 --layers 30 --heads 9 --kv-heads 3 --ffn 1536 --vocab 49152 ;;
    *) s_model "$1" --shape "$1" ;;
    esac
}

while [ $# -gt 0 ]; do
    stage=$1
    shift
    case "$stage" in
    build)
        {
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
            cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DPDSERVE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a >/dev/null &&
                cmake --build build-gpu -j"$(nproc)" --target test_eng_forward test_cuda_parity engine_cuda \
                test_cuda_gemv test_cuda_sample test_cuda_attn gemm_lt \
                pdctl pd-router pd-prefill pd-decode kv_transfer 2>&1 |
                grep -E "error|warning|Error" || true
            ls -la build-gpu/tests/test_cuda_parity build-gpu/bench/engine_cuda
        } 2>&1 | tee -a "$OUT/build.log"
        ;;
    parity)
        # four head layouts: SmolLM2's (9/3 heads of 64), Llama-3.2-1B's (32/8 of 64), Llama-3.1-8B's (32/8 of 128)
        # and a 13B-like one (40/8 of 128: 5 query heads per KV head, 3-token decode tiles; dim 5120)
        m1=$(s_model smolshape --shape custom --dim 576 --layers 4 --heads 9 --kv-heads 3 --ffn 1536 --vocab 49152) &&
            m2=$(s_model l1b2 --shape llama-3.2-1b --layers 2) &&
            m3=$(s_model l8b2 --shape llama-3.1-8b --layers 2) &&
            m4=$(s_model g5 --shape custom --dim 5120 --layers 2 --heads 40 --kv-heads 8 --ffn 13824 --vocab 32000) &&
            PD_PARITY_MODELS="$m1:$m2:$m3:$m4" ./build-gpu/tests/test_cuda_parity 2>&1 | tee -a "$OUT/parity.log"
        ;;
    golden)
        PD_TEST_BACKEND=cuda ./build-gpu/tests/test_eng_forward 2>&1 | tee -a "$OUT/golden.log"
        ;;
    bench)
        shape=$1
        shift
        # as bench/RESULTS.md's engine_cuda tables: greedy rows sampled on the GPU (BENCH_ARGS replaces those flags,
        # e.g. "--sampling gpu,host --temperature 0.7"); ENG_CUDA_STEP_TIMES: per graph-launched batch size, the
        # forward's wall time against the graph's GPU time
        m=$(s_shape_model "$shape") && ENG_CUDA_STEP_TIMES=1 ./build-gpu/bench/engine_cuda --model "$m" \
            ${BENCH_ARGS:---sampling gpu --temperature 0} 2>&1 | tee -a "$OUT/bench_$shape.log"
        ;;
    profile)
        # per-phase GPU times (ENG_CUDA_PROFILE) of decode at batch 1 and 64 and of one 4096-token prefill
        shape=$1
        shift
        m=$(s_shape_model "$shape") && for args in "--decode-batches 1 --prefill-batches 0" \
            "--decode-batches 64 --prefill-batches 0" "--decode-batches 0 --prefill-batches 1"; do
            echo "== $shape $args"
            ENG_CUDA_PROFILE=1 ./build-gpu/bench/engine_cuda --model "$m" $args 2>&1 | grep -v "chat disabled"
        done 2>&1 | tee -a "$OUT/profile_$shape.log"
        ;;
    kernels)
        {
            ./build-gpu/tests/test_cuda_attn
            ./build-gpu/tests/test_cuda_sample
            ./build-gpu/tests/test_cuda_gemv
        } 2>&1 | tee -a "$OUT/kernels.log"
        ;;
    ab)
        # decode steps under each setting of AB_ENVS in turn (default: cuBLAS for every product, then the own matrix-vector kernel up to 4 rows,
        # each twice, so the pairs show run-to-run noise) at AB_BATCHES (default 1,4,8); commas join variables;
        # AB_ARGS: more engine_cuda flags (e.g. "--ctx 1536 --verify-tokens 6": a speculative verification step); rows
        # are greedy like the bench stage's unless AB_ARGS says otherwise ("--temperature 0.7": sampled); with
        # ENG_CUDA_STEP_TIMES=1 in a setting, its host and GPU time per graph-launched step follow
        shape=$1
        shift
        m=$(s_shape_model "$shape") &&
            for env in ${AB_ENVS:-ENG_CUDA_GEMV=0 ENG_CUDA_GEMV=4 ENG_CUDA_GEMV=0 ENG_CUDA_GEMV=4}; do
                echo "== $shape $env"
                env ${env//,/ } ./build-gpu/bench/engine_cuda --model "$m" --decode-batches "${AB_BATCHES:-1,4,8}" \
                    --prefill-batches 0 --sampling gpu --temperature 0 ${AB_ARGS:-} 2>&1 |
                    grep -E "^decode +[0-9]|^cuda graph steps"
            done 2>&1 | tee -a "$OUT/ab_$shape.log"
        ;;
    cluster)
        # pdctl up --backend cuda (1 prefill + 1 decode worker sharing the GPU): a greedy completion of a 200-token
        # prompt against pdctl generate --backend cuda, twice: KV copied device to device (CUDA IPC, the default), then
        # through the host mirrors and kvtransfer (prefill.kv_cuda_ipc=false); the decode worker's stats line says
        # how many MiB came device to device
        m=${PDSERVE_MODEL:-$(s_model smolshape --shape custom --dim 576 --layers 4 --heads 9 --kv-heads 3 --ffn 1536 \
            --vocab 49152)}
        for ipc in true false; do
            echo "== cluster prefill.kv_cuda_ipc=$ipc"
            ./build-gpu/deploy/pdctl up --model "$m" --backend cuda ${PD_GPUS:+--gpus $PD_GPUS} --port 18080 \
                --prefill.kv_cuda_ipc=$ipc \
                >"$OUT/cluster_up_$ipc.log" 2>&1 &
            up=$!
            python3 tests/gpu/cluster_smoke.py "$m" 18080 ./build-gpu/deploy/pdctl
            echo "cluster smoke rc=$?"
            sleep 11 # a decode stats line (every 10 s while busy) after the request
            kill -INT $up
            wait $up
            grep -E "device to device|GPU pool" "$OUT/cluster_up_$ipc.log" | tail -3
            tail -3 "$OUT/cluster_up_$ipc.log"
        done 2>&1 | tee -a "$OUT/cluster.log"
        ;;
    spec)
        # issue 5 on the GPU: bench/run_spec_bench.sh with --backend cuda (needs the default model: PDSERVE_MODEL
        # its path, PDSERVE_MODELS its folder; the RAG/chat workloads use its chat template); the draft model: its
        # first 8 layers (deploy/make_draft.py)
        draft=/tmp/pd-draft-l8.gguf
        PYTHONPATH=$(ls .whl/gguf-*.whl | head -1) python3 deploy/make_draft.py "$PDSERVE_MODEL" "$draft" --layers 8 \
            >>"$OUT/spec.log" 2>&1
        # SPEC_REQ_PER_CONC (default 8): requests per unit of concurrency, after an unmeasured SPEC_WARMUP_PER_CONC
        # (default 4) of the same cell: steady state, not the first graph captures; SPEC_K: drafts per step (--spec-k);
        # SPEC_REPEAT: rounds of the whole run (--repeat), for each cell's spread
        bench/run_spec_bench.sh build-gpu --backend cuda --draft "$draft" --concurrency "${SPEC_CONCS:-1 8 32}" \
            --spec "${SPEC_MODES:-off ngram draft}" --workloads "${SPEC_WORKLOADS:-rag chat chatvar}" \
            --requests-per-conc "${SPEC_REQ_PER_CONC:-8}" --warmup-per-conc "${SPEC_WARMUP_PER_CONC:-4}" --max-requests 0 \
            --prefill "${SPEC_PREFILL:-1}" ${SPEC_K:+--spec-k "$SPEC_K"} ${SPEC_REPEAT:+--repeat "$SPEC_REPEAT"} \
            --out "$OUT/spec_gpu.jsonl" 2>&1 | tail -n 150 | tee -a "$OUT/spec.log"
        ;;
    gemmlt)
        shape=$1
        shift
        ./build-gpu/bench/gemm_lt --shape "$shape" ${GEMMLT_ARGS:-} 2>&1 | tee -a "$OUT/gemmlt_$shape.log"
        ;;
    host)
        # issue 3 on this machine's host CPU: the KV hand-off, three runs (run-to-run spread on this host is large)
        for run in 1 2 3; do
            echo "== kv_transfer run $run"
            ./build-gpu/bench/kv_transfer --transports "${HOST_TRANSPORTS:-tcp,ipc,shm}"
        done 2>&1 | tee -a "$OUT/host.log"
        ;;
    kvstream)
        shape=$1
        shift
        m=$(s_shape_model "$shape") && for v in 1 0 1 0; do
            echo "== $shape ENG_CUDA_KV_STREAM=$v"
            ENG_CUDA_KV_STREAM=$v ./build-gpu/bench/engine_cuda --model "$m" --decode-batches 0 --kv-to-host 2>&1 |
                grep -E "^prefill +[0-9]"
        done 2>&1 | tee -a "$OUT/kvstream_$shape.log"
        ;;
    kvtail)
        # issue 3 at service level: pdctl up (1 prefill + 1 decode worker on this GPU) with the random SHAPE model,
        # KVTAIL_REQ (default 16) prompts of KVTAIL_TOKENS (default 4096) token ids, one step each; the prefill
        # worker's KV copied device to device (prefill.kv_cuda_ipc=true), streamed as each layer is stored
        # (prefill.kv_stream=true) through its shared-memory pool (prefill.kv_shm=true), and over one tcp connection
        # (KVTAIL_CFGS: stream,conns,shm,ipc); its exit line "kv hand-off" gives the KV-ready -> decode-commit time
        shape=$1
        shift
        m=$(s_shape_model "$shape") &&
            for cfg in ${KVTAIL_CFGS:-true,1,true,true true,1,true,false true,1,false,false}; do
            IFS=, read -r ks conns shm ipc <<<"$cfg"
            tag="${shape}_${ks}_${conns}_${shm}_${ipc}"
            echo "== $shape prefill.kv_stream=$ks prefill.kv_conns=$conns prefill.kv_shm=$shm prefill.kv_cuda_ipc=$ipc"
            ./build-gpu/deploy/pdctl up --model "$m" --backend cuda ${PD_GPUS:+--gpus $PD_GPUS} --port 18081 \
                --prefill.kv_stream=$ks \
                --prefill.kv_conns=$conns --prefill.kv_shm=$shm --prefill.kv_cuda_ipc=$ipc --engine.kv_mem=3GiB \
                --engine.max_batch_tokens=4096 \
                --prefill.step_tokens=4096 --prefill.chunk_tokens=4096 --ready-timeout 600 \
                >"$OUT/kvtail_$tag.log" 2>&1 &
            up=$!
            python3 tests/gpu/kv_tail.py 18081 "${KVTAIL_TOKENS:-4096}" "${KVTAIL_REQ:-16}" 128000 | tail -1
            kill -INT $up
            wait $up
            grep -E "kv hand-off|shared memory|GPU pool|error|ERROR| E " "$OUT/kvtail_$tag.log" | tail -6
        done 2>&1 | tee -a "$OUT/kvtail_$shape.log"
        ;;
    ncu)
        # graphs off so each kernel is a launch; skip the 512-token prompts' prefill and the first decode steps
        shape=$1 batch=$2
        shift 2
        m=$(s_shape_model "$shape") && ENG_CUDA_GRAPHS=0 python3 tests/gpu/ncu_kernels.py --skip 1500 \
            --count 400 -- ./build-gpu/bench/engine_cuda --model "$m" --decode-batches "$batch" --new 16 \
            --prefill-batches 0 --temperature 0 2>&1 | tee -a "$OUT/ncu_${shape}_b$batch.log"
        ;;
    hf)
        shape=$1
        shift
        python3 bench/hf_peer.py --shape "$([ "$shape" = llama-3.1-8b ] && echo 8b || echo 1b)" \
            --json "$OUT/hf_$shape.json" 2>&1 | tee -a "$OUT/hf_$shape.log"
        ;;
    *)
        echo "unknown stage $stage"
        exit 2
        ;;
    esac
done
