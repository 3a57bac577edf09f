/* test_cuda_parity.c: the CUDA backend against the CPU backend (the reference, itself checked against HF
 * transformers) on every model in PD_PARITY_MODELS (colon-separated GGUF paths; default: the default model):
 *   - six prompts of mixed lengths (1..300 tokens), each alone: prefill logits and 8 teacher-forced decode steps
 *     (both backends fed the CPU's greedy tokens) within CUDA_REL_TOL in L2 norm, and the same argmax wherever
 *     the CPU's top-2 margin is clear of the bf16 noise;
 *   - a prompt of LONG_LEN tokens alone, which takes the prefill-sized products with bf16 outputs (Q/K/V, gate/up),
 *     likewise, then 8 teacher-forced decode steps on its KV;
 *   - the same six in one batch, prompts in chunks of 13 (40 for two of them), against themselves alone on CUDA: within
 *     CUDA_BATCH_REL_TOL (cuBLAS picks kernels by shape, so not bit for bit; and batches of up to 8 rows take the
 *     norm folded into the matrix-vector product, which rounds x to bf16 before its 1 / rms where the norm kernel
 *     that feeds cuBLAS rounds after it, so the two paths differ by bf16 noise, not only by summation order: up to
 *     1.05e-2 on these random-weight models, where they were within 5e-3 when both rounded alike);
 *   - KV chunks: a chunk written with eng_kv_write_chunk reads back identical, and a CPU prefill's KV converted
 *     to f16 (the GPU pool's type) and imported into the CUDA engine continues the sequence as a CUDA prefill of it
 *     would (the disaggregated path: CPU prefill worker, CUDA decode worker), also through the pinned host mirror the
 *     services use (eng_kv_from_host), and eng_kv_to_host leaves the mirror equal to the pool, also when the
 *     forward streamed its KV there layer by layer (eng_batch_t.is_kv_to_host, over a poisoned mirror), and the
 *     progress it reports meanwhile (eng_batch_t.kv_host_layers) never runs ahead of the copies: a second thread
 *     snapshots each layer of the mirror the moment it is reported, and every snapshot equals the final KV.
 * Prints the worst errors per model. Label gpu: run by tests/gpu/run_gpu.sh on the lent GPU machine. */
#define _POSIX_C_SOURCE 200809L /* strdup, strtok_r */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng.h"
#include "eng_quant.h"
#include "pd_log.h"
#include "pd_test.h"

#define CUDA_REL_TOL       3e-2f
#define CUDA_BATCH_REL_TOL 2e-2f
#define CLEAR_MARGIN       0.5f /* CPU top-2 logit gap above which the argmax must agree */
#define N_SEQS             6
#define N_STEPS            8
#define CHUNK              13
#define CHUNK_TC           40 /* sequences 3 and 4 prefill in chunks this long: tensor-core tiles next to decode rows */
#define LONG_LEN           640 /* >= S_GU_BF16_MIN_TOK (eng_backend_cuda.cu) */

static const int s_lens[N_SEQS] = {1, 7, 33, 100, 300, 17};

typedef struct {
    eng_t *e;
    int32_t vocab;
    eng_kv_seq_t seqs[N_SEQS];
} side_t;

static int32_t s_argmax(const float *v, int32_t n, float *margin) {
    int32_t best = 0, second = -1;
    for (int32_t i = 1; i < n; i++) {
        if (v[i] > v[best])
            second = best, best = i;
        else if (second < 0 || v[i] > v[second])
            second = i;
    }
    if (margin) *margin = second < 0 ? INFINITY : v[best] - v[second];
    return best;
}

/* One sequence alone: tokens [pos, pos + n) in one forward, logits of the last; is_kv_to_host and kv_host_layers
 * (NULL: none) as in eng_batch_t. */
static void s_forward_kv(side_t *sd, int s, const int32_t *toks, int32_t n, int32_t pos, float *logits,
                         bool is_kv_to_host, int32_t *kv_host_layers) {
    REQUIRE(eng_kv_seq_reserve(&sd->seqs[s], eng_kv_pool(sd->e), eng_kv_layout(sd->e)->block_size, pos + n) == PD_OK);
    const int32_t *table = sd->seqs[s].blocks;
    eng_batch_t b = {.n_seqs = 1,
                     .n_tokens = &n,
                     .pos = &pos,
                     .block_tables = &table,
                     .n_blocks = &sd->seqs[s].n_blocks,
                     .tokens = toks,
                     .logits = logits,
                     .is_kv_to_host = is_kv_to_host,
                     .kv_host_layers = kv_host_layers};
    REQUIRE(eng_forward(sd->e, &b) == PD_OK);
}

/* eng_batch_t.kv_host_layers, watched from another thread while the forward runs: the chunks of blocks[0, n_blocks)
 * of each layer are copied out of the mirror as soon as the layer is reported (snap: layers x 2 x n_blocks chunks). */
typedef struct {
    int32_t progress; /* the batch's kv_host_layers */
    int is_done;
    int32_t n_seen, n_reports;
    const eng_kv_layout_t *km;
    const uint8_t *mirror;
    const int32_t *blocks;
    int32_t n_blocks;
    uint8_t *snap;
} s_watch_t;

/* Where the snapshot keeps layer l's chunk of kind for blocks[i]. */
static uint8_t *s_snap_chunk(const s_watch_t *w, int32_t l, int kind, int32_t i) {
    return w->snap + (((size_t)l * 2 + (size_t)kind) * (size_t)w->n_blocks + (size_t)i) * eng_kv_chunk_bytes(w->km);
}

static void *s_watch(void *arg) {
    s_watch_t *w = arg;
    const size_t cb = eng_kv_chunk_bytes(w->km);
    for (;;) {
        int is_last = __atomic_load_n(&w->is_done, __ATOMIC_ACQUIRE);
        int32_t n = __atomic_load_n(&w->progress, __ATOMIC_ACQUIRE);
        if (n > w->n_seen) w->n_reports++;
        for (; w->n_seen < n; w->n_seen++)
            for (int kind = 0; kind < 2; kind++)
                for (int32_t i = 0; i < w->n_blocks; i++)
                    memcpy(s_snap_chunk(w, w->n_seen, kind, i),
                           w->mirror + eng_kv_chunk_offset(w->km, w->n_seen, (eng_kv_kind_t)kind, w->blocks[i]), cb);
        if (is_last) return NULL;
    }
}

static void s_forward_one(side_t *sd, int s, const int32_t *toks, int32_t n, int32_t pos, float *logits) {
    s_forward_kv(sd, s, toks, n, pos, logits, false, NULL);
}

/* Chunks of the mirror that differ from the pool, over the blocks holding positions [0, n_tokens) of seq. */
static int s_mirror_diff(side_t *sd, const eng_kv_seq_t *seq, int32_t n_tokens, uint16_t *back) {
    const eng_kv_layout_t *km = eng_kv_layout(sd->e);
    const uint8_t *mbase = eng_kv_host_base(sd->e);
    int n_diff = 0;
    for (int32_t l = 0; l < km->n_layers; l++)
        for (int kind = 0; kind < 2; kind++)
            for (int32_t bi = 0; bi < (n_tokens + km->block_size - 1) / km->block_size; bi++) {
                const int32_t blk = seq->blocks[bi];
                if (eng_kv_read_chunk(sd->e, l, (eng_kv_kind_t)kind, blk, back) != PD_OK) {
                    n_diff++;
                    continue;
                }
                n_diff += memcmp(back, mbase + eng_kv_chunk_offset(km, l, (eng_kv_kind_t)kind, blk),
                                 eng_kv_chunk_bytes(km)) != 0;
            }
    return n_diff;
}

static void s_make_prompt(int32_t *dst, int n, uint32_t seed, int32_t vocab) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        dst[i] = (int32_t)((seed >> 8) % (uint32_t)(vocab - 100)) + 50;
    }
}

static void s_release(side_t *sd) {
    for (int s = 0; s < N_SEQS; s++) eng_kv_seq_release(&sd->seqs[s], eng_kv_pool(sd->e));
}

static void s_check_model(const char *path) {
    eng_params_t p = eng_params_default();
    p.model_path = path;
    p.kv_mem_bytes = 256ull << 20;
    char err[512];
    side_t cpu = {0}, gpu = {0};
    cpu.e = eng_create(&p, err, sizeof err);
    p.backend = ENG_BACKEND_CUDA;
    gpu.e = cpu.e ? eng_create(&p, err, sizeof err) : NULL;
    if (!cpu.e || !gpu.e) {
        fprintf(stderr, "eng_create(%s): %s\n", path, err);
        CHECK(false);
        eng_destroy(&cpu.e);
        return;
    }
    const int32_t V = eng_config(cpu.e)->vocab_size;
    cpu.vocab = gpu.vocab = V;
    float *lc = pd_xmalloc(sizeof(float) * (size_t)V), *lg = pd_xmalloc(sizeof(float) * (size_t)V);
    float *alone = pd_xmalloc(sizeof(float) * (size_t)V * N_SEQS * (N_STEPS + 1));
    int32_t *prompts[N_SEQS], forced[N_SEQS][N_STEPS];
    float worst = 0, worst_batch = 0;
    int n_argmax_clear = 0, n_argmax_bad = 0;

    /* 1. each sequence alone, CPU vs CUDA, teacher-forced on the CPU's greedy tokens */
    for (int s = 0; s < N_SEQS; s++) {
        prompts[s] = pd_xmalloc(sizeof(int32_t) * (size_t)s_lens[s]);
        s_make_prompt(prompts[s], s_lens[s], 77u + (uint32_t)s, V);
        s_forward_one(&cpu, s, prompts[s], s_lens[s], 0, lc);
        s_forward_one(&gpu, s, prompts[s], s_lens[s], 0, lg);
        for (int g = 0; g <= N_STEPS; g++) {
            float r = pd_test_rel_l2(lg, lc, V), margin;
            if (!(r <= worst)) worst = r;
            int32_t tc = s_argmax(lc, V, &margin), tg = s_argmax(lg, V, NULL);
            if (margin > CLEAR_MARGIN) n_argmax_clear++, n_argmax_bad += tc != tg;
            memcpy(alone + ((size_t)s * (N_STEPS + 1) + (size_t)g) * V, lg, sizeof(float) * (size_t)V);
            if (g == N_STEPS) break;
            forced[s][g] = tc;
            s_forward_one(&cpu, s, &tc, 1, s_lens[s] + g, lc);
            s_forward_one(&gpu, s, &tc, 1, s_lens[s] + g, lg);
        }
    }
    CHECK_MSG(worst <= CUDA_REL_TOL, "%s: CPU vs CUDA logits differ by %g (L2, relative)", path, worst);
    CHECK_MSG(n_argmax_bad == 0, "%s: %d of %d clear argmaxes differ", path, n_argmax_bad, n_argmax_clear);
    s_release(&gpu);

    /* 2. all six batched on CUDA, prompts in chunks, then the forced decode steps together: batches mix CUDA-core
     * tiles (short chunks), tensor-core tiles (chunks of 40) and decode rows, with and without key splits */
    int32_t done[N_SEQS] = {0}, n_gen[N_SEQS] = {0};
    float *out = pd_xmalloc(sizeof(float) * (size_t)V * N_SEQS);
    for (int step = 0; step < 64; step++) {
        int32_t nt[N_SEQS], pos[N_SEQS], nb[N_SEQS], toks[N_SEQS * CHUNK_TC], idx[N_SEQS];
        const int32_t *tables[N_SEQS];
        int ns = 0, ntok = 0;
        for (int s = 0; s < N_SEQS; s++) {
            if (n_gen[s] > N_STEPS) continue;
            int32_t n, ps;
            const int32_t *src;
            if (done[s] < s_lens[s]) {
                const int32_t chunk = s == 3 || s == 4 ? CHUNK_TC : CHUNK;
                n = s_lens[s] - done[s] < chunk ? s_lens[s] - done[s] : chunk, ps = done[s], src = prompts[s] + done[s];
            } else {
                n = 1, ps = s_lens[s] + n_gen[s] - 1, src = &forced[s][n_gen[s] - 1];
            }
            REQUIRE(eng_kv_seq_reserve(&gpu.seqs[s], eng_kv_pool(gpu.e), eng_kv_layout(gpu.e)->block_size, ps + n) ==
                    PD_OK);
            memcpy(toks + ntok, src, sizeof(int32_t) * (size_t)n);
            nt[ns] = n, pos[ns] = ps, tables[ns] = gpu.seqs[s].blocks, nb[ns] = gpu.seqs[s].n_blocks, idx[ns] = s;
            ntok += n, ns++;
        }
        if (ns == 0) break;
        eng_batch_t b = {.n_seqs = ns,
                         .n_tokens = nt,
                         .pos = pos,
                         .block_tables = tables,
                         .n_blocks = nb,
                         .tokens = toks,
                         .logits = out};
        REQUIRE(eng_forward(gpu.e, &b) == PD_OK);
        for (int i = 0; i < ns; i++) {
            int s = idx[i];
            if (done[s] < s_lens[s]) {
                done[s] += nt[i];
                if (done[s] < s_lens[s]) continue;
            }
            float r =
                pd_test_rel_l2(out + (size_t)i * V, alone + ((size_t)s * (N_STEPS + 1) + (size_t)n_gen[s]) * V, V);
            if (!(r <= worst_batch)) worst_batch = r;
            n_gen[s]++;
        }
    }
    for (int s = 0; s < N_SEQS; s++) CHECK_EQ_INT(n_gen[s], N_STEPS + 1);
    CHECK_MSG(worst_batch <= CUDA_BATCH_REL_TOL, "%s: batched vs alone on CUDA differ by %g", path, worst_batch);
    s_release(&gpu);

    /* 3. KV chunks: round trip, then CPU prefill -> f16 -> CUDA decode against CUDA prefill -> CUDA decode */
    const eng_kv_layout_t *kl = eng_kv_layout(gpu.e), *kc = eng_kv_layout(cpu.e);
    const size_t chunk_elems = eng_kv_chunk_elems(kl);
    uint16_t *h16 = pd_xmalloc(chunk_elems * 2), *back = pd_xmalloc(chunk_elems * 2);
    float *h32 = pd_xmalloc(chunk_elems * 4);
    for (size_t i = 0; i < chunk_elems; i++) h16[i] = eng_f32_to_f16((float)((i * 2654435761u) % 1000) / 500.0f - 1);
    const int32_t last = eng_kv_pool_n_blocks(eng_kv_pool(gpu.e)) - 1; /* the layout has the backend's pad block too */
    CHECK_EQ_INT(eng_kv_write_chunk(gpu.e, kl->n_layers - 1, ENG_KV_V, last, h16), PD_OK);
    CHECK_EQ_INT(eng_kv_read_chunk(gpu.e, kl->n_layers - 1, ENG_KV_V, last, back), PD_OK);
    CHECK(memcmp(h16, back, chunk_elems * 2) == 0);
    CHECK_EQ_INT(eng_kv_write_chunk(gpu.e, kl->n_layers - 1, ENG_KV_V, last + 1, h16), PD_EINVAL); /* not the pool's */

    const int s = 4; /* the 300-token prompt: 19 blocks */
    eng_kv_seq_release(&cpu.seqs[s], eng_kv_pool(cpu.e));
    s_forward_one(&cpu, s, prompts[s], s_lens[s], 0, lc);
    REQUIRE(eng_kv_seq_reserve(&gpu.seqs[s], eng_kv_pool(gpu.e), kl->block_size, s_lens[s] + 1) == PD_OK);
    const int32_t n_blocks = (s_lens[s] + kl->block_size - 1) / kl->block_size;
    REQUIRE(kc->block_size == kl->block_size);
    for (int32_t l = 0; l < kl->n_layers; l++)
        for (int kind = 0; kind < 2; kind++)
            for (int32_t bi = 0; bi < n_blocks; bi++) {
                REQUIRE(eng_kv_read_chunk(cpu.e, l, (eng_kv_kind_t)kind, cpu.seqs[s].blocks[bi], h32) == PD_OK);
                for (size_t i = 0; i < chunk_elems; i++) h16[i] = eng_f32_to_f16(h32[i]);
                REQUIRE(eng_kv_write_chunk(gpu.e, l, (eng_kv_kind_t)kind, gpu.seqs[s].blocks[bi], h16) == PD_OK);
            }
    const int32_t next = forced[s][0];
    s_forward_one(&gpu, s, &next, 1, s_lens[s], lg);                /* decode on the imported KV */
    const float *own = alone + ((size_t)s * (N_STEPS + 1) + 1) * V; /* CUDA prefill + the same step */
    float r_import = pd_test_rel_l2(lg, own, V);
    CHECK_MSG(r_import <= CUDA_REL_TOL, "%s: decode on imported CPU KV differs by %g", path, r_import);

    /* 4. the host mirror the services' kvtransfer uses (kv_host_mirror): CPU KV as f16 written into the mirror,
     * eng_kv_from_host, the same decode step; then a CUDA prefill's eng_kv_to_host equals its chunks read back */
    p.kv_host_mirror = true;
    side_t mir = {0};
    mir.e = eng_create(&p, err, sizeof err);
    REQUIRE(mir.e != NULL);
    uint8_t *mbase = eng_kv_host_base(mir.e);
    const eng_kv_layout_t *km = eng_kv_layout(mir.e);
    REQUIRE(mbase != NULL && km->n_blocks == kl->n_blocks);
    REQUIRE(eng_kv_seq_reserve(&mir.seqs[s], eng_kv_pool(mir.e), km->block_size, s_lens[s] + 1) == PD_OK);
    for (int32_t l = 0; l < km->n_layers; l++)
        for (int kind = 0; kind < 2; kind++)
            for (int32_t bi = 0; bi < n_blocks; bi++) {
                REQUIRE(eng_kv_read_chunk(cpu.e, l, (eng_kv_kind_t)kind, cpu.seqs[s].blocks[bi], h32) == PD_OK);
                uint16_t *dst =
                    (uint16_t *)(mbase + eng_kv_chunk_offset(km, l, (eng_kv_kind_t)kind, mir.seqs[s].blocks[bi]));
                for (size_t i = 0; i < chunk_elems; i++) dst[i] = eng_f32_to_f16(h32[i]);
            }
    CHECK_EQ_INT(eng_kv_from_host(mir.e, mir.seqs[s].blocks, n_blocks), PD_OK);
    s_forward_one(&mir, s, &next, 1, s_lens[s], lg);
    float r_mirror = pd_test_rel_l2(lg, own, V);
    CHECK_MSG(r_mirror <= CUDA_REL_TOL, "%s: decode on mirror-imported CPU KV differs by %g", path, r_mirror);
    const int s2 = 3; /* a CUDA prefill of 100 tokens, then to the mirror */
    s_forward_one(&mir, s2, prompts[s2], s_lens[s2], 0, lg);
    CHECK_EQ_INT(eng_kv_to_host(mir.e, mir.seqs[s2].blocks, 0, s_lens[s2]), PD_OK);
    int n_diff = s_mirror_diff(&mir, &mir.seqs[s2], s_lens[s2], back);
    CHECK_MSG(n_diff == 0, "%s: %d chunks of the mirror differ from the pool after eng_kv_to_host", path, n_diff);

    /* 5. the same with the KV streamed to the mirror during the forward (eng_batch_t.is_kv_to_host): the 300-token
     * prompt again, in chunks of 200 and 100 (the second rewrites the block the first ended in), over a mirror
     * poisoned first, so only copies make it equal; then eng_kv_to_host of a sequence the last forward did not
     * write (sequence s2's, poisoned with the rest), which must copy it instead of taking the streamed blocks for it */
    const int s3 = 4;
    eng_kv_seq_release(&mir.seqs[s3], eng_kv_pool(mir.e));
    REQUIRE(eng_kv_seq_reserve(&mir.seqs[s3], eng_kv_pool(mir.e), km->block_size, s_lens[s3]) == PD_OK);
    memset(mbase, 0xff, eng_kv_pool_bytes(km));
    s_watch_t w = {
        .km = km, .mirror = mbase, .blocks = mir.seqs[s3].blocks, .n_blocks = eng_kv_blocks_for(200, km->block_size)};
    w.snap = malloc((size_t)km->n_layers * 2u * (size_t)w.n_blocks * eng_kv_chunk_bytes(km));
    pthread_t watcher;
    REQUIRE(w.snap && pthread_create(&watcher, NULL, s_watch, &w) == 0);
    s_forward_kv(&mir, s3, prompts[s3], 200, 0, lg, true, &w.progress); /* reserved already: no new blocks */
    __atomic_store_n(&w.is_done, 1, __ATOMIC_RELEASE); /* the forward has returned: no report may follow */
    pthread_join(watcher, NULL);
    CHECK_EQ_INT(eng_kv_to_host(mir.e, mir.seqs[s3].blocks, 0, 200), PD_OK);
    const int n_diff_a = s_mirror_diff(&mir, &mir.seqs[s3], 200, back);
    int n_early = 0;
    for (int32_t l = 0; l < w.n_seen; l++)
        for (int kind = 0; kind < 2; kind++)
            for (int32_t i = 0; i < w.n_blocks; i++)
                n_early += memcmp(s_snap_chunk(&w, l, kind, i),
                                  mbase + eng_kv_chunk_offset(km, l, (eng_kv_kind_t)kind, w.blocks[i]),
                                  eng_kv_chunk_bytes(km)) != 0;
    CHECK_EQ_INT(w.n_seen, km->n_layers); /* every layer reported by the time eng_forward returned */
    CHECK_MSG(n_early == 0, "%s: %d chunks were reported in the mirror before their copy landed", path, n_early);
    fprintf(stderr, "  %s: streamed KV progress: %d layers in %d reports seen while the forward ran\n", path, w.n_seen,
            w.n_reports);
    free(w.snap);
    s_forward_kv(&mir, s3, prompts[s3] + 200, s_lens[s3] - 200, 200, lg, true, NULL);
    CHECK_EQ_INT(eng_kv_to_host(mir.e, mir.seqs[s3].blocks, 200, s_lens[s3] - 200), PD_OK);
    const int n_diff_b = s_mirror_diff(&mir, &mir.seqs[s3], s_lens[s3], back);
    CHECK_EQ_INT(eng_kv_to_host(mir.e, mir.seqs[s2].blocks, 0, s_lens[s2]), PD_OK);
    const int n_diff_c = s_mirror_diff(&mir, &mir.seqs[s2], s_lens[s2], back);
    CHECK_MSG(n_diff_a == 0 && n_diff_b == 0 && n_diff_c == 0,
              "%s: streamed KV: %d / %d chunks of the mirror differ after the chunks, %d after a sequence not streamed",
              path, n_diff_a, n_diff_b, n_diff_c);
    s_release(&mir);
    for (int i = 0; i < N_SEQS; i++) eng_kv_seq_fini(&mir.seqs[i]);
    eng_destroy(&mir.e);

    s_release(&cpu), s_release(&gpu);

    /* 4. a long prompt alone (sequence 0's slot on both), CPU vs CUDA, teacher-forced like 1. */
    int32_t *long_prompt = pd_xmalloc(sizeof(int32_t) * LONG_LEN);
    s_make_prompt(long_prompt, LONG_LEN, 991u, V);
    float worst_long = 0;
    s_forward_one(&cpu, 0, long_prompt, LONG_LEN, 0, lc);
    s_forward_one(&gpu, 0, long_prompt, LONG_LEN, 0, lg);
    for (int g = 0; g <= N_STEPS; g++) {
        float r = pd_test_rel_l2(lg, lc, V), margin;
        if (!(r <= worst_long)) worst_long = r;
        int32_t tc = s_argmax(lc, V, &margin), tg = s_argmax(lg, V, NULL);
        if (margin > CLEAR_MARGIN) n_argmax_clear++, n_argmax_bad += tc != tg;
        if (g == N_STEPS) break;
        s_forward_one(&cpu, 0, &tc, 1, LONG_LEN + g, lc);
        s_forward_one(&gpu, 0, &tc, 1, LONG_LEN + g, lg);
    }
    CHECK_MSG(worst_long <= CUDA_REL_TOL, "%s: %d-token prompt: CPU vs CUDA logits differ by %g (L2, relative)", path,
              LONG_LEN, worst_long);
    CHECK_MSG(n_argmax_bad == 0, "%s: %d of %d clear argmaxes differ", path, n_argmax_bad, n_argmax_clear);
    free(long_prompt);

    fprintf(stderr,
            "  %s: CPU vs CUDA worst rel L2 %.2e (tol %.0e; %d-token prompt %.2e); clear argmaxes %d/%d equal; "
            "batched+chunked vs alone %.2e (tol %.0e); decode on CPU-prefilled KV %.2e (through the host mirror "
            "%.2e)\n",
            path, worst, CUDA_REL_TOL, LONG_LEN, worst_long, n_argmax_clear - n_argmax_bad, n_argmax_clear, worst_batch,
            CUDA_BATCH_REL_TOL, r_import, r_mirror);
    s_release(&cpu), s_release(&gpu);
    for (int i = 0; i < N_SEQS; i++) {
        eng_kv_seq_fini(&cpu.seqs[i]), eng_kv_seq_fini(&gpu.seqs[i]);
        free(prompts[i]);
    }
    free(h16), free(back), free(h32), free(out), free(alone), free(lc), free(lg);
    eng_destroy(&gpu.e);
    eng_destroy(&cpu.e);
}

static void test_parity(void) {
    const char *env = getenv("PD_PARITY_MODELS");
    char *list = strdup(env && *env ? env : pd_test_model_path());
    for (char *save = NULL, *m = strtok_r(list, ":", &save); m; m = strtok_r(NULL, ":", &save)) s_check_model(m);
    free(list);
}

int main(void) {
    pd_log_init("test", PD_LOG_WARN);
    PD_TEST_RUN(test_parity);
    return pd_test_finish();
}
