"""test_make_random_gguf.py: deploy/make_random_gguf.py (random-weight GGUFs in a Llama layout, for GPU speed
benchmarks) checked against expectations computed here from the shape, not from the tool's output:

- a tiny custom shape in every matrix type our CPU engine loads (bf16, f16, f32, q8_0, q4_1), re-read with
  GGUFReader: every tensor's name, order, shape (GGUF ne order), type and byte size; norms F32 and all 1.0;
  matrices N(0, 0.02^2) after dequantization; the llama.* hyperparameters; a vocabulary of exactly `vocab`
  tokens (256 byte tokens in GPT-2's alphabet first, unique strings, every merge naming existing tokens,
  Llama-3's specials last with bos / eos pointing at them);
- `pdctl generate` runs on one of them (exit 0, 4 tokens; the text is gibberish);
- the seed alone fixes the bytes (any --jobs), another seed changes them;
- --dry-run (writes nothing) of llama-3.2-1b and llama-3.1-8b: the tensor table equals the layout computed
  here and the parameter counts are HF's 1.236e9 (tied) and 8.030e9 within 0.5%;
- bad arguments exit 2 and leave no file.

Env: PDCTL_BIN (set by tests/CMakeLists.txt) or PD_BUILD_DIR (default build/) for pdctl.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import gguf

from cluster import ROOT, bin_path, run_tests

TOOL = os.path.join(ROOT, "deploy", "make_random_gguf.py")
TINY = dict(dim=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=1024)
DTYPES = {"bf16": gguf.GGMLQuantizationType.BF16, "f16": gguf.GGMLQuantizationType.F16,
          "f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
          "q4_1": gguf.GGMLQuantizationType.Q4_1}
TMP = tempfile.mkdtemp(prefix="pd_make_random_gguf_")


def tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


def tiny_args(out, dtype, **over):
    s = dict(TINY, **over)
    return [out, "--shape", "custom", "--dtype", dtype, "--dim", str(s["dim"]), "--layers", str(s["layers"]),
            "--heads", str(s["heads"]), "--kv-heads", str(s["kv_heads"]), "--ffn", str(s["ffn"]),
            "--vocab", str(s["vocab"])]


def tiny_path(dtype):
    return os.path.join(TMP, f"tiny_{dtype}.gguf")


def expected_layout(dim, layers, heads, kv_heads, ffn, vocab, tied, qtype):
    """[(name, ne, type)] of a llama GGUF as llama.cpp names it; ne[0] is a matrix's input dimension."""
    f32 = gguf.GGMLQuantizationType.F32
    hd = dim // heads
    out = [("token_embd.weight", [dim, vocab], qtype)]
    for i in range(layers):
        out += [(f"blk.{i}.attn_norm.weight", [dim], f32), (f"blk.{i}.attn_q.weight", [dim, heads * hd], qtype),
                (f"blk.{i}.attn_k.weight", [dim, kv_heads * hd], qtype),
                (f"blk.{i}.attn_v.weight", [dim, kv_heads * hd], qtype),
                (f"blk.{i}.attn_output.weight", [heads * hd, dim], qtype), (f"blk.{i}.ffn_norm.weight", [dim], f32),
                (f"blk.{i}.ffn_gate.weight", [dim, ffn], qtype), (f"blk.{i}.ffn_up.weight", [dim, ffn], qtype),
                (f"blk.{i}.ffn_down.weight", [ffn, dim], qtype)]
    out.append(("output_norm.weight", [dim], f32))
    if not tied:
        out.append(("output.weight", [dim, vocab], qtype))
    return out


def n_bytes(ne, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(ne)) // block * size


def gpt2_byte_alphabet():
    """GPT-2's bytes_to_unicode, written out again here."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def field(r, key):
    f = r.fields[key]
    return f.contents()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_write_tiny():
    for dtype in DTYPES:
        out = tiny_path(dtype)
        r = tool(*tiny_args(out, dtype))
        assert r.returncode == 0, (dtype, r.stderr)
        line = r.stdout.strip()
        assert "\n" not in line and line.startswith(out + ":"), line
        for part in ("shape=custom", f"dtype={dtype}", f"bytes={os.path.getsize(out)}", "seconds="):
            assert part in line, (part, line)
        want_params = sum(int(np.prod(ne)) for _, ne, _ in expected_layout(**TINY, tied=True, qtype=DTYPES[dtype]))
        assert f"params={want_params} " in line, (want_params, line)


def test_tensors():
    for dtype, qtype in DTYPES.items():
        r = gguf.GGUFReader(tiny_path(dtype))
        want = expected_layout(**TINY, tied=True, qtype=qtype)
        assert [t.name for t in r.tensors] == [n for n, _, _ in want], dtype
        for t, (name, ne, ty) in zip(r.tensors, want):
            assert [int(x) for x in t.shape] == ne, (dtype, name, t.shape, ne)
            assert t.tensor_type == ty, (dtype, name, t.tensor_type, ty)
            assert int(t.n_bytes) == n_bytes(ne, ty), (dtype, name)
            assert (t.data_offset - r.data_offset) % r.alignment == 0, (dtype, name)
            vals = gguf.quants.dequantize(np.asarray(t.data), ty).astype(np.float64).reshape(-1)
            assert vals.size == int(np.prod(ne)), (dtype, name, vals.size)
            if len(ne) == 1:
                assert np.all(vals == 1.0), (dtype, name)
            else:  # N(0, 0.02^2); q4_1's 16 levels per block widen it a little
                assert abs(vals.mean()) < 0.002 and 0.018 < vals.std() < 0.023, (dtype, name, vals.mean(), vals.std())
        del r


def test_metadata():
    r = gguf.GGUFReader(tiny_path("q8_0"))
    hd = TINY["dim"] // TINY["heads"]
    want = {"general.architecture": "llama", "llama.embedding_length": TINY["dim"],
            "llama.block_count": TINY["layers"], "llama.feed_forward_length": TINY["ffn"],
            "llama.attention.head_count": TINY["heads"], "llama.attention.head_count_kv": TINY["kv_heads"],
            "llama.rope.dimension_count": hd, "llama.vocab_size": TINY["vocab"], "llama.context_length": 8192,
            "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0), "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.add_bos_token": True}
    for key, val in want.items():
        assert field(r, key) == val, (key, field(r, key), val)
    assert abs(field(r, "llama.rope.freq_base") - 500000.0) < 1e-3
    assert abs(field(r, "llama.attention.layer_norm_rms_epsilon") - 1e-5) < 1e-9
    assert "llama.rope.scaling.type" not in r.fields and "tokenizer.chat_template" not in r.fields

    tokens, types_ = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    vocab = TINY["vocab"]
    assert len(tokens) == vocab and len(types_) == vocab and len(set(tokens)) == vocab
    assert tokens[:256] == gpt2_byte_alphabet()
    specials = [i for i, t in enumerate(types_) if t == int(gguf.TokenType.CONTROL)]
    assert specials == list(range(vocab - len(specials), vocab)) and len(specials) >= 3, specials
    assert all(re.fullmatch(r"<\|[a-z_0-9]+\|>", tokens[i]) for i in specials)
    assert all(t == int(gguf.TokenType.NORMAL) for t in types_[: vocab - len(specials)])
    bos, eos = field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")
    assert tokens[bos] == "<|begin_of_text|>" and tokens[eos] == "<|end_of_text|>", (bos, eos)
    assert "<|eot_id|>" in tokens
    # BPE consistency: every merge joins two tokens into a third, and every merged token comes from one
    assert len(merges) == vocab - 256 - len(specials)
    vset = set(tokens)
    made = set()
    for m in merges:
        a, b = m.split(" ")
        assert a in vset and b in vset and a + b in vset, m
        made.add(a + b)
    assert made == set(tokens[256: vocab - len(specials)])
    del r


def test_generate():
    r = subprocess.run([bin_path("pdctl"), "generate", "--model", tiny_path("bf16"), "--prompt", "hi",
                        "--max-tokens", "4", "--temperature", "0", "--ignore-eos", "--threads", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"generated 4 tokens", r.stderr), r.stderr


def test_seed():
    # vocab 32768 x dim 256 is two generator chunks for token_embd: the chunking must not depend on --jobs
    args = dict(layers=1, vocab=32768)
    a, b, c = (os.path.join(TMP, f"seed_{x}.gguf") for x in "abc")
    for out, extra in ((a, ["--seed", "7", "--jobs", "1"]), (b, ["--seed", "7", "--jobs", "3"]),
                       (c, ["--seed", "8", "--jobs", "2"])):
        r = tool(*tiny_args(out, "bf16", **args), *extra)
        assert r.returncode == 0, r.stderr
    assert sha256(a) == sha256(b), "same seed, different bytes"
    assert sha256(a) != sha256(c), "different seeds, same bytes"
    for p in (a, b, c):
        os.unlink(p)


def test_dry_run_real_shapes():
    cases = {"llama-3.2-1b": (dict(dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256, tied=True),
                              1.236e9),
             "llama-3.1-8b": (dict(dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256, tied=False),
                              8.030e9)}
    bf16 = gguf.GGMLQuantizationType.BF16
    for shape, (s, params_hf) in cases.items():
        out = os.path.join(TMP, f"{shape}.gguf")
        r = tool(out, "--shape", shape, "--dry-run")
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(out), "--dry-run wrote a file"
        want = expected_layout(**s, qtype=bf16)
        rows = [ln.split() for ln in r.stdout.splitlines()[1:] if not ln.startswith("total:")]
        got = [(x[0], [int(v) for v in re.findall(r"\d+", " ".join(x[1:-3]))], x[-3], int(x[-2]), int(x[-1]))
               for x in rows]
        assert [g[0] for g in got] == [w[0] for w in want], shape
        for g, (name, ne, ty) in zip(got, want):
            assert g[1:] == (ne, ty.name, int(np.prod(ne)), n_bytes(ne, ty)), (shape, g, ne, ty.name)
        params = sum(int(np.prod(ne)) for _, ne, _ in want)
        total = re.search(r"^total: .*tensors=(\d+) params=(\d+) .*tensor_bytes=(\d+)", r.stdout, re.M)
        assert total, r.stdout[-400:]
        assert int(total.group(1)) == len(want) and int(total.group(2)) == params
        assert int(total.group(3)) == sum(n_bytes(ne, ty) for _, ne, ty in want)
        assert abs(params - params_hf) / params_hf < 0.005, (shape, params)
        print(f"     {shape}: {params} params ({params / 1e9:.3f}e9), {int(total.group(3)) / 2**30:.2f} GiB in bf16",
              flush=True)


def test_bad_args():
    out = os.path.join(TMP, "bad.gguf")
    cases = [[out, "--shape", "custom", "--layers", "2"],                     # no --dim, --heads, ...
             tiny_args(out, "q8_0", dim=48, heads=4, kv_heads=4, ffn=64),     # rows of 48: not q8_0 blocks
             tiny_args(out, "bf16", vocab=100),                               # smaller than bytes + specials
             tiny_args(out, "bf16", heads=3, kv_heads=3)]                     # 256 / 3
    for args in cases:
        r = tool(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert r.stderr.startswith("make_random_gguf:") or "usage:" in r.stderr, r.stderr
        assert not os.path.exists(out), args


def main():
    try:
        return run_tests([test_write_tiny, test_tensors, test_metadata, test_generate, test_seed,
                          test_dry_run_real_shapes, test_bad_args])
    finally:
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
