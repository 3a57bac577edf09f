#!/usr/bin/env python3
"""make_pb_golden.py: messages of proto/pdserve_*.proto serialized by the official protobuf implementation
(the `protobuf` package, upb backend), for tests/unit/proto/test_pb_interop.c. The .proto files are compiled
to Python in a temporary folder with grpc_tools.protoc (no generated code is kept).

Writes into --out (default tests/golden/pb):
  NAME.bin   the message as SerializeToString(deterministic=True) gives it
  NAME.txt   every field that is set, one line each, in field-number order (format below); the C test
             prints its unpacked message the same way and compares the text
  index.txt  '#' comment lines, then one line per case: NAME FULL_TYPE_NAME FLAGS
             FLAGS is '-' or 'pack-differs' (protobuf-c packs that message differently; see the comment
             lines and tests/golden/README.md)

NAME.txt lines:  PATH = VALUE  for a scalar,  PATH {}  for a present (sub)message or repeated message element.
PATH is field names joined by '.', repeated elements as name[i]. A scalar is listed when it is not the
proto3 default (or, in a oneof, when it is the chosen member). VALUE: integers and enums in decimal, bools as
1, floats as '%.9g (0xBITS)' of the float32, strings and bytes as a double-quoted literal in which bytes
0x20..0x7e other than '"' and '\\' stand for themselves and every other byte is \\xNN.

Deterministic: a rerun with the pinned packages (requirements.txt) gives identical files.
    /opt/pdtools/bin/python tests/golden/make_pb_golden.py [--out DIR]
"""
import argparse
import importlib
import importlib.metadata
import os
import shutil
import struct
import sys
import tempfile

import google.protobuf
from google.protobuf import descriptor as _descriptor
from google.protobuf.internal import api_implementation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTOS = ["pdserve_api.proto", "pdserve_control.proto", "pdserve_kv.proto"]


def compile_protos(proto_dir, tmp):
    from grpc_tools import protoc

    args = ["protoc", "-I" + proto_dir, "--python_out=" + tmp] + [os.path.join(proto_dir, p) for p in PROTOS]
    if protoc.main(args) != 0:
        sys.exit("make_pb_golden: protoc failed")
    sys.path.insert(0, tmp)
    return {p[:-6]: importlib.import_module(p[:-6] + "_pb2") for p in PROTOS}


def quote(b):
    out = ['"']
    for c in b:
        out.append(chr(c) if 0x20 <= c < 0x7F and c not in (0x22, 0x5C) else "\\x%02x" % c)
    out.append('"')
    return "".join(out)


def scalar(fd, v):
    T = _descriptor.FieldDescriptor
    if fd.type == T.TYPE_FLOAT:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        return "%.9g (0x%08x)" % (v, bits)
    if fd.type == T.TYPE_DOUBLE:
        bits = struct.unpack("<Q", struct.pack("<d", v))[0]
        return "%.17g (0x%016x)" % (v, bits)
    if fd.type == T.TYPE_STRING:
        return quote(v.encode("utf-8"))
    if fd.type == T.TYPE_BYTES:
        return quote(v)
    if fd.type == T.TYPE_BOOL:
        return "1" if v else "0"
    return "%d" % v


def dump(msg, prefix, out):
    T = _descriptor.FieldDescriptor
    for fd in sorted(msg.DESCRIPTOR.fields, key=lambda f: f.number):
        path = prefix + fd.name
        v = getattr(msg, fd.name)
        if fd.is_repeated:
            for i, e in enumerate(v):
                if fd.type == T.TYPE_MESSAGE:
                    out.append("%s[%d] {}" % (path, i))
                    dump(e, "%s[%d]." % (path, i), out)
                else:
                    out.append("%s[%d] = %s" % (path, i, scalar(fd, e)))
        elif fd.type == T.TYPE_MESSAGE:
            if msg.HasField(fd.name):
                out.append(path + " {}")
                dump(v, path + ".", out)
        else:
            oneof = fd.containing_oneof
            present = msg.WhichOneof(oneof.name) == fd.name if oneof else v != fd.default_value
            if present:
                out.append("%s = %s" % (path, scalar(fd, v)))


def cases(m):
    api, ctl, kv = m["pdserve_api"], m["pdserve_control"], m["pdserve_kv"]
    fp = ctl.Fingerprint(protocol_version=ctl.PROTOCOL_VERSION_CURRENT, model_id="SmolLM2-135M-Instruct",
                         weights_hash=0x0123456789ABCDEF, tokenizer_hash=0xFEDCBA9876543210, kv_dtype=ctl.KV_DTYPE_BF16,
                         block_size=16, n_layers=30, n_kv_heads=3, head_dim=64, rope_theta=100000.0, rope_dim=64)
    fp_f32 = ctl.Fingerprint()
    fp_f32.CopyFrom(fp)
    fp_f32.kv_dtype = ctl.KV_DTYPE_F32

    out = []
    # client API
    r = api.GenerateRequest(request_id=0xFEDCBA9876543210, model="SmolLM2-135M-Instruct", max_tokens=128,
                            timeout_ms=30000, stream=True, ignore_eos=True)
    for role, content in [("system", "You are a helpful assistant."),
                          ("user", "Grüße! Translate «hello» to 日本語 🙂\nThanks."),
                          ("assistant", "こんにちは"),
                          ("user", "And in Ελληνικά?\t\"quoted\" \\ backslash")]:
        r.chat.messages.add(role=role, content=content)
    r.sampling.CopyFrom(api.SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                           presence_penalty=-0.5, frequency_penalty=0.25, seed=2**64 - 1,
                                           has_seed=True, logprobs=5))
    r.stop.extend(["\n\n", "</s>", "。", "🛑"])
    out.append(("generate_chat", r, "-"))

    r = api.GenerateRequest(request_id=1, max_tokens=1)
    r.token_ids.ids.extend([1, 0, 9690, 49151, 216, 2, 300, 127, 128, 16383, 16384])
    r.sampling.SetInParent()  # present but empty: the C side must see a non-NULL, all-default SamplingParams
    out.append(("generate_tokens", r, "-"))

    text = ("Once upon a time, in a land far away — ein Märchen, 一个童话, قصة خيالية — there lived a "
            "tokenizer that had to cope with every script at once. 🧙‍♂️🏰 The end.")
    r = api.GenerateRequest(request_id=2**32 + 7, text=text, max_tokens=4096)
    r.sampling.top_p = 1.0
    r.sampling.logprobs = 20
    out.append(("generate_text", r, "-"))

    c = api.ResponseChunk(request_id=0xFEDCBA9876543210, text="Hello, 世界", finish_reason=api.FINISH_STOP, seed=12345)
    c.token_ids.extend([9690, 28, 2])
    lp = c.logprobs.add(token=9690, logprob=-0.125)
    lp.top.add(token=9690, logprob=-0.125, text=b"Hello")
    lp.top.add(token=28, logprob=-2.5, text=b"\xe4\xb8")  # a partial UTF-8 sequence: bytes, not string
    lp.top.add(token=0, logprob=float("-inf"), text=b"")
    lp = c.logprobs.add(token=28, logprob=-3.0e-7)
    lp.top.add(token=28, logprob=-3.0e-7, text=b",")
    c.logprobs.add(token=2, logprob=-1.0)
    c.usage.CopyFrom(api.Usage(prompt_tokens=37, completion_tokens=3, cached_prompt_tokens=16))
    out.append(("response_chunk", c, "-"))

    c = api.ResponseChunk(request_id=99, finish_reason=api.FINISH_ERROR)
    c.error.CopyFrom(api.Error(code=api.ERR_RESOURCE_EXHAUSTED, message="queue full: 64 requests waiting, retry later"))
    out.append(("response_error", c, "-"))

    # KV hand-off: one envelope per body kind
    env = kv.KvEnvelope
    out.append(("kv_hello", env(hello=kv.KvHello(fingerprint=fp, sender_id="prefill-0@host-a",
                                                 shm_name="/pdserve-kv-prefill-0", shm_bytes=3 << 30)), "-"))
    out.append(("kv_hello_reply", env(hello_reply=kv.KvHelloReply(error=api.Error(), fingerprint=fp_f32,
                                                                  max_message_bytes=64 << 20, frame_runs=True,
                                                                  shm_mapped=True)), "-"))
    out.append(("kv_reserve", env(reserve=kv.KvReserve(request_id=0xFEDCBA9876543210, transfer_id=42, epoch=1,
                                                       n_tokens=37, n_blocks=3, timeout_ms=10000)), "-"))
    out.append(("kv_reserve_reply", env(reserve_reply=kv.KvReserveReply(
        transfer_id=42, epoch=1, error=api.Error(code=api.ERR_RESOURCE_EXHAUSTED,
                                                 message="no free KV blocks: need 3, have 1"))), "-"))
    data = kv.KvData(transfer_id=42, epoch=1, seq=5, first_layer=2, n_layers=2, first_block=1, n_blocks=2,
                     dtype=ctl.KV_DTYPE_BF16, block_size=16, n_kv_heads=3, head_dim=64)
    data.checksums.extend([0, 1, 2**64 - 1, 2**63, 0x0123456789ABCDEF, 0xFEDCBA9876543210, 0xDEADBEEF, 2**32])
    out.append(("kv_data", env(data=data), "-"))
    # frame runs of 3, 1 and 2 blocks over one layer (2 x 1 x 3 frames), read from the sender's shared pool
    data = kv.KvData(transfer_id=43, epoch=3, n_layers=1, n_blocks=6, dtype=ctl.KV_DTYPE_F32, block_size=16,
                     n_kv_heads=3, head_dim=64)
    data.checksums.extend([0x1111111111111111 * k for k in range(1, 7)])
    data.frame_blocks.extend([3, 1, 2])
    data.shm_offsets.extend([0, 12288 * 3, 2**33, 2**33 + 12288, 2**39 - 12288 * 4, 2**39 - 12288 * 2])
    out.append(("kv_data_runs", env(data=data), "-"))
    out.append(("kv_credit", env(credit=kv.KvCredit(transfer_id=42, epoch=1, bytes=12288)), "-"))
    out.append(("kv_commit", env(commit=kv.KvCommit(transfer_id=42, epoch=1, n_frames=3, first_token=9690)), "-"))
    out.append(("kv_done", env(done=kv.KvDone(transfer_id=42, epoch=1, error=api.Error(
        code=api.ERR_PROTOCOL, message="checksum mismatch in frame 5"))), "-"))
    out.append(("kv_cancel", env(cancel=kv.KvCancel(transfer_id=42, epoch=2, reason=api.Error(
        code=api.ERR_DEADLINE_EXCEEDED, message="deadline passed"))), "-"))

    # control plane
    out.append(("heartbeat", ctl.Heartbeat(worker_id="decode-1", seq=2**40 + 1, role=ctl.ROLE_DECODE, queue_depth=3,
                                           running_seqs=17, free_kv_blocks=1000, total_kv_blocks=4096,
                                           kv_bytes_sent=1, kv_bytes_received=2**33 + 5), "-"))
    out.append(("worker_register", ctl.WorkerRegister(worker_id="decode-1", role=ctl.ROLE_DECODE,
                                                      control_endpoint="tcp://127.0.0.1:5601",
                                                      kv_endpoint="tcp://127.0.0.1:5602", fingerprint=fp,
                                                      backend="cpu"), "-"))
    out.append(("cancel", ctl.Cancel(request_id=0xFEDCBA9876543210, reason=api.ERR_CANCELLED), "-"))

    # Encoding edge cases. -0.0 is sent by upb (it checks the bits) but dropped by protobuf-c, which treats it
    # as the default 0: same value after decoding, different bytes. A negative int32 is a 10-byte varint.
    out.append(("sampling_edge", api.SamplingParams(temperature=-0.0, top_k=-1, top_p=0.5, seed=2**63), "pack-differs"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden", "pb"))
    ap.add_argument("--proto-dir", default=os.path.join(ROOT, "proto"))
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="pb_golden_")
    try:
        mods = compile_protos(a.proto_dir, tmp)
        all_cases = cases(mods)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    os.makedirs(a.out, exist_ok=True)
    index = ["# pdserve protobuf golden messages (tests/golden/make_pb_golden.py)",
             "# protobuf %s (%s backend), grpcio-tools %s" % (google.protobuf.__version__, api_implementation.Type(),
                                                                importlib.metadata.version("grpcio-tools")),
             "# NAME FULL_TYPE_NAME FLAGS (pack-differs: protobuf-c omits a float -0.0 that upb sends)"]
    for name, msg, flags in all_cases:
        data = msg.SerializeToString(deterministic=True)
        back = type(msg)()
        back.ParseFromString(data)
        assert back == msg, name
        lines = []
        dump(msg, "", lines)
        with open(os.path.join(a.out, name + ".bin"), "wb") as f:
            f.write(data)
        with open(os.path.join(a.out, name + ".txt"), "w", encoding="ascii", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        index.append("%s %s %s" % (name, msg.DESCRIPTOR.full_name, flags))
        print("%-18s %-28s %4d bytes, %3d fields" % (name, msg.DESCRIPTOR.full_name, len(data), len(lines)))
    with open(os.path.join(a.out, "index.txt"), "w", encoding="ascii", newline="\n") as f:
        f.write("\n".join(index) + "\n")


if __name__ == "__main__":
    main()
