/* bench_ngram.c: host time of the n-gram lookup per drafting row and step, the scan (eng_draft_ngram) against the
 * incremental index (eng_ngram_index_lookup), on a RAG-like history: a prompt of --prompt random tokens (a vocabulary
 * of 49152, SmolLM2's) and an answer that quotes stretches of it, grown 1-3 tokens a step (accepted drafts), one
 * lookup at n 2..4 a step (then n 1 where that finds nothing, as the decode scheduler's ngram_short_k does), for
 * --steps steps. Both must return the same drafts (checked); prints microseconds per step for each, and for the
 * index its first lookup apart from the steps after it, and the slowest step of each (the index takes in a long
 * prompt over its first calls, a bounded share each). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng_draft.h"
#include "pd_common.h"

static uint32_t s_rng = 2463534242u;
static uint32_t s_next(void) { /* xorshift32 */
    s_rng ^= s_rng << 13, s_rng ^= s_rng >> 17, s_rng ^= s_rng << 5;
    return s_rng;
}

int main(int argc, char **argv) {
    int32_t n_prompt = 2048, n_steps = 512;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--prompt") == 0) n_prompt = atoi(argv[i + 1]);
        if (strcmp(argv[i], "--steps") == 0) n_steps = atoi(argv[i + 1]);
    }
    if (n_prompt < 64 || n_steps < 1) {
        fprintf(stderr, "usage: ngram [--prompt N >= 64] [--steps N]\n");
        return 2;
    }
    const int32_t cap = n_prompt + 3 * n_steps;
    int32_t *h = malloc(sizeof *h * (size_t)cap), want[16], got[16];
    eng_ngram_index_t *ix = eng_ngram_index_create();
    if (!h || !ix) return 1;
    for (int32_t i = 0; i < n_prompt; i++) h[i] = (int32_t)(s_next() % 49152u);
    int32_t n = n_prompt, quote = -1;
    uint64_t t_scan = 0, t_index = 0, t_first = 0; /* t_first: the index's first lookup */
    uint64_t max_scan = 0, max_index = 0;          /* the slowest step of each */
    long n_found = 0;
    for (int32_t step = 0; step < n_steps; step++) {
        const int32_t add = 1 + (int32_t)(s_next() % 3);
        for (int32_t i = 0; i < add; i++) { /* quote the prompt in runs of ~20 tokens, else new tokens */
            if (quote < 0 && s_next() % 20 == 0) quote = (int32_t)(s_next() % (uint32_t)(n_prompt - 32));
            h[n++] = quote >= 0 ? h[quote++] : (int32_t)(s_next() % 49152u);
            if (quote >= 0 && s_next() % 20 == 0) quote = -1;
        }
        uint64_t t0 = pd_now_us();
        int32_t nw = eng_draft_ngram(h, n, 2, 4, 7, want);
        if (nw == 0) nw = eng_draft_ngram(h, n, 1, 1, 2, want);
        uint64_t t1 = pd_now_us();
        int32_t ng = eng_ngram_index_lookup(ix, h, n, 2, 4, 7, got);
        if (ng == 0) ng = eng_ngram_index_lookup(ix, h, n, 1, 1, 2, got);
        uint64_t t2 = pd_now_us();
        if (nw != ng || memcmp(want, got, sizeof *want * (size_t)nw) != 0) {
            fprintf(stderr, "ngram: index and scan differ at step %d\n", step);
            return 1;
        }
        t_scan += t1 - t0, n_found += nw > 0;
        max_scan = t1 - t0 > max_scan ? t1 - t0 : max_scan, max_index = t2 - t1 > max_index ? t2 - t1 : max_index;
        if (step == 0)
            t_first = t2 - t1;
        else
            t_index += t2 - t1;
    }
    const double us_scan = (double)t_scan / n_steps, us_index = (double)(t_first + t_index) / n_steps,
                 us_steady = n_steps > 1 ? (double)t_index / (n_steps - 1) : 0.0;
    printf(
        "ngram prompt=%d steps=%d (history %d -> %d tokens, drafts found in %ld steps): scan %.2f us/step, "
        "index %.2f us/step (%.1fx; first lookup %.0f us, then %.2f us/step); slowest step: scan %.0f us, index %.0f "
        "us\n",
        n_prompt, n_steps, n_prompt, n, n_found, us_scan, us_index, us_index > 0 ? us_scan / us_index : 0.0,
        (double)t_first, us_steady, (double)max_scan, (double)max_index);
    eng_ngram_index_destroy(&ix);
    free(h);
    return 0;
}
