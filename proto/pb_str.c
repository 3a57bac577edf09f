/* pb_str.c: UTF-8 and string-field checks and the reason formatting the validators share. Knows no
 * message types beyond Error. */
#include "pb_int.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

pd_status pb_fail(pd_status st, char *err, size_t err_cap, const char *fmt, ...) {
    if (err && err_cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_cap, fmt, ap);
        va_end(ap);
    }
    return st;
}

const char *pb_quote(char *dst, size_t cap, const char *s) {
    static const size_t max_shown = 40;
    size_t o = 0;
    if (cap < 8) { /* too small for quotes and a cut mark */
        if (cap) dst[0] = '\0';
        return dst;
    }
    dst[o++] = '"';
    size_t i = 0;
    for (; s && s[i] && i < max_shown; i++) {
        unsigned char c = (unsigned char)s[i];
        char tmp[5];
        int n = (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') ? snprintf(tmp, sizeof tmp, "%c", c)
                                                                 : snprintf(tmp, sizeof tmp, "\\x%02x", c);
        if (o + (size_t)n + 5 > cap) break; /* keep room for "...\"" and the NUL */
        memcpy(dst + o, tmp, (size_t)n);
        o += (size_t)n;
    }
    if (s && s[i]) {
        memcpy(dst + o, "...", 3);
        o += 3;
    }
    dst[o++] = '"';
    dst[o] = '\0';
    return dst;
}

bool pb_utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!len || len > n - i) return false;
        unsigned cp = len == 1 ? c : len == 2 ? c & 31 : len == 3 ? c & 15 : c & 7;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return false;
            cp = cp << 6 | (s[i + k] & 63);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += len;
    }
    return true;
}

pd_status pb_check_str(pd_status st, const char *field, const char *s, size_t min_bytes, size_t max_bytes,
                       pb_str_kind_t kind, char *err, size_t err_cap) {
    char q[64];
    size_t n = s ? strlen(s) : 0;
    if (n == 0 && min_bytes)
        return pb_fail(st, err, err_cap, "%s is empty, must be %zu..%zu bytes", field, min_bytes, max_bytes);
    if (n < min_bytes || n > max_bytes)
        return pb_fail(st, err, err_cap, "%s has %zu bytes, must be %zu..%zu", field, n, min_bytes, max_bytes);
    if (!pb_utf8_valid((const uint8_t *)s, n))
        return pb_fail(st, err, err_cap, "%s = %s is not valid UTF-8", field, pb_quote(q, sizeof q, s));
    for (size_t i = 0; kind != PB_STR_TEXT && i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        bool ok = kind == PB_STR_ID ? (c >= 0x21 && c <= 0x7e) : (c >= 0x20 && c != 0x7f);
        if (!ok)
            return pb_fail(st, err, err_cap, "%s = %s has byte 0x%02x at %zu, must be %s", field,
                           pb_quote(q, sizeof q, s), c, i,
                           kind == PB_STR_ID ? "printable ASCII without spaces" : "free of control characters");
    }
    return PD_OK;
}

pd_status pb_check_error(pd_status st, const char *field, const Pdserve__V1__Error *e, char *err, size_t err_cap) {
    if (!e) return PD_OK;
    if (!protobuf_c_enum_descriptor_get_value(&pdserve__v1__error_code__descriptor, (int)e->code))
        return pb_fail(
            st, err, err_cap, "%s.code = %d, must be a known ErrorCode (0..%d)", field, (int)e->code,
            pdserve__v1__error_code__descriptor.values[pdserve__v1__error_code__descriptor.n_values - 1].value);
    char f[96];
    snprintf(f, sizeof f, "%s.message", field);
    return pb_check_str(st, f, e->message, 0, PB_MAX_ERROR_BYTES, PB_STR_TEXT, err, err_cap);
}
