/* fuzz_kvt.c: libFuzzer target for the KV receiver: arbitrary multipart messages from up to three peers go
 * through kvt_receiver_handle_frames (no sockets in the way). Must never crash, and every block it reserved
 * must be back in the store, or handed over through a COMMITTED event, when the receiver is destroyed.
 * Input: records of [peer byte][frame count byte] then per frame [u16 LE length][bytes]. Peer bit 0x80 asks
 * the harness to fix up a KvData's checksums so the fuzzer reaches the write path; peer 0 starts with a
 * valid hello and a reservation (transfer 1, epoch 1, 8 tokens); peer 1 with a hello that offers a device pool
 * (mapped by the harness's stand-in, a host buffer) and a device reservation (transfer 2, epoch 1, 6 tokens), so that
 * frameless KvData reaches the device copy path. The receiver sources are compiled in here
 * so that the fuzzer sees their coverage (the library itself is not instrumented). */
#include "../../kvtransfer/kvt_convert.c"
#include "../../kvtransfer/kvt_receiver.c"
#include "../../kvtransfer/kvt_wire.c"

#include "../kvt_test_store.h"

#include <xxhash.h> /* the harness fixes up checksums with the system XXH3 (same values as kvt_hash.c) */

static void *s_zctx;

static kvt_fingerprint_t s_fp(void) {
    kvt_fingerprint_t f;
    memset(&f, 0, sizeof f);
    snprintf(f.model_id, sizeof f.model_id, "fuzz");
    f.kv_dtype = ENG_KV_F32;
    f.block_size = 2, f.n_layers = 2, f.n_kv_heads = 1, f.head_dim = 4;
    f.rope_theta = 10000.0f, f.rope_dim = 4;
    return f;
}

static kvt_test_store_t s_st; /* aborts at once on a bad release or chunk request */

/* The device path's stand-in: any handle maps one host "device pool" of up to S_DEV_BLOCKS blocks. */
#define S_DEV_BLOCKS 16
static uint8_t s_dev_pool[2 * 2 * S_DEV_BLOCKS * 2 * 1 * 4 * 4]; /* layers x kinds x blocks x chunk (f32) */
static int s_dev_open;                                           /* mapped and not yet closed */

static void *s_dev_peer_open(void *ctx, const void *handle, size_t len, const eng_kv_layout_t *src) {
    (void)ctx, (void)handle, (void)len;
    if (src->n_blocks > S_DEV_BLOCKS || eng_kv_pool_bytes(src) > sizeof s_dev_pool) return NULL;
    eng_kv_layout_t *l = malloc(sizeof *l);
    if (!l) abort();
    *l = *src;
    s_dev_open++;
    return l;
}

static pd_status s_dev_peer_copy(void *ctx, void *peer, const int32_t *src, const int32_t *dst, int32_t n,
                                 int32_t first_layer, int32_t n_layers) {
    const eng_kv_layout_t *l = peer;
    for (int32_t i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= l->n_blocks) abort(); /* the receiver let a block outside the peer's pool through */
        for (int32_t ly = first_layer; ly < first_layer + n_layers; ly++)
            for (int kind = 0; kind < 2; kind++)
                memcpy(kts_chunk(ctx, ly, kind, dst[i]), s_dev_pool + eng_kv_chunk_offset(l, ly, kind, src[i]),
                       eng_kv_chunk_bytes(l));
    }
    return PD_OK;
}

static void s_dev_peer_close(void *ctx, void *peer) {
    (void)ctx;
    if (--s_dev_open < 0) abort(); /* closed twice */
    free(peer);
}
static kvt_receiver_t *s_r; /* one for all inputs (reset between them): sockets close asynchronously */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    s_zctx = zmq_ctx_new();
    pd_log_set_level(PD_LOG_ERROR);
    if (!kts_init(
            &s_st,
            (eng_kv_layout_t){
                .n_layers = 2, .n_kv_heads = 1, .head_dim = 4, .block_size = 2, .n_blocks = 8, .dtype = ENG_KV_F32}))
        abort();
    s_st.is_abort_on_bad = true;
    kvt_receiver_params_t p = kvt_receiver_params_default();
    p.endpoint = "inproc://fuzz_kvt";
    p.fingerprint = s_fp();
    p.layout = s_st.l;
    p.store = kts_store(&s_st);
    p.store.peer_open = s_dev_peer_open, p.store.peer_copy = s_dev_peer_copy, p.store.peer_close = s_dev_peer_close;
    p.max_transfers = 4;
    p.max_message_bytes = 64 * 1024;
    char err[256];
    s_r = kvt_receiver_create(s_zctx, &p, err, sizeof err);
    if (!s_r) {
        fprintf(stderr, "fuzz_kvt: %s\n", err);
        abort();
    }
    return 0;
}

static void s_drain(kvt_receiver_t *r, kvt_test_store_t *st) {
    kvt_event_t ev[16];
    int n;
    while ((n = kvt_receiver_poll(r, 0, ev, 16)) > 0)
        for (int i = 0; i < n; i++)
            if (ev[i].kind == KVT_EV_COMMITTED) kts_release(st, ev[i].block_ids, ev[i].n_blocks); /* decode done */
}

/* Replaces a KvData's checksums with the right ones for the payload frames that follow. */
static size_t s_fix_checksums(uint8_t *env_buf, size_t len, size_t cap, const void *const *pay, const size_t *psz,
                              size_t n_pay) {
    Pdserve__V1__KvEnvelope *env = kvt_env_unpack(env_buf, len);
    if (!env) return len;
    if (env->body_case == PDSERVE__V1__KV_ENVELOPE__BODY_DATA) {
        uint64_t ck[8];
        for (size_t i = 0; i < n_pay; i++) ck[i] = XXH3_64bits(pay[i], psz[i]);
        uint64_t *old = env->data->checksums;
        size_t old_n = env->data->n_checksums;
        env->data->checksums = ck;
        env->data->n_checksums = n_pay;
        if (pdserve__v1__kv_envelope__get_packed_size(env) <= cap) len = pdserve__v1__kv_envelope__pack(env, env_buf);
        env->data->checksums = old;
        env->data->n_checksums = old_n;
    }
    pdserve__v1__kv_envelope__free_unpacked(env, NULL);
    return len;
}

static void s_feed_valid_start(kvt_receiver_t *r) {
    uint8_t buf[512];
    kvt_fingerprint_t f = s_fp();
    Pdserve__V1__Fingerprint fp;
    kvt_fp_to_pb(&f, &fp);
    Pdserve__V1__KvHello h = PDSERVE__V1__KV_HELLO__INIT;
    h.fingerprint = &fp;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO;
    env.hello = &h;
    const void *fr[1] = {buf};
    size_t sz[1] = {pdserve__v1__kv_envelope__pack(&env, buf)};
    kvt_receiver_handle_frames(r, "p0", 2, fr, sz, 1);
    Pdserve__V1__KvReserve rs = PDSERVE__V1__KV_RESERVE__INIT;
    rs.transfer_id = 1, rs.epoch = 1, rs.n_tokens = 8, rs.n_blocks = 4;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE;
    env.reserve = &rs;
    sz[0] = pdserve__v1__kv_envelope__pack(&env, buf);
    kvt_receiver_handle_frames(r, "p0", 2, fr, sz, 1);
    uint8_t handle[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    h.device_handle.data = handle, h.device_handle.len = sizeof handle;
    h.device_n_blocks = S_DEV_BLOCKS;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO;
    env.hello = &h;
    sz[0] = pdserve__v1__kv_envelope__pack(&env, buf);
    kvt_receiver_handle_frames(r, "p1", 2, fr, sz, 1);
    uint32_t dev_blocks[3] = {5, 6, 0};
    rs.transfer_id = 2, rs.n_tokens = 6, rs.n_blocks = 3;
    rs.n_device_blocks = 3, rs.device_blocks = dev_blocks;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE;
    env.reserve = &rs;
    sz[0] = pdserve__v1__kv_envelope__pack(&env, buf);
    kvt_receiver_handle_frames(r, "p1", 2, fr, sz, 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char *peers[3] = {"p0", "p1", "p2"};
    static uint8_t env_buf[4096];
    kvt_receiver_t *r = s_r;
    kvt_test_store_t *st = &s_st;
    memset(st->pool, 0, eng_kv_pool_bytes(&st->l));
    s_feed_valid_start(r);
    size_t off = 0;
    while (off + 2 <= size) {
        uint8_t pb = data[off], nf = data[off + 1] % 8;
        off += 2;
        const void *frames[8];
        size_t sizes[8], n = 0;
        for (; n < nf && off + 2 <= size; n++) {
            size_t len = (size_t)data[off] | ((size_t)data[off + 1] << 8);
            off += 2;
            if (len > size - off) len = size - off;
            frames[n] = data + off;
            sizes[n] = len;
            off += len;
        }
        if ((pb & 0x80) && n >= 1 && sizes[0] <= sizeof env_buf) {
            memcpy(env_buf, frames[0], sizes[0]);
            sizes[0] = s_fix_checksums(env_buf, sizes[0], sizeof env_buf, frames + 1, sizes + 1, n - 1);
            frames[0] = env_buf;
        }
        const char *peer = peers[(pb & 0x7f) % 3];
        kvt_receiver_handle_frames(r, peer, 2, frames, sizes, n);
        if (!kvt_receiver_has_room(r)) s_drain(r, st);
    }
    s_drain(r, st);
    kvt_receiver_reset(r);
    if (st->n_reserved != 0) abort(); /* a leaked reservation */
    if (s_dev_open != 0) abort();     /* a device pool mapped by a peer that is gone */
    return 0;
}
