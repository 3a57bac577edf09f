/* eng_cuda_sample.cu: eng_sampler_sample on the GPU, one 1024-thread block per logits row (eng_cuda_sample.cuh).
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

#include "eng_cuda_sample.cuh"

#define S_NT       1024
#define S_NW       (S_NT / 32)
#define S_ID_BITS  18
#define S_BUCKETS  256
#define S_CAND_CAP 4096 /* candidates kept in shared memory; more (a flat distribution): selections over the row */

#define S_KEY_NEG_INF 0x007FFFFFu /* s_order_key(-INFINITY) */
#define S_KEY_POS_INF 0xFF800000u /* s_order_key(+INFINITY) */

enum { S_COUNT, S_MASS_GE, S_MASS_GT }; /* eng_sample.c's s_cut modes */

typedef struct {
    uint32_t count[S_BUCKETS];
    unsigned long long mass_units[S_BUCKETS]; /* a bucket's mass, exactly, in units of 2^(its s_unit_exp) */
    double mass[S_BUCKETS];
    double red_d[S_NW];
    uint32_t red_u[S_NW];
    int32_t sel_b;
    uint32_t sel_c;
    double sel_m;
    int32_t n_top, n_cand;
    uint64_t top_rank[ENG_MAX_LOGPROBS];
    uint64_t cand[S_CAND_CAP]; /* ranks of the tokens that can still matter, in id order */
} s_shared_t;

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

/* Block-wide reductions; every thread gets the result, bit-identical (butterflies in a fixed order). */
__device__ double s_sum(double v, s_shared_t *sh) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
    __syncthreads(); /* red_d may still be read by a previous reduction */
    if ((threadIdx.x & 31) == 0) sh->red_d[threadIdx.x >> 5] = v;
    __syncthreads();
    v = sh->red_d[threadIdx.x & 31];
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
    return v;
}

template <bool IS_MAX> __device__ uint32_t s_reduce_u(uint32_t v, s_shared_t *sh) {
    for (int o = 16; o; o >>= 1) {
        uint32_t t = __shfl_xor_sync(~0u, v, o);
        v = IS_MAX ? (t > v ? t : v) : (t < v ? t : v);
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh->red_u[threadIdx.x >> 5] = v;
    __syncthreads();
    v = sh->red_u[threadIdx.x & 31];
    for (int o = 16; o; o >>= 1) {
        uint32_t t = __shfl_xor_sync(~0u, v, o);
        v = IS_MAX ? (t > v ? t : v) : (t < v ? t : v);
    }
    return v;
}

/* Warp 0 picks the bucket of this level where the cut falls (eng_sample.c's s_cut, per level): the first bucket
 * (ascending rank) whose cumulative measure passes, or the last nonempty one when rounding leaves the target
 * unreachable. acc_c / acc_m: count and mass ranked before this level's segment. */
__device__ void s_pick_bucket(s_shared_t *sh, int mode, uint32_t k, double target, uint32_t acc_c, double acc_m) {
    if (threadIdx.x >= 32) return;
    const int l = threadIdx.x;
    uint32_t c_loc = 0;
    double m_loc = 0.0;
    for (int j = 0; j < 8; j++) c_loc += sh->count[8 * l + j], m_loc += sh->mass[8 * l + j];
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
        const uint32_t c = sh->count[b];
        if (!c) continue;
        const double mb = sh->mass[b];
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

/* Number of i in [0, n) with pred(i); every thread gets it. */
template <class P> __device__ int32_t s_count(const P &pred, int32_t n, s_shared_t *sh) {
    uint32_t c = 0;
    for (int32_t i = threadIdx.x; i < n; i += S_NT) c += pred(i) ? 1u : 0u;
    for (int o = 16; o; o >>= 1) c += __shfl_xor_sync(~0u, c, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh->red_u[threadIdx.x >> 5] = c;
    __syncthreads();
    c = sh->red_u[threadIdx.x & 31];
    for (int o = 16; o; o >>= 1) c += __shfl_xor_sync(~0u, c, o);
    return (int32_t)c;
}

/* sh->cand[0..n) = rank(i) of the i in [0, vocab) with pred(i), in id order (a block-wide scan per 1024 tokens, so
 * the list and every sum over it are the same run to run). The caller made sure they fit. */
template <class P, class R> __device__ void s_compact(const P &pred, const R &rank, int32_t vocab, s_shared_t *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int32_t base = 0;
    for (int32_t i0 = 0; i0 < vocab; i0 += S_NT) {
        const int32_t i = i0 + threadIdx.x;
        const bool is_in = i < vocab && pred(i);
        const unsigned m = __ballot_sync(~0u, is_in);
        __syncthreads(); /* red_u is free */
        if (lane == 0) sh->red_u[warp] = __popc(m);
        __syncthreads();
        int32_t before = 0, total = 0;
        for (int w = 0; w < S_NW; w++) {
            const int32_t c = (int32_t)sh->red_u[w];
            before += w < warp ? c : 0, total += c;
        }
        if (is_in) sh->cand[base + before + __popc(m & ((1u << lane) - 1u))] = rank(i);
        base += total;
    }
    __syncthreads();
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
 * rank when none does. rank_of(i, &rank, &w) says whether token i is kept and gives its rank and weight; ranks are
 * below 2^(top_shift + 8), and the mass modes take weight ranks (top_shift 40: key bits 22..29 at the top level).
 * Each warp adds its lanes' tokens per bucket first (__match_any_sync, __reduce_add_sync), so a flat distribution,
 * which puts most tokens in one bucket, does not serialise on one shared-memory address. */
template <class F>
__device__ uint64_t s_select(const F &rank_of, int32_t vocab, int mode, uint32_t k, double target, int top_shift,
                             s_shared_t *sh) {
    uint64_t prefix = 0, mask = 0;
    uint32_t acc_c = 0;
    double acc_m = 0.0;
    int e_fixed = 0; /* below the top level, every token lies in one top-level bucket: its unit exponent */
    const int32_t n_iter = (vocab + S_NT - 1) / S_NT * S_NT;
    const int lane = threadIdx.x & 31;
    for (int shift = top_shift; shift >= 0; shift -= 8) {
        const bool is_top = shift == top_shift;
        for (int b = threadIdx.x; b < S_BUCKETS; b += S_NT) sh->count[b] = 0, sh->mass_units[b] = 0;
        __syncthreads();
        for (int32_t i = threadIdx.x; i < n_iter; i += S_NT) { /* whole warps, for the warp-wide intrinsics */
            uint64_t r = 0;
            float w = 0.0f;
            const bool is_in = i < vocab && rank_of(i, r, w) && (r & mask) == prefix;
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
        for (int b = threadIdx.x; b < S_BUCKETS; b += S_NT)
            sh->mass[b] =
                mode == S_COUNT ? 0.0 : ldexp((double)sh->mass_units[b], (is_top ? s_unit_exp(b) : e_fixed) - 23);
        __syncthreads();
        s_pick_bucket(sh, mode, k, target, acc_c, acc_m);
        __syncthreads();
        if (is_top) e_fixed = s_unit_exp(sh->sel_b);
        prefix |= (uint64_t)sh->sel_b << shift, mask |= (uint64_t)(S_BUCKETS - 1) << shift;
        acc_c = sh->sel_c, acc_m = sh->sel_m;
    }
    return prefix;
}

__global__ void __launch_bounds__(S_NT)
    k_sample(const float *logits, float *work, int32_t vocab, const eng_cuda_sample_req_t *reqs, const eng_pen_t *pen,
             eng_cuda_sample_out_t *outs) {
    __shared__ s_shared_t sh;
    const float *x = logits + (size_t)blockIdx.x * vocab;
    float *w = work + (size_t)blockIdx.x * vocab;
    const eng_cuda_sample_req_t q = reqs[blockIdx.x];
    eng_cuda_sample_out_t *out = outs + blockIdx.x;
    const int tid = threadIdx.x;

    /* raw logits: the max, and whether any is NaN or +inf */
    uint32_t key_max = 0, is_bad = 0;
    for (int32_t i = tid; i < vocab; i += S_NT) {
        const uint32_t kk = s_order_key(x[i]);
        key_max = kk > key_max ? kk : key_max;
        is_bad |= (uint32_t)(kk - S_KEY_NEG_INF >= S_KEY_POS_INF - S_KEY_NEG_INF);
    }
    key_max = s_reduce_u<true>(key_max, &sh);
    is_bad = s_reduce_u<true>(is_bad, &sh);
    if (is_bad || key_max == S_KEY_NEG_INF) {
        if (tid == 0) out->token = -1, out->n_top = 0;
        return;
    }
    const float x_max = s_key_float(key_max);

    /* logprobs of the raw distribution: log-sum-exp, then the top n by (logit desc, id asc) */
    double part = 0.0;
    for (int32_t i = tid; i < vocab; i += S_NT) part += (double)s_exp_neg(__fsub_rn(x[i], x_max));
    const double lse = (double)x_max + log(s_sum(part, &sh));
    const int32_t n_top = q.n_logprobs < vocab ? q.n_logprobs : vocab;
    if (n_top > 0) {
        auto raw_rank = [&](int32_t i, uint64_t &r, float &m) {
            r = (uint64_t)(~s_order_key(x[i])) << S_ID_BITS | (uint64_t)i;
            m = 1.0f;
            return true;
        };
        /* the logits within d of the max, d doubling until there are n_top of them: the top n are among them */
        float d = 1.0f;
        int32_t n_in = 0;
        for (; d <= 256.0f; d *= 2.0f) {
            const float lo = x_max - d;
            n_in = s_count([&](int32_t i) { return x[i] >= lo; }, vocab, &sh);
            if (n_in >= n_top) break;
        }
        uint64_t R;
        if (n_in >= n_top && n_in <= S_CAND_CAP) {
            const float lo = x_max - d;
            s_compact([&](int32_t i) { return x[i] >= lo; },
                      [&](int32_t i) { return (uint64_t)(~s_order_key(x[i])) << S_ID_BITS | (uint64_t)i; }, vocab, &sh);
            auto cand_rank = [&](int32_t j, uint64_t &r, float &m) {
                r = sh.cand[j];
                m = 1.0f;
                return true;
            };
            R = s_select(cand_rank, n_in, S_COUNT, (uint32_t)n_top, 0.0, 48, &sh);
        } else {
            R = s_select(raw_rank, vocab, S_COUNT, (uint32_t)n_top, 0.0, 48, &sh);
        }
        if (tid == 0) sh.n_top = 0;
        __syncthreads();
        for (int32_t i = tid; i < vocab; i += S_NT) {
            uint64_t r;
            float m;
            raw_rank(i, r, m);
            if (r <= R) sh.top_rank[atomicAdd(&sh.n_top, 1)] = r;
        }
        __syncthreads();
        if (tid == 0) {
            for (int32_t a = 1; a < n_top; a++) /* insertion sort of at most ENG_MAX_LOGPROBS ranks */
                for (int32_t b = a; b > 0 && sh.top_rank[b] < sh.top_rank[b - 1]; b--) {
                    const uint64_t t = sh.top_rank[b];
                    sh.top_rank[b] = sh.top_rank[b - 1], sh.top_rank[b - 1] = t;
                }
            for (int32_t j = 0; j < n_top; j++) {
                const int32_t id = (int32_t)(sh.top_rank[j] & ((1u << S_ID_BITS) - 1));
                out->top_token[j] = id;
                out->top_logprob[j] = (float)((double)x[id] - lse);
            }
        }
    }

    /* step 1: penalties, on a copy of the row (the raw logits stay for the chosen token's logprob) */
    const float *px = x;
    if ((q.repetition_penalty != 1.0f || q.presence_penalty != 0.0f || q.frequency_penalty != 0.0f) && q.n_pen > 0) {
        for (int32_t i = tid; i < vocab; i += S_NT) w[i] = x[i];
        __syncthreads();
        for (int32_t j = tid; j < q.n_pen; j += S_NT) {
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
        __syncthreads();
        px = w;
        key_max = 0;
        for (int32_t i = tid; i < vocab; i += S_NT) {
            const uint32_t kk = s_order_key(px[i]);
            key_max = kk > key_max ? kk : key_max;
        }
        key_max = s_reduce_u<true>(key_max, &sh);
    }
    /* step 2: the argmax (lowest id among equals) */
    uint32_t arg = 0xFFFFFFFFu;
    for (int32_t i = tid; i < vocab && arg == 0xFFFFFFFFu; i += S_NT)
        if (s_order_key(px[i]) == key_max) arg = (uint32_t)i;
    arg = s_reduce_u<false>(arg, &sh);
    int32_t token = (int32_t)arg;

    if (q.temperature > 0.0f) {
        /* step 3: w = exp((x - max) / T), in place (max read by every thread before anyone writes) */
        const float p_max = px[arg];
        __syncthreads();
        double mass_part = 0.0;
        for (int32_t i = tid; i < vocab; i += S_NT) {
            const float wi = s_exp_neg(__fdiv_rn(__fsub_rn(px[i], p_max), q.temperature));
            w[i] = wi;
            mass_part += (double)wi;
        }
        double m = s_sum(mass_part, &sh);

        /* the candidates: eng_sample.c's s_floor, a weight below which no token can be kept by the first filter or
         * reached by the draw. In shared memory when they fit (real distributions: a few hundred), else the
         * selections below run over the whole row. */
        float w_floor = 0.0f;
        if (q.top_k > 0 && q.top_k < vocab) {
            for (uint32_t e = 4; e < 127; e += 4) { /* the largest 2^-4j with at least top_k weights above */
                const float f = __uint_as_float((127u - e) << 23);
                if (s_count([&](int32_t i) { return w[i] >= f; }, vocab, &sh) >= q.top_k) {
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
        auto w_rank = [&](int32_t i) {
            return (uint64_t)(0x3F800000u - __float_as_uint(w[i])) << S_ID_BITS | (uint64_t)i;
        };
        const int32_t n_cand = s_count([&](int32_t i) { return w[i] >= cand_min; }, vocab, &sh);
        const bool is_listed = n_cand <= S_CAND_CAP;
        if (is_listed) s_compact([&](int32_t i) { return w[i] >= cand_min; }, w_rank, vocab, &sh);

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
        const int32_t n_scan = is_listed ? n_cand : vocab;
        auto kept_mass = [&]() {
            double s = 0.0;
            for (int32_t i = tid; i < n_scan; i += S_NT) {
                uint64_t r;
                float wi;
                if (kept_rank(i, r, wi)) s += (double)wi;
            }
            return s_sum(s, &sh);
        };
        if (q.top_k > 0 && q.top_k < vocab) {
            if (q.top_k < n_cand) R = s_select(kept_rank, n_scan, S_COUNT, (uint32_t)q.top_k, 0.0, 40, &sh);
            m = kept_mass();
        }
        if (q.top_p < 1.0f) {
            R = s_select(kept_rank, n_scan, S_MASS_GE, 0, (double)q.top_p * m, 40, &sh);
            m = kept_mass();
        }
        if (q.min_p > 0.0f) {
            w_min = q.min_p > cand_min ? q.min_p : cand_min;
            m = kept_mass();
        }
        /* step 5: the first token of the ranking whose cumulative mass exceeds u * m */
        R = s_select(kept_rank, n_scan, S_MASS_GT, 0, q.u * m, 40, &sh);
        token = (int32_t)(R & ((1u << S_ID_BITS) - 1));
    }
    if (tid == 0) {
        out->token = token;
        out->logprob = (float)((double)x[token] - lse);
        out->n_top = n_top;
    }
}

void eng_cuda_sample(const float *logits, float *work, int32_t n_rows, int32_t vocab, const eng_cuda_sample_req_t *reqs,
                     const eng_pen_t *pen, eng_cuda_sample_out_t *out, cudaStream_t st) {
    if (n_rows > 0) k_sample<<<n_rows, S_NT, 0, st>>>(logits, work, vocab, reqs, pen, out);
}
