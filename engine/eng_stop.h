/* eng_stop.h: stop strings matched over the streamed text, across token boundaries. Text that could
 * still be the start of a stop string is held back until it is known not to be; the stop string itself
 * and everything after it are never emitted (OpenAI semantics). Plain byte matching: UTF-8 safe because
 * stop strings are themselves UTF-8.
 *
 * Exact semantics. Let T be the concatenation of all text fed so far (since creation or the last flush).
 *   - Match: the first byte position e of T at which some stop string ends (T[e-len+1..e] == stop).
 *     Among the stop strings ending at that same e, the longest wins (it starts earliest). The emitted
 *     text is then T[0 .. e-len), exactly what precedes the match; nothing after it is ever emitted.
 *     So matches are found in the order they complete, which is the order a streaming decoder can act on:
 *     with stops {"abcd", "bc"} and T = "abcd", "bc" completes first and the output is "a". (For a single
 *     stop string this is simply its first occurrence; overlapping text such as stop "abab" in "ababab"
 *     matches at T[0..3] and emits "".)
 *   - Hold-back: before a match, after each feed the emitted text is T minus its longest suffix that is a
 *     proper prefix of some stop string; that suffix is held (at most ENG_STOP_MAX_BYTES - 1 bytes). So the
 *     output is the same however T is split into feeds, and nothing is held that cannot start a match.
 *   - Flush (end of generation without a match) emits the held bytes and starts a fresh T. A match is
 *     final: flush does not undo it.
 * Cost: O(n_stops) per byte (one Knuth-Morris-Pratt automaton per stop string), no allocation after create.
 * An eng_stop_t belongs to one request and is used by one thread at a time. */
#ifndef ENG_STOP_H
#define ENG_STOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pd_common.h"

#define ENG_STOP_MAX       8   /* stop strings per request (OpenAI allows 4) */
#define ENG_STOP_MAX_BYTES 256 /* per stop string */

typedef struct eng_stop eng_stop_t;

/* Copies the strings (NUL-terminated; duplicates allowed). NULL (and reason in err, which may be NULL)
 * for too many, NULL, empty or too-long strings. n may be 0: then every byte passes straight through. */
eng_stop_t *eng_stop_create(const char *const *stops, int n_stops, char *err, size_t err_cap);
/* Frees st (NULL or *st == NULL is fine) and sets *st to NULL. */
void eng_stop_destroy(eng_stop_t **st);

/* Feeds newly decoded text. Writes to out the bytes now safe to emit and returns their count;
 * sets *hit once a stop string completes (then the emitted text ends just before it and later feeds
 * emit nothing, returning 0 with *hit true). cap must be >= len + ENG_STOP_MAX_BYTES.
 * Returns PD_EINVAL for NULL arguments (text may be NULL when len is 0), PD_ERANGE when cap is too small
 * (nothing consumed). */
PD_NODISCARD int64_t eng_stop_feed(eng_stop_t *st, const char *text, size_t len, char *out, size_t cap, bool *hit);
/* At end of generation (EOS, max tokens): releases the held-back bytes and restarts matching on a fresh
 * text. A hit is final: after one, flush writes nothing and feeds stay stopped. Returns bytes written;
 * PD_ERANGE if cap < ENG_STOP_MAX_BYTES (always enough), PD_EINVAL for NULL arguments. */
PD_NODISCARD int64_t eng_stop_flush(eng_stop_t *st, char *out, size_t cap);

/* Index (into the array given to create) of the stop string that matched, or -1 before a match:
 * OpenAI's stop_reason. When duplicates tie, the lowest index. */
int eng_stop_which(const eng_stop_t *st);

#endif
