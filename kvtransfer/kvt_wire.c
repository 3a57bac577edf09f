/* kvt_wire.c: what sender and receiver share on the wire: fingerprint mapping and check, status <-> error
 * code mapping, envelope pack+send and capped unpack, and the ZeroMQ options both sockets get. No state. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>

#include "kvt_int.h"

pd_status kvt_fingerprint_check(const kvt_fingerprint_t *mine, const kvt_fingerprint_t *peer, char *err,
                                size_t err_cap) {
#define KVT_CMP_INT(field)                                                                                        \
    if (mine->field != peer->field) {                                                                             \
        snprintf(err, err_cap, "fingerprint mismatch: " #field " (mine %lld, peer %lld)", (long long)mine->field, \
                 (long long)peer->field);                                                                         \
        return PD_EPROTO;                                                                                         \
    }
    if (strncmp(mine->model_id, peer->model_id, sizeof mine->model_id) != 0) {
        snprintf(err, err_cap, "fingerprint mismatch: model_id (mine '%.40s', peer '%.40s')", mine->model_id,
                 peer->model_id);
        return PD_EPROTO;
    }
    if (mine->weights_hash != peer->weights_hash) {
        snprintf(err, err_cap, "fingerprint mismatch: weights_hash (mine %016llx, peer %016llx)",
                 (unsigned long long)mine->weights_hash, (unsigned long long)peer->weights_hash);
        return PD_EPROTO;
    }
    if (mine->tokenizer_hash != peer->tokenizer_hash) {
        snprintf(err, err_cap, "fingerprint mismatch: tokenizer_hash (mine %016llx, peer %016llx)",
                 (unsigned long long)mine->tokenizer_hash, (unsigned long long)peer->tokenizer_hash);
        return PD_EPROTO;
    }
    KVT_CMP_INT(block_size)
    KVT_CMP_INT(n_layers)
    KVT_CMP_INT(n_kv_heads)
    KVT_CMP_INT(head_dim)
    /* bitwise: the same config must give the same float, and NaN must not compare equal to anything */
    if (memcmp(&mine->rope_theta, &peer->rope_theta, sizeof(float)) != 0) {
        snprintf(err, err_cap, "fingerprint mismatch: rope_theta (mine %g, peer %g)", (double)mine->rope_theta,
                 (double)peer->rope_theta);
        return PD_EPROTO;
    }
    KVT_CMP_INT(rope_dim)
#undef KVT_CMP_INT
    if (err_cap) err[0] = '\0';
    return PD_OK;
}

void kvt_copy_str(char *dst, size_t cap, const char *src) {
    if (!cap) return;
    snprintf(dst, cap, "%s", src ? src : "");
}

Pdserve__V1__KvDtype kvt_dtype_to_pb(eng_kv_dtype_t dt) {
    switch (dt) {
    case ENG_KV_F32: return PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    case ENG_KV_F16: return PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16;
    case ENG_KV_BF16: return PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16;
    }
    return PDSERVE__V1__KV_DTYPE__KV_DTYPE_UNSPECIFIED;
}

bool kvt_dtype_from_pb(int pb, eng_kv_dtype_t *out) {
    switch (pb) {
    case PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32: *out = ENG_KV_F32; return true;
    case PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16: *out = ENG_KV_F16; return true;
    case PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16: *out = ENG_KV_BF16; return true;
    default: return false;
    }
}

void kvt_fp_to_pb(const kvt_fingerprint_t *f, Pdserve__V1__Fingerprint *pb) {
    pdserve__v1__fingerprint__init(pb);
    pb->protocol_version = KVT_PROTOCOL_VERSION;
    pb->model_id = (char *)f->model_id;
    pb->weights_hash = f->weights_hash;
    pb->tokenizer_hash = f->tokenizer_hash;
    pb->kv_dtype = kvt_dtype_to_pb(f->kv_dtype);
    pb->block_size = (uint32_t)f->block_size;
    pb->n_layers = (uint32_t)f->n_layers;
    pb->n_kv_heads = (uint32_t)f->n_kv_heads;
    pb->head_dim = (uint32_t)f->head_dim;
    pb->rope_theta = f->rope_theta;
    pb->rope_dim = (uint32_t)f->rope_dim;
}

pd_status kvt_fp_from_pb(const Pdserve__V1__Fingerprint *pb, kvt_fingerprint_t *f, char *err, size_t err_cap) {
    memset(f, 0, sizeof *f);
    if (!pb) {
        snprintf(err, err_cap, "fingerprint missing");
        return PD_EPROTO;
    }
    if (pb->protocol_version != KVT_PROTOCOL_VERSION) {
        snprintf(err, err_cap, "fingerprint mismatch: protocol_version (mine %d, peer %u)", KVT_PROTOCOL_VERSION,
                 pb->protocol_version);
        return PD_EPROTO;
    }
    const char *id = pb->model_id ? pb->model_id : "";
    if (strlen(id) >= sizeof f->model_id) {
        snprintf(err, err_cap, "fingerprint mismatch: model_id (peer's is %zu bytes, limit %zu)", strlen(id),
                 sizeof f->model_id - 1);
        return PD_EPROTO;
    }
    memcpy(f->model_id, id, strlen(id) + 1);
    if (!kvt_dtype_from_pb(pb->kv_dtype, &f->kv_dtype)) {
        snprintf(err, err_cap, "fingerprint mismatch: kv_dtype %d unknown", (int)pb->kv_dtype);
        return PD_EPROTO;
    }
    const uint32_t lim = 1u << 20; /* keeps every product of these fields far from overflow */
    if (pb->block_size > lim || pb->n_layers > lim || pb->n_kv_heads > lim || pb->head_dim > lim ||
        pb->rope_dim > lim) {
        snprintf(err, err_cap, "fingerprint mismatch: a shape field exceeds %u", lim);
        return PD_EPROTO;
    }
    f->weights_hash = pb->weights_hash;
    f->tokenizer_hash = pb->tokenizer_hash;
    f->block_size = (int32_t)pb->block_size;
    f->n_layers = (int32_t)pb->n_layers;
    f->n_kv_heads = (int32_t)pb->n_kv_heads;
    f->head_dim = (int32_t)pb->head_dim;
    f->rope_theta = pb->rope_theta;
    f->rope_dim = (int32_t)pb->rope_dim;
    return PD_OK;
}

pd_status kvt_status_from_code(int code) {
    switch (code) {
    case PDSERVE__V1__ERROR_CODE__ERR_NONE: return PD_OK;
    case PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED: return PD_EAGAIN;
    case PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED: return PD_ETIMEDOUT;
    case PDSERVE__V1__ERROR_CODE__ERR_CANCELLED: return PD_ECLOSED;
    case PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT: return PD_EINVAL;
    case PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE: return PD_ECLOSED;
    default: return PD_EPROTO; /* PROTOCOL, INCOMPATIBLE, INTERNAL and anything unknown */
    }
}

int kvt_code_from_status(pd_status st) {
    switch (st) {
    case PD_OK: return PDSERVE__V1__ERROR_CODE__ERR_NONE;
    case PD_EAGAIN: return PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED;
    case PD_ETIMEDOUT: return PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED;
    case PD_ECLOSED: return PDSERVE__V1__ERROR_CODE__ERR_CANCELLED;
    case PD_EINVAL: return PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT;
    case PD_EPROTO: return PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL;
    default: return PDSERVE__V1__ERROR_CODE__ERR_INTERNAL;
    }
}

pd_status kvt_send_env(void *sock, const void *id, size_t id_len, const Pdserve__V1__KvEnvelope *env, uint8_t *buf,
                       size_t cap, bool has_more) {
    size_t n = pdserve__v1__kv_envelope__get_packed_size(env);
    if (n > cap) return PD_EINVAL;
    pdserve__v1__kv_envelope__pack(env, buf);
    if (id) {
        /* ROUTER_MANDATORY: EHOSTUNREACH for an unknown peer, EAGAIN when its pipe is full; both are seen
         * on this first frame, so a message is never half sent */
        if (zmq_send(sock, id, id_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) return errno == EAGAIN ? PD_EAGAIN : PD_EIO;
    }
    if (zmq_send(sock, buf, n, ZMQ_DONTWAIT | (has_more ? ZMQ_SNDMORE : 0)) < 0)
        return errno == EAGAIN ? PD_EAGAIN : PD_EIO;
    return PD_OK;
}

Pdserve__V1__KvEnvelope *kvt_env_unpack(const void *data, size_t len) {
    if (!data || len == 0 || len > KVT_MAX_ENVELOPE_BYTES) return NULL;
    Pdserve__V1__KvEnvelope *env = pdserve__v1__kv_envelope__unpack(NULL, len, data);
    if (!env) return NULL;
    bool ok = false;
    switch (env->body_case) {
    case PDSERVE__V1__KV_ENVELOPE__BODY_HELLO: ok = env->hello != NULL; break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_HELLO_REPLY: ok = env->hello_reply != NULL; break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE: ok = env->reserve != NULL; break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE_REPLY: ok = env->reserve_reply != NULL; break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_DATA: ok = env->data != NULL; break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_CREDIT: ok = env->credit != NULL; break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_COMMIT: ok = env->commit != NULL; break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_DONE: ok = env->done != NULL; break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_CANCEL: ok = env->cancel != NULL; break;
    default: ok = false; break;
    }
    if (!ok) {
        pdserve__v1__kv_envelope__free_unpacked(env, NULL);
        return NULL;
    }
    return env;
}

static pd_status s_setopt_int(void *sock, int opt, int v, const char *name, char *err, size_t err_cap) {
    if (zmq_setsockopt(sock, opt, &v, sizeof v) == 0) return PD_OK;
    snprintf(err, err_cap, "zmq_setsockopt(%s=%d): %s", name, v, zmq_strerror(errno));
    return PD_EIO;
}

pd_status kvt_socket_setup(void *sock, int linger_ms, int heartbeat_ivl_ms, char *err, size_t err_cap) {
    pd_status st = PD_OK;
    /* bounded LINGER: closing never blocks shutdown on a dead peer */
    if (st == PD_OK) st = s_setopt_int(sock, ZMQ_LINGER, linger_ms, "ZMQ_LINGER", err, err_cap);
    /* ZMTP heartbeats: a peer that vanished without a FIN (power loss, partition) is noticed */
    if (heartbeat_ivl_ms > 0) {
        if (st == PD_OK) st = s_setopt_int(sock, ZMQ_HEARTBEAT_IVL, heartbeat_ivl_ms, "HEARTBEAT_IVL", err, err_cap);
        if (st == PD_OK)
            st = s_setopt_int(sock, ZMQ_HEARTBEAT_TIMEOUT, 3 * heartbeat_ivl_ms, "HEARTBEAT_TIMEOUT", err, err_cap);
        if (st == PD_OK)
            st = s_setopt_int(sock, ZMQ_HEARTBEAT_TTL, 3 * heartbeat_ivl_ms, "HEARTBEAT_TTL", err, err_cap);
    }
    /* finite but never reached by a well-behaved peer (credits bound the payload messages); on DEALER and
     * ROUTER a full pipe blocks (EAGAIN) instead of dropping */
    if (st == PD_OK) st = s_setopt_int(sock, ZMQ_SNDHWM, KVT_SNDHWM, "ZMQ_SNDHWM", err, err_cap);
    if (st == PD_OK) st = s_setopt_int(sock, ZMQ_RCVHWM, KVT_RCVHWM, "ZMQ_RCVHWM", err, err_cap);
    return st;
}

pd_status kvt_endpoint_check(const char *ep, char *err, size_t err_cap) {
    if (!ep || !*ep) {
        snprintf(err, err_cap, "endpoint missing");
        return PD_EINVAL;
    }
    if (strlen(ep) > 200) {
        snprintf(err, err_cap, "endpoint longer than 200 bytes");
        return PD_EINVAL;
    }
    if (strncmp(ep, "ipc://", 6) == 0 && ep[6]) return PD_OK;
    if (strncmp(ep, "inproc://", 9) == 0 && ep[9]) return PD_OK;
    if (strncmp(ep, "tcp://", 6) == 0) {
        const char *host = ep + 6, *colon = strrchr(host, ':');
        if (!colon || colon == host || !colon[1]) {
            snprintf(err, err_cap, "endpoint '%s': need tcp://HOST:PORT", ep);
            return PD_EINVAL;
        }
        if (host[0] == '*') {
            snprintf(err, err_cap, "endpoint '%s': name the interface to bind, not '*'", ep);
            return PD_EINVAL;
        }
        return PD_OK;
    }
    snprintf(err, err_cap, "endpoint '%s': only tcp://, ipc:// and inproc:// are supported", ep);
    return PD_EINVAL;
}
