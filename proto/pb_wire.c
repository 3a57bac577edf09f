/* pb_wire.c: size-capped unpacking and packing into caller-owned buffers, over protobuf-c. Checks structure
 * only (the cap, well-formed wire data); field values are the validators' job. */
#include "pb_int.h"

#include <stdlib.h>

static void s_free_bytes(ProtobufCAllocator *alloc, void *p) {
    if (alloc)
        alloc->free(alloc->allocator_data, p);
    else
        free(p);
}

/* protobuf-c keeps unknown fields and re-emits them on pack; we drop them so that a message we forward
 * carries only fields we validated. Recursion depth is bounded by the schema (no recursive types). */
static void s_strip_unknown(ProtobufCMessage *m, ProtobufCAllocator *alloc) {
    for (unsigned i = 0; i < m->n_unknown_fields; i++) s_free_bytes(alloc, m->unknown_fields[i].data);
    if (m->unknown_fields) s_free_bytes(alloc, m->unknown_fields);
    m->unknown_fields = NULL;
    m->n_unknown_fields = 0;

    const ProtobufCMessageDescriptor *d = m->descriptor;
    char *base = (char *)m;
    for (unsigned f = 0; f < d->n_fields; f++) {
        const ProtobufCFieldDescriptor *fd = &d->fields[f];
        if (fd->type != PROTOBUF_C_TYPE_MESSAGE) continue;
        if ((fd->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) && *(const uint32_t *)(base + fd->quantifier_offset) != fd->id)
            continue;
        if (fd->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + fd->quantifier_offset);
            ProtobufCMessage **items = *(ProtobufCMessage ***)(base + fd->offset);
            for (size_t k = 0; k < n; k++)
                if (items[k]) s_strip_unknown(items[k], alloc);
        } else {
            ProtobufCMessage *sub = *(ProtobufCMessage **)(base + fd->offset);
            if (sub) s_strip_unknown(sub, alloc);
        }
    }
}

static size_t s_default_cap(const ProtobufCMessageDescriptor *desc) {
    if (desc == &pdserve__v1__generate_request__descriptor) return PB_CAP_GENERATE_REQUEST_BYTES;
    if (desc == &pdserve__v1__response_chunk__descriptor) return PB_CAP_RESPONSE_CHUNK_BYTES;
    if (desc == &pdserve__v1__kv_envelope__descriptor) return PB_CAP_KV_ENVELOPE_BYTES;
    return PB_CAP_CONTROL_BYTES;
}

pd_status pb_unpack(const ProtobufCMessageDescriptor *desc, const uint8_t *buf, size_t len, size_t cap,
                    ProtobufCAllocator *alloc, ProtobufCMessage **out, char *err, size_t err_cap) {
    if (!desc || !out || (!buf && len)) return pb_fail(PD_EINVAL, err, err_cap, "pb_unpack: NULL argument");
    *out = NULL;
    if (!cap) cap = s_default_cap(desc);
    if (len > cap)
        return pb_fail(PD_EPROTO, err, err_cap, "%s: message of %zu bytes is over the cap of %zu bytes", desc->name,
                       len, cap);
    /* protobuf-c reads buf only when len > 0, but give it a valid pointer anyway */
    static const uint8_t empty[1];
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, alloc, len, buf ? buf : empty);
    if (!m)
        return pb_fail(PD_EPROTO, err, err_cap, "%s: cannot unpack %zu bytes (truncated, malformed, or out of memory)",
                       desc->name, len);
    s_strip_unknown(m, alloc);
    *out = m;
    return PD_OK;
}

void pb_free(ProtobufCMessage **msg, ProtobufCAllocator *alloc) {
    if (!msg || !*msg) return;
    protobuf_c_message_free_unpacked(*msg, alloc);
    *msg = NULL;
}

/* The typed wrappers: pb_unpack with the generated type's descriptor, and a typed free. */
#define PB_WIRE_TYPED(name, type, descriptor)                                                                     \
    pd_status pb_unpack_##name(const uint8_t *buf, size_t len, size_t cap, ProtobufCAllocator *alloc, type **out, \
                               char *err, size_t err_cap) {                                                       \
        ProtobufCMessage *m = NULL;                                                                               \
        if (!out) return pb_fail(PD_EINVAL, err, err_cap, "pb_unpack_" #name ": NULL out");                       \
        pd_status st = pb_unpack(&descriptor, buf, len, cap, alloc, &m, err, err_cap);                            \
        *out = (type *)m;                                                                                         \
        return st;                                                                                                \
    }                                                                                                             \
    void pb_free_##name(type **msg, ProtobufCAllocator *alloc) {                                                  \
        if (!msg || !*msg) return;                                                                                \
        protobuf_c_message_free_unpacked(&(*msg)->base, alloc);                                                   \
        *msg = NULL;                                                                                              \
    }

PB_WIRE_TYPED(generate_request, Pdserve__V1__GenerateRequest, pdserve__v1__generate_request__descriptor)
PB_WIRE_TYPED(response_chunk, Pdserve__V1__ResponseChunk, pdserve__v1__response_chunk__descriptor)
PB_WIRE_TYPED(kv_envelope, Pdserve__V1__KvEnvelope, pdserve__v1__kv_envelope__descriptor)
PB_WIRE_TYPED(worker_register, Pdserve__V1__WorkerRegister, pdserve__v1__worker_register__descriptor)
PB_WIRE_TYPED(heartbeat, Pdserve__V1__Heartbeat, pdserve__v1__heartbeat__descriptor)
PB_WIRE_TYPED(cancel, Pdserve__V1__Cancel, pdserve__v1__cancel__descriptor)

size_t pb_packed_size(const ProtobufCMessage *msg) {
    return protobuf_c_message_get_packed_size(msg);
}

int64_t pb_pack(const ProtobufCMessage *msg, uint8_t *dst, size_t cap) {
    size_t n = protobuf_c_message_get_packed_size(msg);
    if (n > cap || (n && !dst)) return PD_ERANGE;
    size_t written = n ? protobuf_c_message_pack(msg, dst) : 0;
    PD_ASSERT(written == n);
    return (int64_t)written;
}
