/* test_cuda_attn.cu: eng_cuda_attention over the paged f16 KV cache against a double-precision host reference,
 * through every kernel behind it: k_attention (is_dec_mma false, tiles of ENG_CUDA_ATT_ROWS / G tokens), the
 * tensor-core decode kernel (is_dec_mma true, tiles of eng_cuda_dec_tile_tokens: two m16 tiles of query rows a block
 * at head_dim 64 where a tile has more than 16 rows), each for every sequence of the
 * batch, and then the batch as a forward splits it: chunks of >= ENG_CUDA_TC_MIN tokens in tiles of ENG_CUDA_TC_ROWS
 * to the tensor-core prefill kernel (Q and P as one f16 term, and as two), the rest to the decode kernel. Each
 * without key splits and with splits of 64 and 96 keys (partials merged by the combine kernel, which must leave the
 * prefill tiles' rows alone). Head layouts of SmolLM2 (64 x 9/3), Llama-3.2-1B (64 x 32/8), Llama-3.1-8B (128 x
 * 32/8), G = 1 (128 x 8/8) and G = 16 (64 x 16/1); queries flat (scale 1), peaked (scale 8) and aimed at a sink key
 * that takes most of the weight; the decode kernel with both its loops (eng_cuda_dec_ilp_set). Batches are built
 * like s_forward builds them: shuffled block tables, tiles of consecutive tokens of one sequence, empty pad tiles.
 * Then, not asserted, both kernels' time and KV bandwidth on 8B decode batches of 1..128 sequences of 640 keys next
 * to a device-to-device copy, with the pool cycling through more memory than L2 holds so the timings measure HBM. */
#include "eng_cuda_ops.cuh"
extern "C" {
#include "eng_quant.h"
}

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"

#define N_LAYERS    2 /* pool layers of the correctness runs: layer 1 is attended, layer 0 is random too */
#define LAYER       1 /* ... so that reading the wrong layer shows */
#define BLOCK_SIZE  16
#define N_PAD_TILES 2 /* s_forward pads the tile count to a bucket with empty tiles */

static long long g_n_checks;

static void s_fail(const char *what) {
    fprintf(stderr, "test_cuda_attn: FAILED: %s\n", what);
    exit(1);
}

static uint32_t g_lcg = 12345u;
static uint32_t s_next(void) { /* 24 random bits */
    g_lcg = g_lcg * 1664525u + 1013904223u;
    return g_lcg >> 8;
}
static float s_rand(void) { /* uniform in [-1, 1) */
    return (float)s_next() * (2.0f / 16777216.0f) - 1.0f;
}

/* Fills n f16 values in [-1, 1], returning their exact f32 values in f. */
static void s_fill(uint16_t *b, float *f, size_t n) {
    for (size_t i = 0; i < n; i++) b[i] = eng_f32_to_f16(s_rand()), f[i] = eng_f16_to_f32(b[i]);
}

/* s_kv_slot on the host: element offset of (layer, K or V, block, slot) in the pool. */
static size_t s_slot(int32_t n_blocks, int32_t layer, int32_t kind, int32_t block, int32_t slot, int32_t kv_dim) {
    const size_t chunk = ((size_t)layer * 2u + (size_t)kind) * (size_t)n_blocks + (size_t)block;
    return (chunk * BLOCK_SIZE + (size_t)slot) * (size_t)kv_dim;
}

typedef struct {
    const char *name;
    int32_t head_dim, n_heads, n_kv_heads;
} s_shape_t;

/* The batch: (new tokens, position of the first), in batch order. Decode rows see 1, 15, 16, 17, 100, 640 and
 * 1000 keys (one key, both sides of block edges, long contexts); chunks of 2..5 tokens at the end of a context
 * (one from position 0, one across a block edge, one ending at 1000 keys) and one of 17 tokens, still a CUDA-core
 * chunk (< ENG_CUDA_TC_MIN), that takes several tiles at every G. Prefill chunks (>= ENG_CUDA_TC_MIN): 40 tokens
 * from position 0 (one partial tile), 150 from 500 (a full tile and a partial one, starting mid-block) and 32
 * ending at 1000 keys. */
static const int32_t k_seqs[][2] = {{1, 639},  {2, 0},  {1, 0},     {5, 995}, {1, 14}, {40, 0},  {3, 14},   {1, 999},
                                    {17, 300}, {1, 16}, {150, 500}, {4, 60},  {1, 15}, {5, 200}, {32, 968}, {1, 99}};
#define N_SEQS ((int32_t)(sizeof k_seqs / sizeof k_seqs[0]))

enum { Q_FLAT, Q_PEAKED, Q_SINK, Q_N };
static const char *const k_q_names[Q_N] = {"flat", "peaked", "sink"};

/* softmax(q . k / sqrt(head_dim)) . v over keys 0..pos of each token, per head, in double; and in qtol what
 * rounding Q to bf16 may move each output by (3 sigma, first order): scores move by ds_j = sum_d dq_d k_jd / sqrt(hd)
 * with |dq_d| <= 2^-8 |q_d| (rms 2^-8 |q_d| / sqrt(3)), the output by sum_j p_j ds_j (v_j - out), which Cauchy-Schwarz
 * bounds by sqrt(sum_j p_j ds_j^2) sd_p(v); ds_j^2 taken at its mean over the rounding. */
static void s_reference(double *ref, double *qtol, const float *q, const float *pool_f, const int32_t *tok_pos,
                        const int32_t *tok_table, const int32_t *tables, int32_t T, const s_shape_t *sh,
                        int32_t n_blocks, int32_t max_pos) {
    const int32_t hd = sh->head_dim, G = sh->n_heads / sh->n_kv_heads;
    const int32_t q_dim = sh->n_heads * hd, kv_dim = sh->n_kv_heads * hd;
    double *s = (double *)malloc(sizeof(double) * (size_t)(max_pos + 1) * 2), *ds2 = s + max_pos + 1;
    double *o = (double *)malloc(sizeof(double) * hd * 2), *o2 = o + hd;
    if (!s || !o) s_fail("host allocation");
    const double scale = 1.0 / sqrt((double)hd), round2 = 1.0 / (65536.0 * 3.0 * hd);
    for (int32_t t = 0; t < T; t++)
        for (int32_t h = 0; h < sh->n_heads; h++) {
            const float *qr = q + (size_t)t * q_dim + (size_t)h * hd;
            const int32_t *tab = tables + tok_table[t], g = h / G;
            double mx = -INFINITY, sum = 0.0, e_ds2 = 0.0;
            for (int32_t j = 0; j <= tok_pos[t]; j++) {
                const float *kr =
                    pool_f + s_slot(n_blocks, LAYER, 0, tab[j / BLOCK_SIZE], j % BLOCK_SIZE, kv_dim) + (size_t)g * hd;
                double d = 0.0, d2 = 0.0;
                for (int32_t i = 0; i < hd; i++) {
                    const double x = (double)qr[i] * (double)kr[i];
                    d += x, d2 += x * x;
                }
                s[j] = d * scale, ds2[j] = d2 * round2;
                if (s[j] > mx) mx = s[j];
            }
            for (int32_t i = 0; i < hd; i++) o[i] = 0.0, o2[i] = 0.0;
            for (int32_t j = 0; j <= tok_pos[t]; j++) {
                const float *vr =
                    pool_f + s_slot(n_blocks, LAYER, 1, tab[j / BLOCK_SIZE], j % BLOCK_SIZE, kv_dim) + (size_t)g * hd;
                const double p = exp(s[j] - mx);
                sum += p, e_ds2 += p * ds2[j];
                for (int32_t i = 0; i < hd; i++) o[i] += p * (double)vr[i], o2[i] += p * (double)vr[i] * (double)vr[i];
            }
            e_ds2 /= sum;
            for (int32_t i = 0; i < hd; i++) {
                const size_t k = (size_t)t * q_dim + (size_t)h * hd + i;
                const double mean = o[i] / sum, var = o2[i] / sum - mean * mean;
                ref[k] = mean, qtol[k] = 3.0 * sqrt(e_ds2 * (var > 0.0 ? var : 0.0));
            }
        }
    free(s), free(o);
}

/* Every case of one head layout: 3 query kinds x {old, dec} x {no split, 64, 96 keys per split}. */
static void s_check_shape(const s_shape_t *sh, cudaStream_t st) {
    const int32_t hd = sh->head_dim, nh = sh->n_heads, nkv = sh->n_kv_heads, G = nh / nkv;
    const int32_t q_dim = nh * hd, kv_dim = nkv * hd;

    /* tokens and block tables: each sequence gets its blocks from a shuffled pool, so tables are not contiguous */
    int32_t T = 0, n_table = 0, max_pos = 0;
    for (int32_t s = 0; s < N_SEQS; s++) {
        const int32_t last = k_seqs[s][1] + k_seqs[s][0] - 1;
        T += k_seqs[s][0], n_table += last / BLOCK_SIZE + 1;
        if (last > max_pos) max_pos = last;
    }
    const int32_t n_blocks = n_table + 29; /* spare blocks no table names */
    int32_t *perm = (int32_t *)malloc(sizeof(int32_t) * n_blocks),
            *tables = (int32_t *)malloc(sizeof(int32_t) * n_table);
    int32_t *tok_pos = (int32_t *)malloc(sizeof(int32_t) * T), *tok_table = (int32_t *)malloc(sizeof(int32_t) * T);
    int32_t *seq_t0 = (int32_t *)malloc(sizeof(int32_t) * N_SEQS),
            *seq_off = (int32_t *)malloc(sizeof(int32_t) * N_SEQS);
    if (!perm || !tables || !tok_pos || !tok_table || !seq_t0 || !seq_off) s_fail("host allocation");
    for (int32_t i = 0; i < n_blocks; i++) perm[i] = i;
    for (int32_t i = n_blocks - 1; i > 0; i--) {
        const int32_t j = (int32_t)(s_next() % (uint32_t)(i + 1)), x = perm[i];
        perm[i] = perm[j], perm[j] = x;
    }
    for (int32_t s = 0, t = 0, off = 0; s < N_SEQS; s++) {
        const int32_t nb = (k_seqs[s][1] + k_seqs[s][0] - 1) / BLOCK_SIZE + 1;
        seq_t0[s] = t, seq_off[s] = off;
        for (int32_t j = 0; j < nb; j++) tables[off + j] = perm[off + j];
        for (int32_t i = 0; i < k_seqs[s][0]; i++, t++) tok_pos[t] = k_seqs[s][1] + i, tok_table[t] = off;
        off += nb;
    }

    /* the pool: every element random (layer 0 and unused blocks too); then a sink key per sequence at position
     * 2/3 of its first new token's (seen by all its tokens, inside a later split for long contexts): K = w_g, +-1
     * entries, per KV head g, which the sink queries point at */
    const size_t n_pool = (size_t)N_LAYERS * 2 * n_blocks * BLOCK_SIZE * kv_dim;
    uint16_t *pool_b = (uint16_t *)malloc(n_pool * 2);
    float *pool_f = (float *)malloc(n_pool * 4), *w = (float *)malloc(sizeof(float) * kv_dim);
    if (!pool_b || !pool_f || !w) s_fail("host allocation");
    s_fill(pool_b, pool_f, n_pool);
    for (int32_t i = 0; i < kv_dim; i++) w[i] = s_rand() < 0.0f ? -1.0f : 1.0f;
    for (int32_t s = 0; s < N_SEQS; s++) {
        const int32_t p = k_seqs[s][1] * 2 / 3;
        const size_t at = s_slot(n_blocks, LAYER, 0, tables[seq_off[s] + p / BLOCK_SIZE], p % BLOCK_SIZE, kv_dim);
        for (int32_t i = 0; i < kv_dim; i++) pool_f[at + i] = w[i], pool_b[at + i] = eng_f32_to_f16(w[i]);
    }

    const int32_t max_splits = (max_pos + 1 + 63) / 64;
    const size_t n_att = (size_t)T * q_dim;
    float *q = (float *)malloc(sizeof(float) * n_att);
    double *ref = (double *)malloc(sizeof(double) * n_att), *qtol = (double *)malloc(sizeof(double) * n_att);
    uint16_t *att = (uint16_t *)malloc(2 * n_att);
    eng_cuda_tile_t *tiles = (eng_cuda_tile_t *)malloc(sizeof(eng_cuda_tile_t) * (size_t)(T + N_PAD_TILES));
    eng_cuda_tile_t *tc_tiles = (eng_cuda_tile_t *)malloc(sizeof(eng_cuda_tile_t) * (size_t)T);
    bool *tok_is_tc = (bool *)malloc((size_t)T);
    if (!q || !ref || !qtol || !att || !tiles || !tc_tiles || !tok_is_tc) s_fail("host allocation");
    eng_cuda_kv_t *d_pool;
    __nv_bfloat16 *d_att;
    int32_t *d_tables, *d_tok_pos, *d_tok_table;
    float *d_q, *d_part_acc, *d_part_ml;
    eng_cuda_tile_t *d_tiles, *d_tc_tiles;
    CK(cudaMalloc(&d_pool, n_pool * 2));
    CK(cudaMalloc(&d_tc_tiles, sizeof(eng_cuda_tile_t) * (size_t)T));
    CK(cudaMalloc(&d_att, n_att * 2));
    CK(cudaMalloc(&d_tables, sizeof(int32_t) * n_table));
    CK(cudaMalloc(&d_tok_pos, sizeof(int32_t) * T));
    CK(cudaMalloc(&d_tok_table, sizeof(int32_t) * T));
    CK(cudaMalloc(&d_q, sizeof(float) * n_att));
    CK(cudaMalloc(&d_part_acc, sizeof(float) * max_splits * n_att));
    CK(cudaMalloc(&d_part_ml, sizeof(float) * max_splits * (size_t)T * nh * 2));
    CK(cudaMalloc(&d_tiles, sizeof(eng_cuda_tile_t) * (size_t)(T + N_PAD_TILES)));
    CK(cudaMemcpy(d_pool, pool_b, n_pool * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_tables, tables, sizeof(int32_t) * n_table, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_tok_pos, tok_pos, sizeof(int32_t) * T, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_tok_table, tok_table, sizeof(int32_t) * T, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize()); /* pageable copies may return before their DMA lands; st does not wait on them */

    eng_cuda_tokens_t tk;
    memset(&tk, 0, sizeof tk);
    tk.n_tokens = T, tk.tok_pos = d_tok_pos, tk.tok_table = d_tok_table, tk.tables = d_tables, tk.rope_cs = NULL;
    tk.block_size = BLOCK_SIZE, tk.n_blocks = n_blocks;

    for (int mode = 0; mode < Q_N; mode++) {
        /* flat: scores of std ~0.33; peaked: x8, std ~2.7; sink: 4 u + (12 / sqrt(hd)) w_g scores the sink key
         * 12 +- 2.3 against a std of ~1.6 for the others, so it takes most of the weight even at 1000 keys (and a
         * split without it must weigh ~0 in the combine) */
        const float sink_w = 12.0f / sqrtf((float)hd);
        for (int32_t t = 0; t < T; t++)
            for (int32_t h = 0; h < nh; h++)
                for (int32_t i = 0; i < hd; i++) {
                    const float u = s_rand();
                    float v = u;
                    if (mode == Q_PEAKED) v = 8.0f * u;
                    if (mode == Q_SINK) v = 4.0f * u + sink_w * w[(h / G) * hd + i];
                    q[(size_t)t * q_dim + (size_t)h * hd + i] = v;
                }
        s_reference(ref, qtol, q, pool_f, tok_pos, tok_table, tables, T, sh, n_blocks, max_pos);
        CK(cudaMemcpyAsync(d_q, q, sizeof(float) * n_att, cudaMemcpyHostToDevice, st));
        /* kernels: 0 k_attention for all, 1 the decode kernel for all, 2 and 3 as a forward splits the batch:
         * prefill chunks to the tensor-core prefill kernel (mma_terms 1, then 2), the rest to the decode kernel */
        static const char *const k_kern_names[4] = {"old", "dec", "tc1", "tc2"};
        const bool is_dec_usable = eng_cuda_dec_usable(hd, nh, nkv);
        for (int kern = 0; kern < 4; kern++) {
            const bool is_dec = kern == 1 || (kern >= 2 && is_dec_usable), is_tc = kern >= 2;
            if (kern == 1 && !is_dec_usable) {
                printf("%-13s hd=%3d heads=%2d/%d q=%-6s dec: not usable for this shape, skipped\n", sh->name, hd, nh,
                       nkv, k_q_names[mode]);
                continue;
            }
            /* tiles like s_forward: each sequence's tokens in runs of at most its kernel's tile, then the pad tiles */
            /* the decode kernel's tiles: of one m16 tile's rows with flat queries (as s_forward_run where two do not
             * pay), else as long as eng_cuda_att_tile_tokens allows (two m16 tiles a block at head_dim 64) */
            const int32_t per =
                eng_cuda_att_tile_tokens(is_dec, is_dec && mode == Q_FLAT ? 1 : eng_cuda_dec_max_m16(hd), nh, nkv);
            int32_t n_tiles = 0, n_tc = 0, max_tile = 0;
            for (int32_t s = 0; s < N_SEQS; s++) {
                const bool is_tc_seq = is_tc && k_seqs[s][0] >= ENG_CUDA_TC_MIN;
                const int32_t run = is_tc_seq ? ENG_CUDA_TC_ROWS : per;
                for (int32_t i = 0; i < k_seqs[s][0]; i += run) {
                    eng_cuda_tile_t *tl = is_tc_seq ? &tc_tiles[n_tc++] : &tiles[n_tiles++];
                    tl->t0 = seq_t0[s] + i, tl->n = k_seqs[s][0] - i < run ? k_seqs[s][0] - i : run;
                    if (!is_tc_seq && tl->n > max_tile) max_tile = tl->n;
                }
                for (int32_t i = 0; i < k_seqs[s][0]; i++) tok_is_tc[seq_t0[s] + i] = is_tc_seq;
            }
            for (int32_t i = 0; i < N_PAD_TILES; i++) tiles[n_tiles].t0 = 0, tiles[n_tiles++].n = 0;
            CK(cudaMemcpyAsync(d_tiles, tiles, sizeof(eng_cuda_tile_t) * n_tiles, cudaMemcpyHostToDevice, st));
            if (n_tc)
                CK(cudaMemcpyAsync(d_tc_tiles, tc_tiles, sizeof(eng_cuda_tile_t) * n_tc, cudaMemcpyHostToDevice, st));
            /* no split, then splits of 64 and 96 keys merged by the combine kernel */
            const int32_t splits[] = {0, 64, 96};
            for (int run = 0; run < 3; run++) {
                const int32_t sk = splits[run];
                const int32_t n_splits = sk ? (max_pos + sk) / sk : 1;
                const char *merge = !sk ? "-" : "combine";
                char name[160];
                snprintf(name, sizeof name, "%s hd=%d heads=%d/%d q=%s %s split=%d merge=%s", sh->name, hd, nh, nkv,
                         k_q_names[mode], k_kern_names[kern], sk, merge);
                eng_cuda_att_t a;
                memset(&a, 0, sizeof a);
                a.att = d_att, a.q = d_q, a.kv_pool = d_pool, a.tiles = d_tiles, a.n_tiles = n_tiles;
                a.layer = LAYER, a.n_heads = nh, a.n_kv_heads = nkv, a.head_dim = hd;
                a.split_keys = sk, a.n_splits = n_splits, a.part_acc = d_part_acc, a.part_ml = d_part_ml;
                a.tc_tiles = n_tc ? d_tc_tiles : NULL, a.n_tc_tiles = n_tc, a.is_dec_mma = is_dec;
                a.dec_m16 = is_dec ? eng_cuda_dec_m16(max_tile, nh, nkv) : 1;
                a.mma_terms = kern == 3 ? 2 : 1;
                /* NaN everywhere (output and partials), so an output or a partial the combine reads that no block
                 * wrote shows */
                CK(cudaMemsetAsync(d_att, 0xff, n_att * 2, st));
                CK(cudaMemsetAsync(d_part_acc, 0xff, sizeof(float) * max_splits * n_att, st));
                CK(cudaMemsetAsync(d_part_ml, 0xff, sizeof(float) * max_splits * (size_t)T * nh * 2, st));
                const cudaError_t err = eng_cuda_attention(&a, &tk, st);
                if (err != cudaSuccess) {
                    fprintf(stderr, "%s: eng_cuda_attention: %s\n", name, cudaGetErrorString(err));
                    s_fail("launch refused");
                }
                CK(cudaStreamSynchronize(st));
                CK(cudaGetLastError());
                CK(cudaMemcpy(att, d_att, n_att * 2, cudaMemcpyDeviceToHost));
                /* Tolerance |got - ref| <= 4e-3 + 8e-3 |ref| (+ a share of qtol). The output is rounded to bf16: up
                 * to 2^-8 = 3.9e-3 relative, hence the relative term (twice that). The tensor-core kernels round
                 * the probabilities to f16 for their P.V MMA (hi + lo: far less; one term: 2^-12 relative each, the
                 * normaliser summed from the unrounded ones), which moves the output by at most 2^-12 max|v| = 2.4e-4
                 * even if every term errs the same way; hence part of the absolute term. The decode kernel adds
                 * qtol, the 3-sigma first-order bound of rounding Q to bf16 (s_reference; kept from its bf16 days,
                 * it only loosens), and the prefill kernel with one term qtol / 8: it rounds Q to f16, 2^-11
                 * relative instead of 2^-8 (emulated for bf16, the worst error stayed under 0.35 of the bound). f32
                 * accumulation over <= 1000 keys adds ~1e-5. k_attention (f32 throughout) lands within the bf16
                 * output rounding. */
                double worst = 0.0, worst_frac = 0.0;
                for (int32_t t = 0; t < T; t++)
                    for (int32_t h = 0; h < nh; h++)
                        for (int32_t i = 0; i < hd; i++) {
                            const size_t k = (size_t)t * q_dim + (size_t)h * hd + i;
                            const double got = eng_bf16_to_f32(att[k]), want = ref[k];
                            const double q_share = tok_is_tc[t] ? (kern == 2 ? 0.125 : 0.0) : is_dec ? 1.0 : 0.0;
                            const double err = fabs(got - want), tol = 4e-3 + 8e-3 * fabs(want) + q_share * qtol[k];
                            if (!(err <= tol)) {
                                fprintf(stderr, "%s: token %d (position %d) head %d dim %d: %.6g, want %.6g\n", name, t,
                                        tok_pos[t], h, i, got, want);
                                s_fail(name);
                            }
                            if (err > worst) worst = err;
                            if (err / tol > worst_frac) worst_frac = err / tol;
                        }
                g_n_checks += (long long)n_att;
                printf(
                    "%-13s hd=%3d heads=%2d/%d q=%-6s %s split=%2d (%2d x, merge %-7s, %2d + %d tc tiles, m16 x %d): "
                    "max err %.2e (%.2f of tol), %zu checks\n",
                    sh->name, hd, nh, nkv, k_q_names[mode], k_kern_names[kern], sk, n_splits, merge, n_tiles, n_tc,
                    a.dec_m16, worst, worst_frac, n_att);
            }
        }
    }
    CK(cudaFree(d_pool));
    CK(cudaFree(d_att));
    CK(cudaFree(d_tables));
    CK(cudaFree(d_tok_pos));
    CK(cudaFree(d_tok_table));
    CK(cudaFree(d_q));
    CK(cudaFree(d_part_acc));
    CK(cudaFree(d_part_ml));
    CK(cudaFree(d_tiles));
    CK(cudaFree(d_tc_tiles));
    free(tc_tiles), free(tok_is_tc);
    free(perm), free(tables), free(tok_pos), free(tok_table), free(seq_t0), free(seq_off);
    free(pool_b), free(pool_f), free(w), free(q), free(ref), free(qtol), free(att), free(tiles);
}

/* ---- timing (printed, not asserted) ---- */

#define BENCH_WARMUP     5
#define BENCH_ITERS      50
#define BENCH_LAYERS     8
#define BENCH_KEYS       640
#define BENCH_MAX_B      128
#define BENCH_MAX_SPLITS 32  /* S_MAX_SPLITS of eng_backend_cuda.cu */
#define BENCH_SPLIT_TOK  128 /* S_SPLIT_MAX_TOKENS */

/* s_forward's key splits (eng_backend_cuda.cu, s_att_splits): about one wave of resident blocks, rounded up for
 * the old kernel (4 blocks per multiprocessor), down for the decode kernel (2), ranges of at least 64 keys (a
 * multiple of 32, of 64 for dec), sized from the longest sequence rounded up to 256. */
static void s_splits(int64_t n_tiles, int32_t n_kv_heads, int64_t max_len, int64_t T, int n_sm, bool is_dec,
                     int32_t *split_keys, int32_t *n_splits) {
    *split_keys = 0, *n_splits = 1;
    const int64_t pairs = n_tiles * n_kv_heads, len = (max_len + 255) / 256 * 256, align = is_dec ? 64 : 32;
    const int64_t want = pairs <= 0 ? 1 : is_dec ? 2 * (int64_t)n_sm / pairs : (4 * (int64_t)n_sm + pairs - 1) / pairs;
    if (want > 1 && T <= BENCH_SPLIT_TOK && max_len > 64) {
        int64_t keys = ((len + want - 1) / want + align - 1) / align * align;
        if (keys < 64) keys = 64;
        if ((len + keys - 1) / keys > BENCH_MAX_SPLITS)
            keys = ((len + BENCH_MAX_SPLITS - 1) / BENCH_MAX_SPLITS + 31) / 32 * 32;
        if ((len + keys - 1) / keys > 1) *split_keys = (int32_t)keys, *n_splits = (int32_t)((len + keys - 1) / keys);
    }
}

/* Microseconds per launch of a, BENCH_ITERS launches after BENCH_WARMUP, each on the next layer and, every
 * BENCH_LAYERS launches, the next of R disjoint block-table sets (the pool cycles through more than L2 holds). */
static double s_time_us(eng_cuda_att_t *a, eng_cuda_tokens_t *tk, const int32_t *d_perm, int32_t per_seq, int32_t R,
                        cudaEvent_t e0, cudaEvent_t e1, cudaStream_t st) {
    for (int c = 0; c < BENCH_WARMUP + BENCH_ITERS; c++) {
        if (c == BENCH_WARMUP) CK(cudaEventRecord(e0, st));
        a->layer = c % BENCH_LAYERS;
        tk->tables = d_perm + (size_t)((c / BENCH_LAYERS) % R) * a->n_tiles * per_seq;
        const cudaError_t err = eng_cuda_attention(a, tk, st);
        if (err != cudaSuccess) {
            fprintf(stderr, "bench B=%d %s: eng_cuda_attention: %s\n", a->n_tiles, a->is_dec_mma ? "dec" : "old",
                    cudaGetErrorString(err));
            s_fail("bench launch refused");
        }
    }
    float ms;
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    CK(cudaGetLastError());
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1e3 / BENCH_ITERS;
}

/* Llama-3.1-8B decode: B sequences of one new token at position 639. Launch c reads layer c % 8 and block-table
 * set (c / 8) % R of the pool, R = disjoint sets of B * 40 blocks per layer: the first 8 R launches touch no
 * byte twice, and that is the whole 2.7 GB pool (B = 1: all 55 launches, 144 MB), well past L2's 50 MB. */
static void s_bench(cudaStream_t st) {
    const int32_t hd = 128, nh = 32, nkv = 8, q_dim = nh * hd, kv_dim = nkv * hd;
    const int32_t per_seq = BENCH_KEYS / BLOCK_SIZE, n_blocks = BENCH_MAX_B * per_seq + 64;
    const size_t pool_bytes = (size_t)BENCH_LAYERS * 2 * n_blocks * BLOCK_SIZE * kv_dim * 2;
    const size_t copy_bytes = (size_t)1 << 30;
    const int Bs[] = {1, 8, 32, 64, 128};
    int dev;
    cudaDeviceProp prop;
    CK(cudaGetDevice(&dev));
    CK(cudaGetDeviceProperties(&prop, dev));
    const int n_sm = prop.multiProcessorCount;

    char *d_pool, *d_dst;
    __nv_bfloat16 *d_att;
    float *d_q, *d_part_acc, *d_part_ml;
    int32_t *d_pos, *d_tok_table, *d_perm;
    eng_cuda_tile_t *d_tiles;
    CK(cudaMalloc(&d_pool, pool_bytes));
    CK(cudaMalloc(&d_dst, copy_bytes));
    CK(cudaMalloc(&d_att, sizeof(__nv_bfloat16) * BENCH_MAX_B * q_dim));
    CK(cudaMalloc(&d_q, sizeof(float) * BENCH_MAX_B * q_dim));
    CK(cudaMalloc(&d_part_acc, sizeof(float) * BENCH_MAX_SPLITS * BENCH_MAX_B * q_dim));
    CK(cudaMalloc(&d_part_ml, sizeof(float) * BENCH_MAX_SPLITS * BENCH_MAX_B * nh * 2));
    CK(cudaMalloc(&d_pos, sizeof(int32_t) * BENCH_MAX_B));
    CK(cudaMalloc(&d_tok_table, sizeof(int32_t) * BENCH_MAX_B));
    CK(cudaMalloc(&d_perm, sizeof(int32_t) * n_blocks));
    CK(cudaMalloc(&d_tiles, sizeof(eng_cuda_tile_t) * BENCH_MAX_B));
    CK(cudaMemset(d_pool, 0x3c, pool_bytes)); /* f16 0x3c3c ~ 1.06: finite, nonzero */
    CK(cudaMemset(d_q, 0x3c, sizeof(float) * BENCH_MAX_B * q_dim));
    int32_t *perm = (int32_t *)malloc(sizeof(int32_t) * n_blocks), pos[BENCH_MAX_B], tab[BENCH_MAX_B];
    eng_cuda_tile_t tiles[BENCH_MAX_B];
    if (!perm) s_fail("host allocation");
    for (int32_t i = 0; i < n_blocks; i++) perm[i] = i;
    for (int32_t i = n_blocks - 1; i > 0; i--) {
        const int32_t j = (int32_t)(s_next() % (uint32_t)(i + 1)), x = perm[i];
        perm[i] = perm[j], perm[j] = x;
    }
    for (int32_t t = 0; t < BENCH_MAX_B; t++)
        pos[t] = BENCH_KEYS - 1, tab[t] = t * per_seq, tiles[t].t0 = t, tiles[t].n = 1;
    CK(cudaMemcpy(d_perm, perm, sizeof(int32_t) * n_blocks, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_pos, pos, sizeof pos, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_tok_table, tab, sizeof tab, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_tiles, tiles, sizeof tiles, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const double copy_gbs = cuda_copy_gbs(d_dst, d_pool, copy_bytes, st);
    printf("attention timing, llama-3.1-8b (hd=128 heads=32/8), %d keys per sequence, %d SMs; copy D2D 1 GiB: %.0f "
           "GB/s (read + written)\n",
           BENCH_KEYS, n_sm, copy_gbs);

    const bool is_dec_ok = eng_cuda_dec_usable(hd, nh, nkv);
    for (size_t bi = 0; bi < sizeof Bs / sizeof Bs[0]; bi++) {
        const int32_t B = Bs[bi], R = n_blocks / (B * per_seq);
        int32_t split_keys[2], n_splits[2];
        s_splits(B, nkv, BENCH_KEYS, B, n_sm, false, &split_keys[0], &n_splits[0]);
        s_splits(B, nkv, BENCH_KEYS, B, n_sm, true, &split_keys[1], &n_splits[1]);
        const double kv_bytes = (double)B * BENCH_KEYS * kv_dim * 2.0 * 2.0;
        /* B decode rows, one tile each; every run below sets the kernel and the splits */
        eng_cuda_tokens_t tk;
        memset(&tk, 0, sizeof tk);
        tk.n_tokens = B, tk.tok_pos = d_pos, tk.tok_table = d_tok_table, tk.rope_cs = NULL;
        tk.block_size = BLOCK_SIZE, tk.n_blocks = n_blocks;
        eng_cuda_att_t a;
        memset(&a, 0, sizeof a);
        a.att = d_att, a.q = d_q, a.kv_pool = (const eng_cuda_kv_t *)d_pool, a.tiles = d_tiles, a.n_tiles = B;
        a.n_heads = nh, a.n_kv_heads = nkv, a.head_dim = hd, a.part_acc = d_part_acc, a.part_ml = d_part_ml;
        double us[2] = {0.0, 0.0};
        for (int is_dec = 0; is_dec < 2; is_dec++) {
            if (is_dec && !is_dec_ok) continue;
            a.is_dec_mma = is_dec != 0, a.split_keys = split_keys[is_dec], a.n_splits = n_splits[is_dec];
            us[is_dec] = s_time_us(&a, &tk, d_perm, per_seq, R, e0, e1, st);
        }
        const double gbs = kv_bytes / (us[0] * 1e-6) / 1e9;
        char split[2][32];
        for (int i = 0; i < 2; i++) {
            if (split_keys[i])
                snprintf(split[i], sizeof split[i], "%d x %d keys", n_splits[i], split_keys[i]);
            else
                snprintf(split[i], sizeof split[i], "no split");
        }
        printf("B=%3d: old (%s) %7.1f us %5.0f GB/s (%3.0f%% of copy)", B, split[0], us[0], gbs,
               100.0 * gbs / copy_gbs);
        if (is_dec_ok) {
            const double dgbs = kv_bytes / (us[1] * 1e-6) / 1e9;
            printf(", dec (%s) %7.1f us %5.0f GB/s (%3.0f%%), dec %.2fx the old speed", split[1], us[1], dgbs,
                   100.0 * dgbs / copy_gbs, us[0] / us[1]);
            eng_cuda_dec_ilp_set(false);
            a.is_dec_mma = true, a.split_keys = split_keys[1], a.n_splits = n_splits[1];
            const double us_before = s_time_us(&a, &tk, d_perm, per_seq, R, e0, e1, st);
            eng_cuda_dec_ilp_set(true);
            printf("; dec with ENG_CUDA_DEC_ILP=0 %7.1f us (%3.0f%%)", us_before,
                   100.0 * kv_bytes / (us_before * 1e-6) / 1e9 / copy_gbs);
        }
        printf("\n");
        if (!is_dec_ok) continue;
        /* the decode kernel under other split counts than s_forward's rule */
        printf("        dec by splits:");
        const int n_try[] = {1, 2, 3, 4, 6, 8, 10};
        a.is_dec_mma = true;
        for (size_t ni = 0; ni < sizeof n_try / sizeof n_try[0]; ni++) {
            const int32_t n = n_try[ni], keys = n == 1 ? 0 : (BENCH_KEYS + n - 1) / n;
            a.split_keys = keys, a.n_splits = n == 1 ? 1 : (BENCH_KEYS + keys - 1) / keys;
            const double t = s_time_us(&a, &tk, d_perm, per_seq, R, e0, e1, st);
            printf(" %d: %.1f us (%.0f%%)", n, t, 100.0 * kv_bytes / (t * 1e-6) / 1e9 / copy_gbs);
        }
        printf("\n");
    }
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaFree(d_pool));
    CK(cudaFree(d_dst));
    CK(cudaFree(d_att));
    CK(cudaFree(d_q));
    CK(cudaFree(d_part_acc));
    CK(cudaFree(d_part_ml));
    CK(cudaFree(d_pos));
    CK(cudaFree(d_tok_table));
    CK(cudaFree(d_perm));
    CK(cudaFree(d_tiles));
    free(perm);
}

int main(void) {
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    const s_shape_t shapes[] = {{"smollm2", 64, 9, 3},
                                {"llama-3.2-1b", 64, 32, 8},
                                {"llama-3.1-8b", 128, 32, 8},
                                {"g1", 128, 8, 8},
                                {"g16", 64, 16, 1}};
    /* the decode kernel's two loops (eng_cuda_dec_ilp_set), the default's last so that the timings below run it */
    for (int ilp = 0; ilp < 2; ilp++) {
        eng_cuda_dec_ilp_set(ilp != 0);
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) s_check_shape(&shapes[s], st);
    }
    printf("test_cuda_attn: ok (%lld checks)\n", g_n_checks);
    fflush(stdout);
    s_bench(st);
    CK(cudaStreamDestroy(st));
    return 0;
}
