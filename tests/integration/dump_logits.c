/* dump_logits.c: the CPU engine's logits for one token sequence, for Python tests that compare them with an
 * independent reference (tests/integration/test_make_draft.py against tests/golden/ref_forward_numpy.py).
 * Test tool only: one sequence, one forward from position 0, no sampling, no chunking.
 *
 *   dump_logits MODEL.gguf ID [ID ...]
 *
 * Writes (n_ids, vocab_size) little-endian float32 to stdout: the logits after every token (positions
 * 0 .. n_ids-1), row after row. Exit 0 on success, 1 on an engine error, 2 on bad arguments. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng.h"
#include "pd_log.h"

static int s_parse_ids(int argc, char **argv, int32_t *ids) {
    for (int i = 0; i < argc; i++) {
        char *end = NULL;
        errno = 0;
        long v = strtol(argv[i], &end, 10);
        if (errno || !*argv[i] || *end || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "dump_logits: bad token id '%s'\n", argv[i]);
            return -1;
        }
        ids[i] = (int32_t)v;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: dump_logits MODEL.gguf ID [ID ...]\n");
        return 2;
    }
    pd_log_init("dump_logits", PD_LOG_WARN);
    int rc = 1;
    eng_t *e = NULL;
    eng_kv_seq_t seq = {0};
    float *logits = NULL;
    uint8_t *want = NULL;
    int32_t n = argc - 2;
    int32_t *ids = pd_xmalloc(sizeof(int32_t) * (size_t)n);
    if (s_parse_ids(n, argv + 2, ids)) {
        rc = 2;
        goto fail;
    }

    eng_params_t p = eng_params_default();
    p.model_path = argv[1];
    /* just the blocks this one sequence needs: the default 512 MiB pool would dominate the run time */
    p.kv_n_blocks = n / p.kv_block_size + 1;
    if (n > p.max_batch_tokens) p.max_batch_tokens = n;
    char err[512];
    e = eng_create(&p, err, sizeof err);
    if (!e) {
        fprintf(stderr, "dump_logits: %s\n", err);
        goto fail;
    }
    int32_t vocab = eng_config(e)->vocab_size;
    if (eng_kv_seq_reserve(&seq, eng_kv_pool(e), eng_kv_layout(e)->block_size, n) != PD_OK) {
        fprintf(stderr, "dump_logits: cannot reserve KV blocks for %d tokens\n", n);
        goto fail;
    }
    want = pd_xmalloc((size_t)n);
    memset(want, 1, (size_t)n);
    logits = pd_xmalloc(sizeof(float) * (size_t)n * (size_t)vocab);
    int32_t pos = 0;
    const int32_t *table = seq.blocks;
    eng_batch_t b = {.n_seqs = 1,
                     .n_tokens = &n,
                     .pos = &pos,
                     .block_tables = &table,
                     .n_blocks = &seq.n_blocks,
                     .tokens = ids,
                     .want_logits = want,
                     .logits = logits};
    pd_status st = eng_forward(e, &b);
    if (st != PD_OK) {
        fprintf(stderr, "dump_logits: eng_forward: %s\n", pd_strerror(st));
        goto fail;
    }
    size_t n_vals = (size_t)n * (size_t)vocab;
    if (fwrite(logits, sizeof(float), n_vals, stdout) != n_vals || fflush(stdout) != 0) {
        fprintf(stderr, "dump_logits: write to stdout failed\n");
        goto fail;
    }
    rc = 0;
fail:
    if (e) eng_kv_seq_release(&seq, eng_kv_pool(e));
    eng_kv_seq_fini(&seq);
    eng_destroy(&e);
    free(logits);
    free(want);
    free(ids);
    return rc;
}
