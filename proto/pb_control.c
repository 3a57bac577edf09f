/* pb_control.c: validation of the control plane (pdserve_control.proto: Fingerprint, WorkerRegister,
 * Heartbeat, Cancel) and the fingerprint comparison. Whether a peer is *wanted* is the router's call. */
#include "pb_int.h"

#include <math.h>
#include <string.h>

static bool s_role_known(int role) {
    return role == PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL || role == PDSERVE__V1__WORKER_ROLE__ROLE_DECODE ||
           role == PDSERVE__V1__WORKER_ROLE__ROLE_BOTH;
}

pd_status pb_validate_fingerprint(const Pdserve__V1__Fingerprint *fp, char *err, size_t err_cap) {
    if (!fp) return pb_fail(PD_EPROTO, err, err_cap, "fingerprint is not set");
    if (fp->protocol_version == 0)
        return pb_fail(PD_EPROTO, err, err_cap, "fingerprint.protocol_version = 0, must be >= 1");
    pd_status st =
        pb_check_str(PD_EPROTO, "fingerprint.model_id", fp->model_id, 1, PB_MAX_ID_BYTES, PB_STR_NAME, err, err_cap);
    if (st) return st;
    if (!pb_kv_dtype_bytes((int)fp->kv_dtype))
        return pb_fail(PD_EPROTO, err, err_cap,
                       "fingerprint.kv_dtype = %d, must be KV_DTYPE_F32 (1), F16 (2) or BF16 (3)", (int)fp->kv_dtype);
    const struct {
        const char *name;
        uint32_t value;
    } dims[] = {{"block_size", fp->block_size},
                {"n_layers", fp->n_layers},
                {"n_kv_heads", fp->n_kv_heads},
                {"head_dim", fp->head_dim}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].value == 0)
            return pb_fail(PD_EPROTO, err, err_cap, "fingerprint.%s = 0, must be >= 1", dims[i].name);
    if (!(isfinite(fp->rope_theta) && fp->rope_theta > 0.f))
        return pb_fail(PD_EPROTO, err, err_cap, "fingerprint.rope_theta = %g, must be finite and > 0",
                       (double)fp->rope_theta);
    if (fp->rope_dim == 0 || fp->rope_dim > fp->head_dim)
        return pb_fail(PD_EPROTO, err, err_cap, "fingerprint.rope_dim = %u, must be in [1, head_dim %u]", fp->rope_dim,
                       fp->head_dim);
    return PD_OK;
}

pd_status pb_validate_worker_register(const Pdserve__V1__WorkerRegister *wr, char *err, size_t err_cap) {
    if (!wr) return pb_fail(PD_EINVAL, err, err_cap, "worker register: NULL argument");
    pd_status st = pb_check_str(PD_EPROTO, "worker_id", wr->worker_id, 1, PB_MAX_ID_BYTES, PB_STR_ID, err, err_cap);
    if (st) return st;
    if (!s_role_known((int)wr->role))
        return pb_fail(PD_EPROTO, err, err_cap, "role = %d, must be ROLE_PREFILL (1), ROLE_DECODE (2) or ROLE_BOTH (3)",
                       (int)wr->role);
    if ((st = pb_check_str(PD_EPROTO, "control_endpoint", wr->control_endpoint, 1, PB_MAX_ENDPOINT_BYTES, PB_STR_ID,
                           err, err_cap)))
        return st;
    size_t kv_min = wr->role == PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL ? 0 : 1; /* decoders receive KV */
    if ((st = pb_check_str(PD_EPROTO, "kv_endpoint", wr->kv_endpoint, kv_min, PB_MAX_ENDPOINT_BYTES, PB_STR_ID, err,
                           err_cap)))
        return st;
    if ((st = pb_validate_fingerprint(wr->fingerprint, err, err_cap))) return st;
    return pb_check_str(PD_EPROTO, "backend", wr->backend, 1, PB_MAX_ID_BYTES, PB_STR_ID, err, err_cap);
}

pd_status pb_validate_heartbeat(const Pdserve__V1__Heartbeat *hb, char *err, size_t err_cap) {
    if (!hb) return pb_fail(PD_EINVAL, err, err_cap, "heartbeat: NULL argument");
    pd_status st = pb_check_str(PD_EPROTO, "worker_id", hb->worker_id, 1, PB_MAX_ID_BYTES, PB_STR_ID, err, err_cap);
    if (st) return st;
    if (!s_role_known((int)hb->role))
        return pb_fail(PD_EPROTO, err, err_cap, "role = %d, must be ROLE_PREFILL (1), ROLE_DECODE (2) or ROLE_BOTH (3)",
                       (int)hb->role);
    if (hb->free_kv_blocks > hb->total_kv_blocks)
        return pb_fail(PD_EPROTO, err, err_cap, "free_kv_blocks = %u, must be <= total_kv_blocks %u",
                       hb->free_kv_blocks, hb->total_kv_blocks);
    return PD_OK;
}

pd_status pb_validate_cancel(const Pdserve__V1__Cancel *c, char *err, size_t err_cap) {
    if (!c) return pb_fail(PD_EINVAL, err, err_cap, "cancel: NULL argument");
    if (!protobuf_c_enum_descriptor_get_value(&pdserve__v1__error_code__descriptor, (int)c->reason))
        return pb_fail(PD_EPROTO, err, err_cap, "reason = %d, must be a known ErrorCode", (int)c->reason);
    return PD_OK;
}

pd_status pb_fingerprint_diff(const Pdserve__V1__Fingerprint *a, const Pdserve__V1__Fingerprint *b, char *err,
                              size_t err_cap) {
    if (!a || !b)
        return pb_fail(PD_EPROTO, err, err_cap, "fingerprint: %s vs %s", a ? "set" : "missing", b ? "set" : "missing");
    char qa[64], qb[64];
#define PB_DIFF_U(f)                                                                           \
    if (a->f != b->f)                                                                          \
        return pb_fail(PD_EPROTO, err, err_cap, #f ": %llu vs %llu", (unsigned long long)a->f, \
                       (unsigned long long)b->f);
    PB_DIFF_U(protocol_version)
    if (strcmp(a->model_id ? a->model_id : "", b->model_id ? b->model_id : ""))
        return pb_fail(PD_EPROTO, err, err_cap, "model_id: %s vs %s", pb_quote(qa, sizeof qa, a->model_id),
                       pb_quote(qb, sizeof qb, b->model_id));
    if (a->weights_hash != b->weights_hash)
        return pb_fail(PD_EPROTO, err, err_cap, "weights_hash: %016llx vs %016llx", (unsigned long long)a->weights_hash,
                       (unsigned long long)b->weights_hash);
    if (a->tokenizer_hash != b->tokenizer_hash)
        return pb_fail(PD_EPROTO, err, err_cap, "tokenizer_hash: %016llx vs %016llx",
                       (unsigned long long)a->tokenizer_hash, (unsigned long long)b->tokenizer_hash);
    /* kv_dtype (field 5) is left out on purpose: the receiver converts */
    PB_DIFF_U(block_size)
    PB_DIFF_U(n_layers)
    PB_DIFF_U(n_kv_heads)
    PB_DIFF_U(head_dim)
    if (!(a->rope_theta == b->rope_theta)) /* exact: both sides read the same GGUF value */
        return pb_fail(PD_EPROTO, err, err_cap, "rope_theta: %.9g vs %.9g", (double)a->rope_theta,
                       (double)b->rope_theta);
    PB_DIFF_U(rope_dim)
#undef PB_DIFF_U
    return PD_OK;
}
