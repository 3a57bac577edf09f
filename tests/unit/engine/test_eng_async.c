/* test_eng_async.c: eng_forward on the engine thread gives the same logits, bit for bit, as the synchronous
 * call; completion shows on the fd (poll); a second submit while busy is refused; destroy while idle or
 * right after a submit is clean. Real model. */
#include <math.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "eng.h"
#include "eng_async.h"
#include "pd_test.h"

static eng_t *s_engine;

static eng_batch_t s_batch(eng_kv_seq_t *seq, const int32_t *tokens, int32_t *n, int32_t *pos, const int32_t **table,
                           float *logits) {
    *table = seq->blocks;
    return (eng_batch_t){.n_seqs = 1,
                         .n_tokens = n,
                         .pos = pos,
                         .block_tables = table,
                         .n_blocks = &seq->n_blocks,
                         .tokens = tokens,
                         .logits = logits};
}

static void test_same_logits(void) {
    const int32_t vocab = eng_config(s_engine)->vocab_size;
    int32_t tokens[40];
    for (int i = 0; i < 40; i++) tokens[i] = 100 + 37 * i;
    eng_kv_seq_t seq = {0};
    REQUIRE(eng_kv_seq_reserve(&seq, eng_kv_pool(s_engine), eng_kv_layout(s_engine)->block_size, 40) == PD_OK);
    float *sync = calloc((size_t)vocab, sizeof(float)), *async = calloc((size_t)vocab, sizeof(float));
    int32_t n = 40, pos = 0;
    const int32_t *table;
    eng_batch_t b = s_batch(&seq, tokens, &n, &pos, &table, sync);
    REQUIRE(eng_forward(s_engine, &b) == PD_OK);

    eng_async_t *a = eng_async_create(s_engine);
    REQUIRE(a);
    pd_status res = PD_EIO;
    CHECK_EQ_INT(eng_async_collect(a, &res), PD_EAGAIN); /* nothing submitted */
    b.logits = async;
    CHECK_EQ_INT(eng_async_submit(a, &b), PD_OK);
    CHECK(eng_async_is_busy(a));
    CHECK_EQ_INT(eng_async_submit(a, &b), PD_EAGAIN); /* one batch at a time */
    struct pollfd pfd = {.fd = eng_async_fd(a), .events = POLLIN};
    CHECK_EQ_INT(poll(&pfd, 1, 60000), 1);
    CHECK_EQ_INT(eng_async_collect(a, &res), PD_OK);
    CHECK_EQ_INT(res, PD_OK);
    CHECK(!eng_async_is_busy(a));
    CHECK_EQ_INT(poll(&pfd, 1, 0), 0); /* drained: readable only while a result waits */
    CHECK(memcmp(sync, async, (size_t)vocab * sizeof(float)) == 0);
    CHECK(isfinite(async[0]));

    /* a malformed batch: the engine's own status comes back through the thread */
    int32_t bad = vocab + 5;
    eng_batch_t bb = s_batch(&seq, &bad, &(int32_t){1}, &(int32_t){0}, &table, async);
    CHECK_EQ_INT(eng_async_submit(a, &bb), PD_OK);
    CHECK_EQ_INT(eng_async_wait(a, &res), PD_OK);
    CHECK_EQ_INT(res, PD_EINVAL);

    CHECK_EQ_INT(eng_async_submit(a, &b), PD_OK);
    eng_async_destroy(&a); /* waits for the running batch */
    CHECK(a == NULL);
    eng_kv_seq_release(&seq, eng_kv_pool(s_engine));
    eng_kv_seq_fini(&seq);
    free(sync);
    free(async);
}

int main(void) {
    eng_params_t p = eng_params_default();
    p.model_path = pd_test_model_path();
    p.kv_n_blocks = 64;
    char err[256];
    s_engine = eng_create(&p, err, sizeof err);
    if (!s_engine) {
        fprintf(stderr, "cannot load model: %s\n", err);
        return 1;
    }
    PD_TEST_RUN(test_same_logits);
    eng_destroy(&s_engine);
    return pd_test_finish();
}
