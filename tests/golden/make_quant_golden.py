#!/usr/bin/env python3
"""make_quant_golden.py: writes tests/golden/quant/, the reference data for tests/unit/engine/test_eng_quant.c.

For each GGML type we dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) it writes
<type>.raw (quantized blocks, as stored in a GGUF file) and <type>.f32 (little-endian float32 values that
gguf-py's own dequantizer, gguf.quants.dequantize, produces from them). Sources, in order of preference:
real tensors of the default model as-is (Q8_0, Q4_1, F32), real weights quantized by gguf-py (F16, BF16,
Q4_0, Q5_0, Q5_1), and random blocks with finite scales where gguf-py cannot quantize (Q4_K, Q5_K, Q6_K).
Deterministic (fixed seeds): rerunning it must not change a byte. Run with the pinned packages of
requirements.txt, e.g. /opt/pdtools/bin/python tests/golden/make_quant_golden.py
"""
import argparse
import hashlib
import importlib.metadata
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 20240611
N_ELEMS = 2304  # 4 rows of 576 = 9 K-quant super-blocks: every type's block size divides it


def default_model_path():
    """Same lookup as pd_test_model_path() in tests/pd_test.h."""
    if os.environ.get("PDSERVE_MODEL"):
        return os.environ["PDSERVE_MODEL"]
    models = os.environ.get("PDSERVE_MODELS") or os.path.expanduser("~/.cache/pdserve/models")
    return os.path.join(models, MODEL_FILE)


def tensor(reader, name):
    for t in reader.tensors:
        if t.name == name:
            return t
    sys.exit(f"make_quant_golden: tensor {name} not in the model")


def raw_rows(reader, name, rows):
    """Bytes of whole rows of a tensor, exactly as stored in the file."""
    data = np.asarray(tensor(reader, name).data)
    return np.concatenate([data[r].reshape(-1).view(np.uint8) for r in rows])


def f16_bits(values):
    return np.asarray(values, dtype=np.uint16).view(np.uint8)


def random_blocks(rng, qtype, n_blocks, scale_fields):
    """Random bytes, with the f16 scale fields (byte offsets in each block) set to finite positive values."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in scale_fields:
        scales = rng.uniform(1e-4, 2e-2, size=n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def build(reader):
    rng = np.random.default_rng(SEED)
    # Real weights as float32: 4 rows of the Q8_0 token embedding, dequantized by gguf-py.
    emb_rows = [2, 3, 500, 20000]
    emb = gguf.quants.dequantize(raw_rows(reader, "token_embd.weight", emb_rows).reshape(4, -1), T.Q8_0)
    real = emb.reshape(-1).astype(np.float32)
    assert real.size == N_ELEMS

    out = {}
    # F32: four real norm-weight vectors, as stored.
    out["F32"] = (np.concatenate([raw_rows(reader, n, [slice(None)]) for n in
                                  ["output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight",
                                   "blk.29.attn_norm.weight"]]), "4 real F32 norm vectors of the model")
    # F16 / BF16: real weights converted, the last values replaced by edge cases (zeros, subnormals,
    # extremes, infinities, NaNs).
    f16 = real.astype(np.float16).view(np.uint16).copy()
    f16_edges = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0xFE00,
                 0x3C00, 0x3555, 0xC000, 0x0200]
    f16[-len(f16_edges):] = f16_edges
    out["F16"] = (f16_bits(f16), "token_embd rows 2,3,500,20000 as f16; last 16 = edge values")
    bf16 = gguf.quants.quantize(real, T.BF16).view(np.uint16).copy()
    bf16_edges = [0x0000, 0x8000, 0x0001, 0x807F, 0x0080, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x3F80,
                  0x3EAB, 0xC000, 0x0040, 0x4049]
    bf16[-len(bf16_edges):] = bf16_edges
    out["BF16"] = (f16_bits(bf16), "token_embd rows 2,3,500,20000 via gguf BF16 quantize; last 16 = edge values")
    # Q8_0 and Q4_1: real blocks of the model, as stored.
    out["Q8_0"] = (raw_rows(reader, "token_embd.weight", [0, 1, 1000, 49151]), "token_embd rows 0,1,1000,49151")
    q41 = np.concatenate([raw_rows(reader, "blk.0.attn_q.weight", [0, 1]),
                          raw_rows(reader, "blk.15.ffn_gate.weight", [7]),
                          raw_rows(reader, "blk.29.attn_output.weight", [575])])
    out["Q4_1"] = (q41, "blk.0.attn_q rows 0,1; blk.15.ffn_gate row 7; blk.29.attn_output row 575")
    # Q4_0, Q5_0, Q5_1: real weights quantized by gguf-py, then 8 random blocks for odd bit patterns.
    for qtype, scale_fields in [(T.Q4_0, [0]), (T.Q5_0, [0]), (T.Q5_1, [0, 2])]:
        q = gguf.quants.quantize(real.reshape(4, -1), qtype).reshape(-1)
        rnd = random_blocks(rng, qtype, 8, scale_fields)
        out[qtype.name] = (np.concatenate([q, rnd]), "token_embd rows 2,3,500,20000 quantized by gguf + 8 random blocks")
    # K-quants: gguf-py has no quantizer for these, so random blocks with finite d (and dmin).
    for qtype, scale_fields in [(T.Q4_K, [0, 2]), (T.Q5_K, [0, 2]), (T.Q6_K, [208])]:
        out[qtype.name] = (random_blocks(rng, qtype, N_ELEMS // 256, scale_fields), "9 random blocks, finite scales")
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--out", default=os.path.join(here, "quant"))
    args = ap.parse_args()

    reader = gguf.GGUFReader(args.model)
    os.makedirs(args.out, exist_ok=True)
    versions = f"gguf {importlib.metadata.version('gguf')}, numpy {np.__version__}"
    manifest = [f"# written by tests/golden/make_quant_golden.py ({versions})",
                "# stem type n_elems sha256(raw)[:16] source"]
    for name, (raw, source) in build(reader).items():
        qtype = T[name]
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        n_elems = raw.size // block_bytes * block_elems
        assert raw.size % block_bytes == 0
        values = gguf.quants.dequantize(raw, qtype).reshape(-1).astype("<f4", copy=False)
        assert values.size == n_elems
        stem = os.path.join(args.out, name.lower())
        raw.tofile(stem + ".raw")
        values.tofile(stem + ".f32")
        manifest.append(f"{name.lower()} {name} {n_elems} {hashlib.sha256(raw.tobytes()).hexdigest()[:16]} {source}")
    with open(os.path.join(args.out, "manifest.txt"), "w") as f:
        f.write("\n".join(manifest) + "\n")
    print(f"make_quant_golden: wrote {len(manifest) - 2} types to {args.out}")


if __name__ == "__main__":
    main()
