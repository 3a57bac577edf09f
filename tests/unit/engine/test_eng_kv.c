/* test_eng_kv.c: KV block pool bookkeeping: all-or-nothing alloc, reference counts, release
 * validation, sequence tables, and that counters come back to idle. */
#include "eng_kv.h"
#include "eng_kv_layout.h"
#include "pd_test.h"

static void test_alloc_release(void) {
    eng_kv_pool_t *p = eng_kv_pool_create(8);
    REQUIRE(p);
    int32_t a[8], b[8];
    CHECK_EQ_INT(eng_kv_pool_alloc(p, 5, a), PD_OK);
    CHECK_EQ_INT(eng_kv_pool_n_free(p), 3);
    CHECK_EQ_INT(eng_kv_pool_alloc(p, 4, b), PD_EAGAIN); /* all or nothing */
    CHECK_EQ_INT(eng_kv_pool_n_free(p), 3);
    for (int i = 0; i < 5; i++) CHECK_EQ_INT(eng_kv_pool_refcount(p, a[i]), 1);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < i; j++) CHECK(a[i] != a[j]);
    for (int i = 1; i < 5; i++) CHECK_EQ_INT(a[i], a[i - 1] + 1); /* a fresh pool hands out ascending runs */
    CHECK_EQ_INT(eng_kv_pool_release(p, a, 5), PD_OK);
    CHECK_EQ_INT(eng_kv_pool_n_free(p), 8);
    /* ... and so does it after a release: the blocks come back in the order they were listed (kvtransfer sends a
     * run of ascending ids as one frame) */
    CHECK_EQ_INT(eng_kv_pool_alloc(p, 5, b), PD_OK);
    for (int i = 0; i < 5; i++) CHECK_EQ_INT(b[i], a[i]);
    CHECK_EQ_INT(eng_kv_pool_release(p, b, 5), PD_OK);
    CHECK_EQ_INT(eng_kv_pool_alloc(p, -1, a), PD_EINVAL);
    CHECK_EQ_INT(eng_kv_pool_alloc(p, 0, a), PD_OK);
    eng_kv_pool_destroy(&p);
    CHECK(p == NULL);
    eng_kv_pool_destroy(&p); /* NULL-safe */
    CHECK(eng_kv_pool_create(0) == NULL);
}

static void test_refcounts(void) {
    eng_kv_pool_t *p = eng_kv_pool_create(4);
    int32_t a[2];
    REQUIRE(eng_kv_pool_alloc(p, 2, a) == PD_OK);
    CHECK_EQ_INT(eng_kv_pool_ref(p, a[0]), PD_OK); /* shared by a second sequence */
    CHECK_EQ_INT(eng_kv_pool_refcount(p, a[0]), 2);
    CHECK_EQ_INT(eng_kv_pool_release(p, a, 2), PD_OK);
    CHECK_EQ_INT(eng_kv_pool_refcount(p, a[0]), 1); /* still held by the sharer */
    CHECK_EQ_INT(eng_kv_pool_refcount(p, a[1]), 0);
    CHECK_EQ_INT(eng_kv_pool_n_free(p), 3);
    /* a double release is refused and changes nothing */
    int32_t bad[2] = {a[0], a[1]};
    CHECK_EQ_INT(eng_kv_pool_release(p, bad, 2), PD_EINVAL);
    CHECK_EQ_INT(eng_kv_pool_refcount(p, a[0]), 1);
    CHECK_EQ_INT(eng_kv_pool_n_free(p), 3);
    /* the same id twice in one release needs two references */
    int32_t twice[2] = {a[0], a[0]};
    CHECK_EQ_INT(eng_kv_pool_release(p, twice, 2), PD_EINVAL);
    CHECK_EQ_INT(eng_kv_pool_ref(p, a[0]), PD_OK);
    CHECK_EQ_INT(eng_kv_pool_release(p, twice, 2), PD_OK);
    CHECK_EQ_INT(eng_kv_pool_n_free(p), 4);
    CHECK_EQ_INT(eng_kv_pool_ref(p, a[0]), PD_EINVAL); /* free block */
    CHECK_EQ_INT(eng_kv_pool_ref(p, 99), PD_EINVAL);
    CHECK_EQ_INT(eng_kv_pool_refcount(p, -1), -1);
    eng_kv_pool_destroy(&p);
}

static void test_seq_tables(void) {
    eng_kv_pool_t *p = eng_kv_pool_create(10);
    eng_kv_seq_t s1 = {0}, s2 = {0};
    CHECK_EQ_INT(eng_kv_seq_reserve(&s1, p, 16, 1), PD_OK);
    CHECK_EQ_INT(s1.n_blocks, 1);
    CHECK_EQ_INT(eng_kv_seq_reserve(&s1, p, 16, 16), PD_OK);
    CHECK_EQ_INT(s1.n_blocks, 1);
    CHECK_EQ_INT(eng_kv_seq_reserve(&s1, p, 16, 17), PD_OK);
    CHECK_EQ_INT(s1.n_blocks, 2);
    CHECK_EQ_INT(eng_kv_seq_reserve(&s1, p, 16, 16 * 7), PD_OK);
    CHECK_EQ_INT(s1.n_blocks, 7);
    CHECK_EQ_INT(eng_kv_seq_reserve(&s2, p, 16, 16 * 4), PD_EAGAIN); /* 3 left */
    CHECK_EQ_INT(s2.n_blocks, 0);
    CHECK_EQ_INT(eng_kv_pool_n_free(p), 3);
    eng_kv_seq_release(&s1, p);
    eng_kv_seq_release(&s2, p);
    CHECK_EQ_INT(eng_kv_pool_n_free(p), 10);
    eng_kv_seq_fini(&s1);
    eng_kv_seq_fini(&s2);
    eng_kv_pool_destroy(&p);
}

static void test_layout(void) {
    eng_kv_layout_t l = {
        .n_layers = 30, .n_kv_heads = 3, .head_dim = 64, .block_size = 16, .n_blocks = 100, .dtype = ENG_KV_F32};
    CHECK_EQ_INT(eng_kv_chunk_bytes(&l), 16 * 3 * 64 * 4);
    CHECK_EQ_INT(eng_kv_token_bytes(&l), 2 * 30 * 3 * 64 * 4);
    CHECK_EQ_INT(eng_kv_chunk_offset(&l, 0, ENG_KV_V, 0), 100 * eng_kv_chunk_bytes(&l));
    CHECK_EQ_INT(eng_kv_chunk_offset(&l, 1, ENG_KV_K, 3), 203 * eng_kv_chunk_bytes(&l));
    CHECK_EQ_INT(eng_kv_pool_bytes(&l), 30 * 2 * 100 * eng_kv_chunk_bytes(&l));
    CHECK_EQ_INT(eng_kv_blocks_for(0, 16), 0);
    CHECK_EQ_INT(eng_kv_blocks_for(33, 16), 3);
}

int main(void) {
    PD_TEST_RUN(test_alloc_release);
    PD_TEST_RUN(test_refcounts);
    PD_TEST_RUN(test_seq_tables);
    PD_TEST_RUN(test_layout);
    return pd_test_finish();
}
