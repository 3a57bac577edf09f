/* kvt_convert.c: KV element conversion between f32, f16 and bf16 on receipt. Up-conversion is exact;
 * down-conversion rounds to nearest, ties to even, keeps NaN a (quiet) NaN and overflows to infinity.
 * Written here because kvtransfer may not link the engine. */
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kvt_int.h"

static uint32_t s_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static float s_float(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

uint16_t kvt_f32_to_bf16(float x) {
    uint32_t u = s_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* NaN: keep sign, quiet */
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb; /* round to nearest even; carries into the exponent (up to inf) as it should */
    return (uint16_t)(u >> 16);
}

float kvt_bf16_to_f32(uint16_t b) {
    return s_float((uint32_t)b << 16);
}

/* IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. */
uint16_t kvt_f32_to_f16(float x) {
    uint32_t u = s_bits(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
    if (a < 0x38800000u) {
        /* result is subnormal or zero: value = m * 2^-24 with m rounded from a's significand */
        if (a < 0x33000000u) return sign; /* below half the smallest subnormal: +-0 */
        uint32_t e = a >> 23;             /* 102 .. 112 */
        uint32_t mant = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14 .. 24: mant * 2^(e-150) = m * 2^-24 */
        uint32_t m = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (m & 1u))) m++;
        return (uint16_t)(sign | m);
    }
    /* normal: rebias the exponent (127 -> 15), round the 13 dropped mantissa bits to nearest even */
    uint32_t h = ((a - 0x38000000u) >> 13);
    uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* may carry into the exponent: still right */
    return (uint16_t)(sign | h);
}

float kvt_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return s_float(sign | 0x7f800000u | (m << 13)); /* inf / NaN */
    if (e == 0) {
        if (m == 0) return s_float(sign);
        /* subnormal: m * 2^-24, exact in f32 */
        float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return s_float(sign | ((e + 112u) << 23) | (m << 13));
}

void kvt_convert(void *dst, eng_kv_dtype_t dst_dt, const void *src, eng_kv_dtype_t src_dt, size_t n) {
    if (dst_dt == src_dt) {
        memcpy(dst, src, n * eng_kv_dtype_bytes(dst_dt));
        return;
    }
    /* element by element through f32; memcpy per element keeps this alignment-safe (payloads land at
     * whatever address ZeroMQ gives them) */
    const uint8_t *s = src;
    uint8_t *d = dst;
    size_t sb = eng_kv_dtype_bytes(src_dt), db = eng_kv_dtype_bytes(dst_dt);
    for (size_t i = 0; i < n; i++) {
        float x;
        if (src_dt == ENG_KV_F32) {
            memcpy(&x, s + i * sb, 4);
        } else {
            uint16_t v;
            memcpy(&v, s + i * sb, 2);
            x = src_dt == ENG_KV_F16 ? kvt_f16_to_f32(v) : kvt_bf16_to_f32(v);
        }
        if (dst_dt == ENG_KV_F32) {
            memcpy(d + i * db, &x, 4);
        } else {
            uint16_t v = dst_dt == ENG_KV_F16 ? kvt_f32_to_f16(x) : kvt_f32_to_bf16(x);
            memcpy(d + i * db, &v, 2);
        }
    }
}

/* Non-temporal stores: the receiver writes a whole transfer into a pool far larger than the caches and
 * reads none of it back soon, so skipping the read-for-ownership of each destination line cuts its
 * memory traffic by a third (src read, dst write; not src read, dst read, dst write). */
void kvt_copy_stream(void *dst, const void *src, size_t n) {
#if defined(__SSE2__)
    uint8_t *d = dst;
    const uint8_t *s = src;
    size_t head = (16u - ((uintptr_t)d & 15u)) & 15u;
    if (head > n) head = n;
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= 64; n -= 64, d += 64, s += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)s), b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32)), e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)d, a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
    }
    memcpy(d, s, n);
#else
    memcpy(dst, src, n);
#endif
}

void kvt_copy_fence(void) {
#if defined(__SSE2__)
    _mm_sfence(); /* streamed stores are weakly ordered: make them visible before the event that hands
                     the blocks over */
#endif
}
