/* eng_cuda_sample.cu: eng_sampler_sample on the GPU (eng_cuda_sample.cuh). One logits row per thread-block cluster of
 * S_CS blocks of 1024 threads (Hopper clusters): block r of the cluster owns tokens [r * 1024, r * 1024 + 1024) of
 * every 1024 * S_CS, and the blocks combine their partial sums, maxima and histograms through distributed shared
 * memory, always in block order, so every block reaches the same decisions and the results do not vary run to run.
 * One block per row left 131 of an H100's 132 multiprocessors idle at batch 1 (about 1 ms for a flat 128k row).
 *
 * The ranking of eng_sample.h (w descending, equal w by lower id) is one 64-bit integer per token here:
 * (0x3F800000 - bits(w)) << 18 | id, smaller = ranked first, so every cut of the ranking (top-k, top-p, min-p, the
 * draw) is "rank <= R" for one R, found by a radix selection over that integer, 8 bits per level, with a count and
 * a mass histogram in shared memory. The top logprobs use the same selection on the raw logits' order keys.
 * Float operations that decide a token are written with explicit rounding intrinsics (__fmul_rn, __fadd_rn, ...)
 * so nvcc does not contract them into FMAs: the C build (-std=c11) does not either, and the results match bit for
 * bit. */
#include <float.h>
#include <math.h>
#include <stdint.h>

#include <cooperative_groups.h>

#include "eng_cuda_ops.cuh"
#include "eng_cuda_sample.cuh"

namespace cg = cooperative_groups;

#define S_NT       1024
#define S_NW       (S_NT / 32)
#define S_CS       8 /* blocks per row: the portable cluster size */
#define S_STRIDE   (S_NT * S_CS)
#define S_ID_BITS  18
#define S_BUCKETS  256
#define S_CAND_CAP 4096 /* candidates kept in shared memory; more (a flat distribution): selections over the row */

#define S_KEY_NEG_INF 0x007FFFFFu /* s_order_key(-INFINITY) */
#define S_KEY_POS_INF 0xFF800000u /* s_order_key(+INFINITY) */

enum { S_COUNT, S_MASS_GE, S_MASS_GT }; /* eng_sample.c's s_cut modes */

typedef struct {
    uint32_t count[S_BUCKETS];                /* this block's histogram of a selection level (read by the cluster) */
    unsigned long long mass_units[S_BUCKETS]; /* a bucket's mass, exactly, in units of 2^(its s_unit_exp) */
    uint32_t all_count[S_BUCKETS];            /* the cluster's histogram */
    double all_mass[S_BUCKETS];
    double red_d[S_NW];
    uint32_t red_u[S_NW];
    double part_d; /* this block's partial of a cluster reduction */
    uint32_t part_u;
    int32_t sel_b;
    uint32_t sel_c;
    double sel_m;
    int32_t n_top;
    uint64_t found; /* s_select's early stop: the rank of the one token left, ~0 in blocks that do not own it */
    uint64_t top_rank[ENG_MAX_LOGPROBS]; /* this block's tokens among the top logprobs */
    uint64_t cand[S_CAND_CAP];           /* ranks of this block's tokens that can still matter, in id order */
} s_shared_t;

/* A block's place in its row's cluster. */
typedef struct {
    cg::cluster_group cl;
    int32_t first; /* the first token this block owns: rank * S_NT */
    s_shared_t *sh;
} s_ctx_t;

/* eng_sample.c's s_order_key: unsigned, ordered like the floats, -0 equal to +0. */
__device__ __forceinline__ uint32_t s_order_key(float v) {
    uint32_t b = __float_as_uint(v);
    b = b == 0x80000000u ? 0u : b;
    return b ^ ((0u - (b >> 31)) | 0x80000000u);
}

__device__ __forceinline__ float s_key_float(uint32_t k) {
    return __uint_as_float(k & 0x80000000u ? k ^ 0x80000000u : ~k);
}

/* eng_sample.c's s_exp_neg, operation for operation (no FMA). */
__device__ __forceinline__ float s_exp_neg(float x) {
    const uint32_t lo_bits = 0xC2AE0000u;
    const uint32_t xb = __float_as_uint(x) | 0x80000000u;
    const uint32_t is_low = 0u - ((lo_bits - xb) >> 31);
    const float xc = __uint_as_float(xb < lo_bits ? xb : lo_bits);
    const float shifted = __fadd_rn(__fmul_rn(xc, 1.44269504088896341f), 12582912.0f);
    const float n = __fsub_rn(shifted, 12582912.0f);
    const uint32_t biased_n = __float_as_uint(shifted) - 0x4B400000u + 127u;
    float r = __fsub_rn(xc, __fmul_rn(n, 0.693359375f));
    r = __fsub_rn(r, __fmul_rn(n, -2.12194440e-4f));
    float poly = 1.9875691500e-4f;
    poly = __fadd_rn(__fmul_rn(poly, r), 1.3981999507e-3f);
    poly = __fadd_rn(__fmul_rn(poly, r), 8.3334519073e-3f);
    poly = __fadd_rn(__fmul_rn(poly, r), 4.1665795894e-2f);
    poly = __fadd_rn(__fmul_rn(poly, r), 1.6666665459e-1f);
    poly = __fadd_rn(__fmul_rn(poly, r), 5.0000001201e-1f);
    float y = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(poly, r), r), r), 1.0f);
    y = __fmul_rn(y, __uint_as_float(biased_n << 23));
    uint32_t yb = __float_as_uint(y);
    yb = yb > 0x3F800000u ? 0x3F800000u : yb;
    return __uint_as_float(yb & ~is_low);
}

/* Block-wide reductions; every thread of the block gets the result, bit-identical (butterflies in a fixed order). */
__device__ double s_block_sum(double v, s_shared_t *sh) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
    __syncthreads(); /* red_d may still be read by a previous reduction */
    if ((threadIdx.x & 31) == 0) sh->red_d[threadIdx.x >> 5] = v;
    __syncthreads();
    v = sh->red_d[threadIdx.x & 31];
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
    return v;
}

enum { S_OP_MAX, S_OP_MIN, S_OP_ADD };

__device__ __forceinline__ uint32_t s_op(int op, uint32_t a, uint32_t b) {
    return op == S_OP_MAX ? (a > b ? a : b) : op == S_OP_MIN ? (a < b ? a : b) : a + b;
}

__device__ uint32_t s_block_u(int op, uint32_t v, s_shared_t *sh) {
    for (int o = 16; o; o >>= 1) v = s_op(op, v, __shfl_xor_sync(~0u, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh->red_u[threadIdx.x >> 5] = v;
    __syncthreads();
    v = sh->red_u[threadIdx.x & 31];
    for (int o = 16; o; o >>= 1) v = s_op(op, v, __shfl_xor_sync(~0u, v, o));
    return v;
}

/* Cluster-wide: each block's partial, combined in block order by every thread of every block. The second cluster
 * barrier keeps a block from overwriting its partial (or exiting) while another still reads it. */
__device__ double s_sum(double v, const s_ctx_t &c) {
    v = s_block_sum(v, c.sh);
    if (threadIdx.x == 0) c.sh->part_d = v;
    c.cl.sync();
    double t = 0.0;
    for (unsigned r = 0; r < S_CS; r++) t += *c.cl.map_shared_rank(&c.sh->part_d, r);
    c.cl.sync();
    return t;
}

__device__ uint32_t s_reduce_u(int op, uint32_t v, const s_ctx_t &c) {
    v = s_block_u(op, v, c.sh);
    if (threadIdx.x == 0) c.sh->part_u = v;
    c.cl.sync();
    uint32_t t = *c.cl.map_shared_rank(&c.sh->part_u, 0);
    for (unsigned r = 1; r < S_CS; r++) t = s_op(op, t, *c.cl.map_shared_rank(&c.sh->part_u, r));
    c.cl.sync();
    return t;
}

/* The indices a block visits: a row's own tokens (first = rank * S_NT, end = vocab, step = S_STRIDE) or its
 * candidate list (0, n, S_NT). Loops run whole blocks, so warp-wide intrinsics see every lane. */
typedef struct {
    int32_t first, end, step;
} s_range_t;

/* Warp 0 picks the bucket of this level where the cut falls (eng_sample.c's s_cut, per level): the first bucket
 * (ascending rank) whose cumulative measure passes, or the last nonempty one when rounding leaves the target
 * unreachable. acc_c / acc_m: count and mass ranked before this level's segment. */
__device__ void s_pick_bucket(s_shared_t *sh, int mode, uint32_t k, double target, uint32_t acc_c, double acc_m) {
    if (threadIdx.x >= 32) return;
    const int l = threadIdx.x;
    uint32_t c_loc = 0;
    double m_loc = 0.0;
    for (int j = 0; j < 8; j++) c_loc += sh->all_count[8 * l + j], m_loc += sh->all_mass[8 * l + j];
    uint32_t inc_c = c_loc;
    double inc_m = m_loc;
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t tc = __shfl_up_sync(~0u, inc_c, o);
        const double tm = __shfl_up_sync(~0u, inc_m, o);
        if (l >= o) inc_c += tc, inc_m += tm;
    }
    uint32_t ex_c = __shfl_up_sync(~0u, inc_c, 1);
    double ex_m = __shfl_up_sync(~0u, inc_m, 1);
    if (l == 0) ex_c = 0, ex_m = 0.0;
    uint32_t run_c = acc_c + ex_c, f_c = 0, l_c = 0;
    double run_m = acc_m + ex_m, f_m = 0.0, l_m = 0.0;
    int found = -1, last = -1;
    for (int j = 0; j < 8; j++) {
        const int b = 8 * l + j;
        const uint32_t c = sh->all_count[b];
        if (!c) continue;
        const double mb = sh->all_mass[b];
        const bool is_pass = mode == S_COUNT     ? run_c + c >= k
                             : mode == S_MASS_GE ? run_m + mb >= target
                                                 : run_m + mb > target;
        last = b, l_c = run_c, l_m = run_m;
        if (is_pass) {
            found = b, f_c = run_c, f_m = run_m;
            break;
        }
        run_c += c, run_m += mb;
    }
    const unsigned fb = __ballot_sync(~0u, found >= 0);
    if (fb) {
        if (l == __ffs(fb) - 1) sh->sel_b = found, sh->sel_c = f_c, sh->sel_m = f_m;
    } else {
        const unsigned lb = __ballot_sync(~0u, last >= 0);
        if (lb && l == 31 - __clz(lb)) sh->sel_b = last, sh->sel_c = l_c, sh->sel_m = l_m;
    }
}

/* Number of indices of rg with pred(i), over the cluster; every thread gets it. */
template <class P> __device__ int32_t s_count(const P &pred, s_range_t rg, const s_ctx_t &c) {
    uint32_t n = 0;
    for (int32_t base = rg.first; base < rg.end; base += rg.step) {
        const int32_t i = base + (int32_t)threadIdx.x;
        n += i < rg.end && pred(i) ? 1u : 0u;
    }
    return (int32_t)s_reduce_u(S_OP_ADD, n, c);
}

/* sh->cand[0..n) = rank(i) of this block's tokens with pred(i), in id order (a block-wide scan per 1024 tokens, so
 * the list and every sum over it are the same run to run); returns n. The caller made sure they fit. */
template <class P, class R> __device__ int32_t s_compact(const P &pred, const R &rank, s_range_t rg, s_shared_t *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int32_t n = 0;
    for (int32_t base = rg.first; base < rg.end; base += rg.step) {
        const int32_t i = base + (int32_t)threadIdx.x;
        const bool is_in = i < rg.end && pred(i);
        const unsigned m = __ballot_sync(~0u, is_in);
        __syncthreads(); /* red_u is free */
        if (lane == 0) sh->red_u[warp] = __popc(m);
        __syncthreads();
        int32_t before = 0, total = 0;
        for (int w = 0; w < S_NW; w++) {
            const int32_t k = (int32_t)sh->red_u[w];
            before += w < warp ? k : 0, total += k;
        }
        if (is_in) sh->cand[n + before + __popc(m & ((1u << lane) - 1u))] = rank(i);
        n += total;
    }
    __syncthreads();
    return n;
}

/* Weights are counted into a bucket's mass exactly, as integers: every weight of a top-level bucket (2^22 rank keys,
 * half a binade of float bit patterns) lies in [2^e, 2^(e + 2)) for the bucket's e, so w / 2^(e - 23) is an integer
 * below 2^25 and 2^18 of them sum below 2^43. Floating-point atomics would add in whatever order the threads come,
 * so the same row could cut differently from run to run; integers do not care. e of top-level bucket b: the
 * exponent of the smallest weight its keys allow (no weight is below 2^-126: eng_sample.h's e^-87 floor). */
__device__ __forceinline__ int s_unit_exp(int b) {
    const int64_t bits_min = (int64_t)0x3F800000 - (((int64_t)b + 1) << 22) + 1;
    return (int)((bits_min < 0x00800000 ? 0x00800000 : bits_min) >> 23) - 127;
}

/* The smallest R such that the kept tokens with rank <= R pass the cut (mode, k or target), or the largest kept
 * rank when none does. rank_of(i, &rank, &w) says whether index i of rg is kept and gives its rank and weight;
 * ranks are below 2^(top_shift + 8), and the mass modes take weight ranks (top_shift 40: key bits 22..29 at the top
 * level). Each warp adds its lanes' tokens per bucket first (__match_any_sync, __reduce_add_sync), so a flat
 * distribution, which puts most tokens in one bucket, does not serialise on one shared-memory address; then every
 * block adds up the cluster's histograms in block order. */
template <class F>
__device__ uint64_t s_select(const F &rank_of, s_range_t rg, int mode, uint32_t k, double target, int top_shift,
                             const s_ctx_t &c) {
    s_shared_t *sh = c.sh;
    uint64_t prefix = 0, mask = 0;
    uint32_t acc_c = 0;
    double acc_m = 0.0;
    int e_fixed = 0; /* below the top level, every token lies in one top-level bucket: its unit exponent */
    const int lane = threadIdx.x & 31;
    for (int shift = top_shift; shift >= 0; shift -= 8) {
        const bool is_top = shift == top_shift;
        for (int b = threadIdx.x; b < S_BUCKETS; b += S_NT) sh->count[b] = 0, sh->mass_units[b] = 0;
        __syncthreads();
        for (int32_t base = rg.first; base < rg.end; base += rg.step) {
            const int32_t i = base + (int32_t)threadIdx.x;
            uint64_t r = 0;
            float w = 0.0f;
            const bool is_in = i < rg.end && rank_of(i, r, w) && (r & mask) == prefix;
            const int b = is_in ? (int)((r >> shift) & (S_BUCKETS - 1)) : -1;
            const unsigned peers = __match_any_sync(~0u, b);
            uint32_t units = 0;
            if (mode != S_COUNT && is_in) {
                const uint32_t wb = __float_as_uint(w);
                const int e = (int)(wb >> 23) - 127, e_low = is_top ? s_unit_exp(b) : e_fixed;
                units = ((wb & 0x7FFFFFu) | 0x800000u) << (e - e_low);
            }
            if (mode != S_COUNT) units = __reduce_add_sync(peers, units);
            if (is_in && lane == __ffs(peers) - 1) {
                atomicAdd(&sh->count[b], (uint32_t)__popc(peers));
                if (mode != S_COUNT) atomicAdd(&sh->mass_units[b], (unsigned long long)units);
            }
        }
        __syncthreads();
        c.cl.sync(); /* every block's histogram is complete */
        for (int b = threadIdx.x; b < S_BUCKETS; b += S_NT) {
            uint32_t n = 0;
            unsigned long long u = 0;
            for (unsigned r = 0; r < S_CS; r++) {
                const s_shared_t *o = c.cl.map_shared_rank(sh, r);
                n += o->count[b], u += o->mass_units[b];
            }
            sh->all_count[b] = n;
            sh->all_mass[b] = mode == S_COUNT ? 0.0 : ldexp((double)u, (is_top ? s_unit_exp(b) : e_fixed) - 23);
        }
        __syncthreads();
        s_pick_bucket(sh, mode, k, target, acc_c, acc_m);
        __syncthreads();
        if (is_top) e_fixed = s_unit_exp(sh->sel_b);
        prefix |= (uint64_t)sh->sel_b << shift, mask |= (uint64_t)(S_BUCKETS - 1) << shift;
        acc_c = sh->sel_c, acc_m = sh->sel_m;
        if (shift > 0 && sh->all_count[sh->sel_b] == 1) {
            /* One token left under the prefix: the levels below could only pick its buckets (the first and only
             * nonempty one, passing or not), so its rank is the answer. One pass finds it instead of a histogram
             * pass per remaining level (flat rows, where candidates do not fit in shared memory, spent most of
             * their time there). */
            if (threadIdx.x == 0) sh->found = ~0ull;
            __syncthreads();
            for (int32_t base = rg.first; base < rg.end; base += rg.step) {
                const int32_t i = base + (int32_t)threadIdx.x;
                uint64_t r = 0;
                float w = 0.0f;
                if (i < rg.end && rank_of(i, r, w) && (r & mask) == prefix)
                    sh->found = r; /* one thread, cluster-wide */
            }
            __syncthreads();
            c.cl.sync(); /* every block's search is done; nobody reads this level's histograms any more */
            uint64_t found = ~0ull;
            for (unsigned r = 0; r < S_CS; r++) {
                const uint64_t f = c.cl.map_shared_rank(sh, r)->found;
                found = f < found ? f : found;
            }
            c.cl.sync(); /* nobody reads `found` any more (the next selection resets it) */
            return found;
        }
        c.cl.sync(); /* nobody reads this level's histograms any more */
    }
    return prefix;
}

__global__ void __cluster_dims__(S_CS, 1, 1) __launch_bounds__(S_NT)
    k_sample(const float *logits, float *work, int32_t vocab, const eng_cuda_sample_req_t *reqs, const eng_pen_t *pen,
             eng_cuda_sample_out_t *outs) {
    __shared__ s_shared_t sh;
    s_pdl_begin(); /* the logits are earlier kernels' (PDL: eng_cuda_ops.cuh) */
    const s_ctx_t c = {cg::this_cluster(), (int32_t)(blockIdx.x % S_CS) * S_NT, &sh};
    const bool is_lead = blockIdx.x % S_CS == 0 && threadIdx.x == 0; /* writes the row's result */
    const int32_t row = (int32_t)(blockIdx.x / S_CS);
    const float *x = logits + (size_t)row * vocab;
    float *w = work + (size_t)row * vocab;
    const eng_cuda_sample_req_t q = reqs[row];
    if (q.n_logprobs < 0) return; /* a pad row of a graph's bucket: every block of the cluster returns here */
    eng_cuda_sample_out_t *out = outs + row;
    const s_range_t own = {c.first, vocab, S_STRIDE};
#define S_FOR_OWN(i) for (int32_t i = c.first + (int32_t)threadIdx.x; i < vocab; i += S_STRIDE)

    /* raw logits: the max, and whether any is NaN or +inf */
    uint32_t key_max = 0, is_bad = 0;
    S_FOR_OWN(i) {
        const uint32_t kk = s_order_key(x[i]);
        key_max = kk > key_max ? kk : key_max;
        is_bad |= (uint32_t)(kk - S_KEY_NEG_INF >= S_KEY_POS_INF - S_KEY_NEG_INF);
    }
    key_max = s_reduce_u(S_OP_MAX, key_max, c);
    is_bad = s_reduce_u(S_OP_MAX, is_bad, c);
    if (is_bad || key_max == S_KEY_NEG_INF) {
        if (is_lead) out->token = -1, out->n_top = 0;
        return; /* every block of the cluster returns here (the reductions ended with a cluster barrier) */
    }
    const float x_max = s_key_float(key_max);

    /* logprobs of the raw distribution: log-sum-exp, then the top n by (logit desc, id asc) */
    double part = 0.0;
    S_FOR_OWN(i) part += (double)s_exp_neg(__fsub_rn(x[i], x_max));
    const double lse = (double)x_max + log(s_sum(part, c));
    const int32_t n_top = q.n_logprobs < vocab ? q.n_logprobs : vocab;
    if (n_top > 0) {
        auto raw_rank = [&](int32_t i) { return (uint64_t)(~s_order_key(x[i])) << S_ID_BITS | (uint64_t)i; };
        /* the logits within d of the max, d doubling until there are n_top of them: the top n are among them */
        float d = 1.0f;
        int32_t n_in = 0;
        for (; d <= 256.0f; d *= 2.0f) {
            const float lo = x_max - d;
            n_in = s_count([&](int32_t i) { return x[i] >= lo; }, own, c);
            if (n_in >= n_top) break;
        }
        const float lo = x_max - d;
        uint64_t R;
        /* the candidate lists are per block: they fit when the fullest block's does */
        uint32_t n_own = 0;
        S_FOR_OWN(i) n_own += x[i] >= lo;
        const bool is_listed = n_in >= n_top && s_reduce_u(S_OP_MAX, s_block_u(S_OP_ADD, n_own, &sh), c) <= S_CAND_CAP;
        if (is_listed) {
            const int32_t n_list = s_compact([&](int32_t i) { return x[i] >= lo; }, raw_rank, own, &sh);
            R = s_select(
                [&](int32_t j, uint64_t &r, float &m) {
                    r = sh.cand[j], m = 1.0f;
                    return true;
                },
                s_range_t{0, n_list, S_NT}, S_COUNT, (uint32_t)n_top, 0.0, 48, c);
        } else {
            R = s_select(
                [&](int32_t i, uint64_t &r, float &m) {
                    r = raw_rank(i), m = 1.0f;
                    return true;
                },
                own, S_COUNT, (uint32_t)n_top, 0.0, 48, c);
        }
        if (threadIdx.x == 0) sh.n_top = 0;
        __syncthreads();
        S_FOR_OWN(i) {
            const uint64_t r = raw_rank(i);
            if (r <= R) sh.top_rank[atomicAdd(&sh.n_top, 1)] = r;
        }
        __syncthreads();
        c.cl.sync();
        if (is_lead) { /* the n_top ranks, from every block, sorted */
            uint64_t top[ENG_MAX_LOGPROBS];
            int32_t n = 0;
            for (unsigned r = 0; r < S_CS; r++) {
                const s_shared_t *o = c.cl.map_shared_rank(&sh, r);
                for (int32_t j = 0; j < o->n_top && n < ENG_MAX_LOGPROBS; j++) top[n++] = o->top_rank[j];
            }
            for (int32_t a = 1; a < n; a++) /* insertion sort of at most ENG_MAX_LOGPROBS ranks */
                for (int32_t b = a; b > 0 && top[b] < top[b - 1]; b--) {
                    const uint64_t t = top[b];
                    top[b] = top[b - 1], top[b - 1] = t;
                }
            for (int32_t j = 0; j < n; j++) {
                const int32_t id = (int32_t)(top[j] & ((1u << S_ID_BITS) - 1));
                out->top_token[j] = id;
                out->top_logprob[j] = (float)((double)x[id] - lse);
            }
        }
        c.cl.sync(); /* the lead has read every block's list */
    }

    /* step 1: penalties, on a copy of the row (the raw logits stay for the chosen token's logprob) */
    const float *px = x;
    if ((q.repetition_penalty != 1.0f || q.presence_penalty != 0.0f || q.frequency_penalty != 0.0f) && q.n_pen > 0) {
        S_FOR_OWN(i) w[i] = x[i];
        c.cl.sync(); /* a penalised token may belong to another block */
        for (int32_t j = c.first + (int32_t)threadIdx.x; j < q.n_pen; j += S_STRIDE) {
            const eng_pen_t e = pen[q.pen_off + j];
            const float xv = w[e.token];
            float v = xv > 0.0f ? __fdiv_rn(xv, q.repetition_penalty) : __fmul_rn(xv, q.repetition_penalty);
            if (e.count > 0) {
                v = __fsub_rn(v, __fmul_rn(__int2float_rn(e.count), q.frequency_penalty));
                v = __fsub_rn(v, q.presence_penalty);
            }
            if (v > FLT_MAX) v = FLT_MAX;
            if (v < -FLT_MAX && xv != -INFINITY) v = -FLT_MAX;
            w[e.token] = v;
        }
        c.cl.sync();
        px = w;
        key_max = 0;
        S_FOR_OWN(i) {
            const uint32_t kk = s_order_key(px[i]);
            key_max = kk > key_max ? kk : key_max;
        }
        key_max = s_reduce_u(S_OP_MAX, key_max, c);
    }
    /* step 2: the argmax (lowest id among equals) */
    uint32_t arg = 0xFFFFFFFFu;
    for (int32_t i = c.first + (int32_t)threadIdx.x; i < vocab && arg == 0xFFFFFFFFu; i += S_STRIDE)
        if (s_order_key(px[i]) == key_max) arg = (uint32_t)i;
    arg = s_reduce_u(S_OP_MIN, arg, c); /* ends with a cluster barrier: everyone may read px[arg] now */
    int32_t token = (int32_t)arg;

    if (q.temperature > 0.0f) {
        /* step 3: w = exp((x - max) / T), in place (max read by every block before anyone writes) */
        const float p_max = px[arg];
        c.cl.sync();
        double mass_part = 0.0;
        S_FOR_OWN(i) {
            const float wi = s_exp_neg(__fdiv_rn(__fsub_rn(px[i], p_max), q.temperature));
            w[i] = wi;
            mass_part += (double)wi;
        }
        double m = s_sum(mass_part, c);

        /* the candidates: eng_sample.c's s_floor, a weight below which no token can be kept by the first filter or
         * reached by the draw. In shared memory when they fit (real distributions: a few hundred), else the
         * selections below run over the row. */
        float w_floor = 0.0f;
        if (q.top_k > 0 && q.top_k < vocab) {
            for (uint32_t e = 4; e < 127; e += 4) { /* the largest 2^-4j with at least top_k weights above */
                const float f = __uint_as_float((127u - e) << 23);
                if (s_count([&](int32_t i) { return w[i] >= f; }, own, c) >= q.top_k) {
                    w_floor = f;
                    break;
                }
            }
        } else if (q.top_p >= 1.0f && q.min_p > 0.0f) {
            w_floor = q.min_p;
        } else {
            const double frac = q.top_p < 1.0f ? (double)q.top_p : q.u;
            if (frac >= 0.0 && frac < 1.0 - 1e-6) w_floor = (float)(0.5 * (1.0 - frac) * m / vocab);
        }
        const float cand_min = w_floor > 0.0f ? w_floor : FLT_TRUE_MIN;
        auto is_cand = [&](int32_t i) { return w[i] >= cand_min; };
        uint32_t n_own = 0;
        S_FOR_OWN(i) n_own += is_cand(i);
        const int32_t n_cand = (int32_t)s_reduce_u(S_OP_ADD, n_own, c);
        /* the lists are per block: they fit when the fullest block's does */
        const bool is_listed = s_reduce_u(S_OP_MAX, s_block_u(S_OP_ADD, n_own, &sh), c) <= S_CAND_CAP;
        s_range_t rg = own;
        if (is_listed) {
            const int32_t n_list = s_compact(
                is_cand,
                [&](int32_t i) { return (uint64_t)(0x3F800000u - __float_as_uint(w[i])) << S_ID_BITS | (uint64_t)i; },
                own, &sh);
            rg = s_range_t{0, n_list, S_NT};
        }

        /* step 4: the kept set is always a prefix of the ranking: rank <= R and w >= w_min */
        uint64_t R = ~0ull;
        float w_min = cand_min;
        auto kept_rank = [&](int32_t i, uint64_t &r, float &wi) {
            if (is_listed) {
                r = sh.cand[i];
                wi = __uint_as_float(0x3F800000u - (uint32_t)(r >> S_ID_BITS));
            } else {
                wi = w[i];
                r = (uint64_t)(0x3F800000u - __float_as_uint(wi)) << S_ID_BITS | (uint64_t)i;
            }
            return wi >= w_min && r <= R;
        };
        auto kept_mass = [&]() {
            double sm = 0.0;
            for (int32_t base = rg.first; base < rg.end; base += rg.step) {
                const int32_t i = base + (int32_t)threadIdx.x;
                uint64_t r;
                float wi;
                if (i < rg.end && kept_rank(i, r, wi)) sm += (double)wi;
            }
            return s_sum(sm, c);
        };
        if (q.top_k > 0 && q.top_k < vocab) {
            if (q.top_k < n_cand) R = s_select(kept_rank, rg, S_COUNT, (uint32_t)q.top_k, 0.0, 40, c);
            m = kept_mass();
        }
        if (q.top_p < 1.0f) {
            R = s_select(kept_rank, rg, S_MASS_GE, 0, (double)q.top_p * m, 40, c);
            m = kept_mass();
        }
        if (q.min_p > 0.0f) {
            w_min = q.min_p > cand_min ? q.min_p : cand_min;
            m = kept_mass();
        }
        /* step 5: the first token of the ranking whose cumulative mass exceeds u * m */
        R = s_select(kept_rank, rg, S_MASS_GT, 0, q.u * m, 40, c);
        token = (int32_t)(R & ((1u << S_ID_BITS) - 1));
    }
    if (is_lead) {
        out->token = token;
        out->logprob = (float)((double)x[token] - lse);
        out->n_top = n_top;
    }
#undef S_FOR_OWN
}

void eng_cuda_sample(const float *logits, float *work, int32_t n_rows, int32_t vocab, const eng_cuda_sample_req_t *reqs,
                     const eng_pen_t *pen, eng_cuda_sample_out_t *out, cudaStream_t st) {
    if (n_rows > 0) eng_cuda_launch(k_sample, n_rows * S_CS, S_NT, 0, st, logits, work, vocab, reqs, pen, out);
}
