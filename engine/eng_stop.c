/* eng_stop.c: stop-string matching over streamed text (semantics in eng_stop.h): one Knuth-Morris-Pratt
 * automaton per stop string, and a hold-back buffer for the bytes that may still begin a match.
 * It works on bytes only; it neither decodes UTF-8 nor knows about tokens or EOS. */
#include "eng_stop.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct eng_stop {
    int n_stops;
    int32_t len[ENG_STOP_MAX];                            /* bytes of each stop string, 1..ENG_STOP_MAX_BYTES */
    unsigned char stop[ENG_STOP_MAX][ENG_STOP_MAX_BYTES]; /* the strings, not NUL-terminated */
    int16_t fail[ENG_STOP_MAX][ENG_STOP_MAX_BYTES];       /* KMP: fail[j][q] = longest proper border of stop[j][0..q] */
    int32_t state[ENG_STOP_MAX];   /* longest prefix of stop[j] that is a suffix of the text fed so far */
    char hold[ENG_STOP_MAX_BYTES]; /* the held-back tail of the text: its length is max(state) */
    int32_t n_hold;
    int which; /* index of the stop string that matched, -1 before */
};

eng_stop_t *eng_stop_create(const char *const *stops, int n_stops, char *err, size_t err_cap) {
    char dummy[1];
    if (!err || err_cap == 0) {
        err = dummy;
        err_cap = sizeof dummy;
    }
    if (n_stops < 0 || n_stops > ENG_STOP_MAX) {
        snprintf(err, err_cap, "%d stop strings, at most %d allowed", n_stops, ENG_STOP_MAX);
        return NULL;
    }
    if (n_stops > 0 && !stops) {
        snprintf(err, err_cap, "stop strings missing");
        return NULL;
    }
    for (int j = 0; j < n_stops; j++) {
        size_t len = stops[j] ? strlen(stops[j]) : 0;
        if (len == 0 || len > ENG_STOP_MAX_BYTES) {
            snprintf(err, err_cap, "stop string %d is %s%zu bytes, must be 1..%d", j, stops[j] ? "" : "missing: ", len,
                     ENG_STOP_MAX_BYTES);
            return NULL;
        }
    }
    eng_stop_t *st = calloc(1, sizeof *st);
    if (!st) {
        snprintf(err, err_cap, "out of memory");
        return NULL;
    }
    st->n_stops = n_stops;
    st->which = -1;
    for (int j = 0; j < n_stops; j++) {
        const int32_t len = (int32_t)strlen(stops[j]);
        const unsigned char *s = (const unsigned char *)stops[j];
        st->len[j] = len;
        memcpy(st->stop[j], s, (size_t)len);
        /* KMP failure function */
        st->fail[j][0] = 0;
        int32_t k = 0;
        for (int32_t q = 1; q < len; q++) {
            while (k > 0 && s[q] != s[k]) k = st->fail[j][k - 1];
            if (s[q] == s[k]) k++;
            st->fail[j][q] = (int16_t)k;
        }
    }
    return st;
}

void eng_stop_destroy(eng_stop_t **st) {
    if (!st || !*st) return;
    free(*st);
    *st = NULL;
}

int eng_stop_which(const eng_stop_t *st) {
    return st ? st->which : -1;
}

/* Advances every automaton by one byte. Returns the index of the longest stop string completed by it
 * (lowest index among equals), or -1. */
static int s_step(eng_stop_t *st, unsigned char c) {
    int best = -1;
    for (int j = 0; j < st->n_stops; j++) {
        const unsigned char *s = st->stop[j];
        int32_t q = st->state[j];
        while (q > 0 && s[q] != c) q = st->fail[j][q - 1];
        if (s[q] == c) q++;
        st->state[j] = q;
        if (q == st->len[j] && (best < 0 || q > st->len[best])) best = j;
    }
    return best;
}

/* Writes bytes [0, n) of hold ‖ text to out. */
static void s_emit(const eng_stop_t *st, const char *text, size_t n, char *out) {
    size_t from_hold = n < (size_t)st->n_hold ? n : (size_t)st->n_hold;
    memcpy(out, st->hold, from_hold);
    if (n > from_hold) memcpy(out + from_hold, text, n - from_hold);
}

int64_t eng_stop_feed(eng_stop_t *st, const char *text, size_t len, char *out, size_t cap, bool *hit) {
    if (!st || (!text && len) || !out || !hit) return PD_EINVAL;
    *hit = st->which >= 0;
    if (*hit) return 0;
    if (cap < len || cap - len < ENG_STOP_MAX_BYTES) return PD_ERANGE;
    if (st->n_stops == 0) {
        if (len) memcpy(out, text, len);
        return (int64_t)len;
    }

    for (size_t i = 0; i < len; i++) {
        int j = s_step(st, (unsigned char)text[i]);
        if (j >= 0) {
            /* the match is the last len[j] bytes of hold ‖ text[0..i]; it began inside what was held */
            const size_t cut = (size_t)st->n_hold + i + 1 - (size_t)st->len[j];
            s_emit(st, text, cut, out);
            st->which = j;
            st->n_hold = 0;
            *hit = true;
            return (int64_t)cut;
        }
    }

    /* no match: hold the longest tail that is still a prefix of some stop string, emit the rest */
    int32_t n_keep = 0;
    for (int j = 0; j < st->n_stops; j++) n_keep = st->state[j] > n_keep ? st->state[j] : n_keep;
    const size_t total = (size_t)st->n_hold + len;
    const size_t n_out = total - (size_t)n_keep;
    s_emit(st, text, n_out, out);
    if (n_out >= (size_t)st->n_hold) { /* the new tail lies in text */
        if (n_keep) memcpy(st->hold, text + (n_out - (size_t)st->n_hold), (size_t)n_keep);
    } else { /* it starts inside the old hold */
        memmove(st->hold, st->hold + n_out, (size_t)st->n_hold - n_out);
        if (len) memcpy(st->hold + (st->n_hold - n_out), text, len);
    }
    st->n_hold = n_keep;
    return (int64_t)n_out;
}

int64_t eng_stop_flush(eng_stop_t *st, char *out, size_t cap) {
    if (!st || !out) return PD_EINVAL;
    /* after a hit n_hold is 0 and stays so: a hit is final */
    if (cap < ENG_STOP_MAX_BYTES) return PD_ERANGE;
    const int32_t n = st->n_hold;
    memcpy(out, st->hold, (size_t)n);
    st->n_hold = 0;
    memset(st->state, 0, sizeof st->state);
    return n;
}
