/* pb_kv.c: validation of the KV hand-off messages (pdserve_kv.proto) against the shape agreed in the
 * handshake. Checks one message at a time; ordering (seq gaps, epochs, credit) is kvtransfer's job. */
#include "pb_int.h"

#include <stdio.h>
#include <string.h>

pb_kv_limits_t pb_kv_limits_default(void) {
    return (pb_kv_limits_t){
        .n_layers = 0,
        .block_size = 0,
        .n_kv_heads = 0,
        .head_dim = 0,
        .max_blocks = 65536,
        .max_frame_bytes = 64ull << 20,
        .vocab_size = 0,
        .require_checksums = true,
        .frame_runs = true,
        .shm_bytes = 0,
    };
}

size_t pb_kv_dtype_bytes(int dtype) {
    switch (dtype) {
    case PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32: return 4;
    case PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16:
    case PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16: return 2;
    default: return 0;
    }
}

uint64_t pb_kv_data_frame_bytes(const Pdserve__V1__KvData *d) {
    return (uint64_t)d->block_size * d->n_kv_heads * d->head_dim * pb_kv_dtype_bytes((int)d->dtype);
}

uint64_t pb_kv_data_n_frames(const Pdserve__V1__KvData *d) {
    return 2ull * d->n_layers * (d->n_frame_blocks ? (uint64_t)d->n_frame_blocks : d->n_blocks);
}

static pd_status s_hello(const Pdserve__V1__KvHello *h, char *err, size_t err_cap) {
    if (!h->fingerprint) return pb_fail(PD_EPROTO, err, err_cap, "hello.fingerprint is not set");
    pd_status st = pb_validate_fingerprint(h->fingerprint, err, err_cap);
    if (st) return st;
    if ((st = pb_check_str(PD_EPROTO, "hello.sender_id", h->sender_id, 1, PB_MAX_ID_BYTES, PB_STR_ID, err, err_cap)))
        return st;
    if (h->device_handle.len > PB_MAX_DEVICE_HANDLE_BYTES)
        return pb_fail(PD_EPROTO, err, err_cap, "hello.device_handle has %zu bytes, must be at most %d",
                       h->device_handle.len, PB_MAX_DEVICE_HANDLE_BYTES);
    if (h->device_handle.len > 0 && h->device_n_blocks == 0)
        return pb_fail(PD_EPROTO, err, err_cap, "hello.device_n_blocks = 0, must be >= 1 with device_handle");
    if (!h->shm_name || !h->shm_name[0]) return PD_OK; /* sockets only */
    /* a POSIX shared-memory name: "/" then up to NAME_MAX bytes without another "/" */
    if ((st = pb_check_str(PD_EPROTO, "hello.shm_name", h->shm_name, 2, 255, PB_STR_ID, err, err_cap))) return st;
    char q[64];
    if (h->shm_name[0] != '/' || strchr(h->shm_name + 1, '/'))
        return pb_fail(PD_EPROTO, err, err_cap, "hello.shm_name = %s, must be \"/\" then a name without \"/\"",
                       pb_quote(q, sizeof q, h->shm_name));
    if (h->shm_bytes == 0) return pb_fail(PD_EPROTO, err, err_cap, "hello.shm_bytes = 0, must be >= 1 with shm_name");
    return PD_OK;
}

static pd_status s_hello_reply(const Pdserve__V1__KvHelloReply *r, char *err, size_t err_cap) {
    pd_status st = pb_check_error(PD_EPROTO, "hello_reply.error", r->error, err, err_cap);
    if (st) return st;
    if (r->fingerprint && (st = pb_validate_fingerprint(r->fingerprint, err, err_cap))) return st;
    bool accepted = !r->error || r->error->code == PDSERVE__V1__ERROR_CODE__ERR_NONE;
    if (accepted && r->max_message_bytes == 0)
        return pb_fail(PD_EPROTO, err, err_cap, "hello_reply.max_message_bytes = 0, must be >= 1 when accepted");
    return PD_OK;
}

static pd_status s_reserve(const Pdserve__V1__KvReserve *r, const pb_kv_limits_t *lim, char *err, size_t err_cap) {
    uint64_t max_tokens = (uint64_t)lim->max_blocks * lim->block_size;
    if (r->n_tokens == 0 || r->n_tokens > max_tokens)
        return pb_fail(PD_EPROTO, err, err_cap, "reserve.n_tokens = %u, must be in [1, %llu]", r->n_tokens,
                       (unsigned long long)max_tokens);
    uint64_t want = ((uint64_t)r->n_tokens + lim->block_size - 1) / lim->block_size;
    if (r->n_blocks != want)
        return pb_fail(PD_EPROTO, err, err_cap,
                       "reserve.n_blocks = %u, must be %llu (ceil(n_tokens %u / block_size %u))", r->n_blocks,
                       (unsigned long long)want, r->n_tokens, lim->block_size);
    if (r->n_device_blocks != 0 && r->n_device_blocks != r->n_blocks)
        return pb_fail(PD_EPROTO, err, err_cap, "reserve.device_blocks has %zu entries, must be 0 or n_blocks %u",
                       r->n_device_blocks, r->n_blocks);
    return PD_OK;
}

static pd_status s_reserve_reply(const Pdserve__V1__KvReserveReply *r, char *err, size_t err_cap) {
    pd_status st = pb_check_error(PD_EPROTO, "reserve_reply.error", r->error, err, err_cap);
    if (st) return st;
    bool accepted = !r->error || r->error->code == PDSERVE__V1__ERROR_CODE__ERR_NONE;
    if (accepted && r->credit_bytes == 0)
        return pb_fail(PD_EPROTO, err, err_cap, "reserve_reply.credit_bytes = 0, must be >= 1 when accepted");
    return PD_OK;
}

/* Shape of the payload: dims against the agreed layout, and the frame size without overflow. */
static pd_status s_data_shape(const Pdserve__V1__KvData *d, const pb_kv_limits_t *lim, char *err, size_t err_cap) {
    size_t elem_bytes = pb_kv_dtype_bytes((int)d->dtype);
    if (!elem_bytes)
        return pb_fail(PD_EPROTO, err, err_cap, "data.dtype = %d, must be KV_DTYPE_F32 (1), F16 (2) or BF16 (3)",
                       (int)d->dtype);
    if (d->block_size != lim->block_size)
        return pb_fail(PD_EPROTO, err, err_cap, "data.block_size = %u, must be %u (the handshake's)", d->block_size,
                       lim->block_size);
    const struct {
        const char *name;
        uint32_t value, want;
    } dims[] = {{"n_kv_heads", d->n_kv_heads, lim->n_kv_heads}, {"head_dim", d->head_dim, lim->head_dim}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
        if (dims[i].value == 0) return pb_fail(PD_EPROTO, err, err_cap, "data.%s = 0, must be >= 1", dims[i].name);
        if (dims[i].want && dims[i].value != dims[i].want)
            return pb_fail(PD_EPROTO, err, err_cap, "data.%s = %u, must be %u (the handshake's)", dims[i].name,
                           dims[i].value, dims[i].want);
    }
    /* block_size * n_kv_heads < 2^64; multiply by head_dim and elem_bytes only below max_frame_bytes */
    uint64_t bytes = (uint64_t)d->block_size * d->n_kv_heads;
    if (bytes > lim->max_frame_bytes / d->head_dim || bytes * d->head_dim > lim->max_frame_bytes / elem_bytes)
        return pb_fail(PD_EPROTO, err, err_cap,
                       "data: frame of block_size %u x n_kv_heads %u x head_dim %u x %zu bytes is over %llu bytes",
                       d->block_size, d->n_kv_heads, d->head_dim, elem_bytes, (unsigned long long)lim->max_frame_bytes);
    return PD_OK;
}

/* frame_blocks: runs of >= 1 block summing to n_blocks, each run's frame within max_frame_bytes. */
static pd_status s_data_runs(const Pdserve__V1__KvData *d, const pb_kv_limits_t *lim, char *err, size_t err_cap) {
    if (!d->n_frame_blocks) return PD_OK;
    if (!lim->frame_runs)
        return pb_fail(PD_EPROTO, err, err_cap, "data.frame_blocks has %zu runs, but frame_runs was not offered",
                       d->n_frame_blocks);
    uint64_t sum = 0, chunk = pb_kv_data_frame_bytes(d); /* <= max_frame_bytes after s_data_shape */
    for (size_t r = 0; r < d->n_frame_blocks; r++) {
        uint32_t nb = d->frame_blocks[r];
        if (nb == 0 || nb > d->n_blocks)
            return pb_fail(PD_EPROTO, err, err_cap, "data.frame_blocks[%zu] = %u, must be in [1, n_blocks %u]", r, nb,
                           d->n_blocks);
        if (nb > lim->max_frame_bytes / chunk) /* chunk >= 2: every dim >= 1 after s_data_shape */
            return pb_fail(PD_EPROTO, err, err_cap,
                           "data.frame_blocks[%zu] = %u: frame of %u x %llu bytes is over %llu bytes", r, nb, nb,
                           (unsigned long long)chunk, (unsigned long long)lim->max_frame_bytes);
        sum += nb;
    }
    if (sum != d->n_blocks)
        return pb_fail(PD_EPROTO, err, err_cap, "data.frame_blocks sum to %llu, must be n_blocks %u",
                       (unsigned long long)sum, d->n_blocks);
    return PD_OK;
}

/* shm_offsets: one per frame, each frame inside the mapped pool. */
static pd_status s_data_shm(const Pdserve__V1__KvData *d, const pb_kv_limits_t *lim, uint64_t n_frames, char *err,
                            size_t err_cap) {
    if (!d->n_shm_offsets) return PD_OK;
    if (!lim->shm_bytes)
        return pb_fail(PD_EPROTO, err, err_cap, "data.shm_offsets has %zu entries, but no shared pool is mapped",
                       d->n_shm_offsets);
    if (d->n_shm_offsets != n_frames)
        return pb_fail(PD_EPROTO, err, err_cap, "data.shm_offsets has %zu entries, must be %llu (one per frame)",
                       d->n_shm_offsets, (unsigned long long)n_frames);
    uint64_t chunk = pb_kv_data_frame_bytes(d);
    for (size_t i = 0; i < d->n_shm_offsets; i++) {
        /* frame order with runs: per layer, per run, K then V; without runs every frame is one chunk */
        uint64_t size = d->n_frame_blocks ? chunk * d->frame_blocks[(i / 2) % d->n_frame_blocks] : chunk;
        uint64_t off = d->shm_offsets[i];
        if (size > lim->shm_bytes || off > lim->shm_bytes - size)
            return pb_fail(PD_EPROTO, err, err_cap,
                           "data.shm_offsets[%zu] = %llu: frame of %llu bytes ends past the shared pool of %llu bytes",
                           i, (unsigned long long)off, (unsigned long long)size, (unsigned long long)lim->shm_bytes);
    }
    return PD_OK;
}

static pd_status s_data(const Pdserve__V1__KvData *d, const pb_kv_limits_t *lim, char *err, size_t err_cap) {
    if (d->n_layers == 0) return pb_fail(PD_EPROTO, err, err_cap, "data.n_layers = 0, must be >= 1");
    if ((uint64_t)d->first_layer + d->n_layers > lim->n_layers)
        return pb_fail(PD_EPROTO, err, err_cap, "data: first_layer %u + n_layers %u = %llu, must be <= %u",
                       d->first_layer, d->n_layers, (unsigned long long)d->first_layer + d->n_layers, lim->n_layers);
    if (d->n_blocks == 0) return pb_fail(PD_EPROTO, err, err_cap, "data.n_blocks = 0, must be >= 1");
    if ((uint64_t)d->first_block + d->n_blocks > lim->max_blocks)
        return pb_fail(PD_EPROTO, err, err_cap, "data: first_block %u + n_blocks %u = %llu, must be <= %u",
                       d->first_block, d->n_blocks, (unsigned long long)d->first_block + d->n_blocks, lim->max_blocks);
    pd_status st = s_data_shape(d, lim, err, err_cap);
    if (st || (st = s_data_runs(d, lim, err, err_cap))) return st;
    size_t n_units = d->n_frame_blocks ? d->n_frame_blocks : d->n_blocks; /* <= n_blocks < 2^32 */
    if ((uint64_t)d->n_layers * n_units > UINT64_MAX / 2)                 /* only with limits near 2^32 */
        return pb_fail(PD_EPROTO, err, err_cap, "data: 2 x n_layers %u x %zu frames overflow", d->n_layers, n_units);
    uint64_t n_frames = pb_kv_data_n_frames(d);
    if (d->n_checksums != n_frames && (lim->require_checksums || d->n_checksums != 0))
        return pb_fail(PD_EPROTO, err, err_cap,
                       "data.checksums has %zu entries, must be %llu (2 x n_layers %u x %s %zu)%s", d->n_checksums,
                       (unsigned long long)n_frames, d->n_layers, d->n_frame_blocks ? "runs" : "n_blocks", n_units,
                       lim->require_checksums ? "" : " or 0");
    return s_data_shm(d, lim, n_frames, err, err_cap);
}

static pd_status s_commit(const Pdserve__V1__KvCommit *c, const pb_kv_limits_t *lim, char *err, size_t err_cap) {
    if (c->n_frames == 0) return pb_fail(PD_EPROTO, err, err_cap, "commit.n_frames = 0, must be >= 1");
    if (c->first_token < 0 || (lim->vocab_size > 0 && c->first_token >= lim->vocab_size))
        return pb_fail(PD_EPROTO, err, err_cap, "commit.first_token = %d, must be in [0, %d)", c->first_token,
                       lim->vocab_size > 0 ? lim->vocab_size : INT32_MAX);
    return PD_OK;
}

pd_status pb_validate_kv_envelope(const Pdserve__V1__KvEnvelope *env, const pb_kv_limits_t *lim, char *err,
                                  size_t err_cap) {
    if (!env || !lim) return pb_fail(PD_EINVAL, err, err_cap, "kv envelope: NULL argument");
    if (lim->n_layers == 0 || lim->block_size == 0)
        return pb_fail(PD_EINVAL, err, err_cap, "kv limits: n_layers = %u, block_size = %u, both must be set",
                       lim->n_layers, lim->block_size);
    switch (env->body_case) {
    case PDSERVE__V1__KV_ENVELOPE__BODY_HELLO:
        if (env->hello) return s_hello(env->hello, err, err_cap);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_HELLO_REPLY:
        if (env->hello_reply) return s_hello_reply(env->hello_reply, err, err_cap);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE:
        if (env->reserve) return s_reserve(env->reserve, lim, err, err_cap);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE_REPLY:
        if (env->reserve_reply) return s_reserve_reply(env->reserve_reply, err, err_cap);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_DATA:
        if (env->data) return s_data(env->data, lim, err, err_cap);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_CREDIT:
        if (env->credit) return PD_OK; /* any count: 0 is a no-op, and over-crediting only floods the receiver itself */
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_COMMIT:
        if (env->commit) return s_commit(env->commit, lim, err, err_cap);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_DONE:
        if (env->done) return pb_check_error(PD_EPROTO, "done.error", env->done->error, err, err_cap);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_CANCEL:
        if (env->cancel) return pb_check_error(PD_EPROTO, "cancel.reason", env->cancel->reason, err, err_cap);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY__NOT_SET:
        return pb_fail(PD_EPROTO, err, err_cap, "kv envelope: body is not set, must be exactly one of hello .. cancel");
    default: break;
    }
    return pb_fail(PD_EPROTO, err, err_cap,
                   "kv envelope: body case = %d with no body, must be exactly one of hello .. cancel",
                   (int)env->body_case);
}
