#!/usr/bin/env python3
"""make_random_gguf.py: writes a GGUF with random weights in the exact tensor layout of a Llama model, for speed
benchmarks (GPU throughput does not depend on the values; no package ships Llama-3.2-1B or Llama-3.1-8B).

    deploy/make_random_gguf.py OUT.gguf --shape llama-3.2-1b|llama-3.1-8b|custom
        [--dim N --layers N --heads N --kv-heads N --ffn N --vocab N --ctx N --rope-theta X]
        [--dtype bf16|f16|f32|q8_0|q4_1] [--seed N] [--tied|--untied] [--jobs N] [--dry-run]

Shapes (public HF config.json of each model):
  llama-3.2-1b  hidden 2048, 16 layers, 32 heads / 8 kv heads (head_dim 64), ffn 8192, vocab 128256,
                rope_theta 500000, rms eps 1e-5, tied embeddings (no output.weight)    1.236e9 params
  llama-3.1-8b  hidden 4096, 32 layers, 32 heads / 8 kv heads (head_dim 128), ffn 14336, vocab 128256,
                rope_theta 500000, rms eps 1e-5, untied (output.weight)                8.030e9 params
  custom        --dim --layers --heads --ffn --vocab required (--kv-heads defaults to --heads)
Flags given with a named shape override its values (general.name then says "modified"). Deliberate
differences from the real files: context_length is 8192, not 131072 (--ctx to change), and neither the
"llama3" RoPE frequency scaling nor llama.cpp's rope_freqs.weight tensor is written: our engine does not
implement that scaling and rejects rope.scaling.type, and at benchmark lengths it changes no cost.

Weights: N(0, 0.02^2), norm weights 1.0. Norms (1-d) are F32 as in llama.cpp's files; every matrix, the
embedding table included, has --dtype (default bf16: upper 16 bits of the float32, i.e. truncated). Each
chunk of rows draws from numpy's default_rng([seed, tensor index, chunk index]), so a seed gives the same
bytes on any machine and with any --jobs. Tensors are generated and written chunk by chunk (a few tens of MiB
per worker thread), so memory stays well under 2 GB whatever the shape; --jobs threads (default: every core)
generate in parallel (numpy drops the GIL while it fills arrays).

Tokenizer: a synthetic byte-level BPE vocabulary ('gpt2' model, 'gpt-2' pre-tokenizer) of exactly vocab
tokens, so the file loads in our engine (and llama.cpp) and the embedding/output rows equal the vocabulary:
ids 0..255 are the 256 byte tokens (GPT-2 byte-to-unicode alphabet), then merged tokens built by appending
one character of a 62-letter alphabet to an existing token ("h i" -> "hi", "Ġh i" -> "Ġhi", ...), each
merge naming two tokens that exist and a result that does; the last 256 ids (16 when vocab < 768) are
Llama-3's special tokens, so a 128256 vocabulary puts <|begin_of_text|> at 128000, <|end_of_text|> (eos) at
128001 and <|eot_id|> at 128009 as the real one does. Reusing SmolLM2's lists was not an option: its 49152
tokens exceed the tiny test shapes. No chat template (our engine renders only ChatML): use completions.

--dry-run prints the tensor table (GGUF ne order) and the totals, and writes nothing.

Needs only numpy and the `gguf` package (pure Python; pinned 0.19.0 as in tests/integration/requirements.txt).
Here: PY=$(scripts/pyenv.sh | tail -n 1); $PY deploy/make_random_gguf.py /tmp/r.gguf --shape llama-3.2-1b
On the lent GPU machine (python3 + numpy, no pip access): run scripts/fetch_pywheels.sh here first (it
does `pip download gguf==0.19.0 --no-deps` into the git-ignored .whl/), carry .whl/ along, and run
`python3 deploy/make_random_gguf.py ...` there: when `import gguf` fails this script imports it straight from
.whl/gguf-*.whl (a wheel is a zip: zipimport), or set PYTHONPATH=.whl/gguf-0.19.0-py3-none-any.whl yourself.
gguf's metadata module imports PyYAML, which this script never uses: a stub stands in when it is missing.

Exit codes: 0 written (or dry run), 1 could not write (no partial file is left), 2 bad arguments.
"""
import argparse
import collections
import glob
import os
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import yaml  # noqa: F401  (only so that gguf's own import of it below succeeds)
except ImportError:
    sys.modules["yaml"] = types.ModuleType("yaml")
try:
    import gguf
except ImportError:
    _wheels = sorted(glob.glob(os.path.join(_ROOT, ".whl", "gguf-*.whl")))
    if not _wheels:
        sys.exit("make_random_gguf: no gguf package and no .whl/gguf-*.whl (run scripts/fetch_pywheels.sh)")
    sys.path.insert(0, _wheels[-1])
    import gguf

Q = gguf.GGMLQuantizationType

SHAPES = {
    "llama-3.2-1b": dict(name="Llama-3.2-1B", dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256,
                         ctx=8192, rope_theta=500000.0, tied=True),
    "llama-3.1-8b": dict(name="Llama-3.1-8B", dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256,
                         ctx=8192, rope_theta=500000.0, tied=False),
}
# custom: what the named shapes share, where a flag does not say otherwise
CUSTOM_DEFAULTS = dict(name="custom", ctx=8192, rope_theta=500000.0, tied=True)
RMS_EPS = 1e-5
INIT_STD = 0.02

DTYPES = {  # --dtype -> (ggml type, general.file_type)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}

CHUNK_ELEMS = 1 << 22  # elements per generated chunk: 16 MiB of float32 per worker thread in flight


class UsageError(Exception):
    """A bad argument (exit 2), as opposed to a file this tool cannot write (exit 1)."""


# ---- tokenizer ----

def _byte_to_unicode():
    """GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 for U+0100.. in
    byte order (as s_byte_to_cp in engine/eng_tok.c)."""
    printable = [b for b in range(256) if ord("!") <= b <= ord("~") or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


def _llama3_specials():
    """Llama-3.1's 256 special tokens, ids 128000.. in the real vocabulary."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(named) + 3)]


def build_vocab(vocab):
    """(tokens, token_types, merges, bos_id, eos_id) of a synthetic byte-level BPE vocabulary of exactly vocab
    tokens (see the module comment)."""
    specials = _llama3_specials()[: 256 if vocab >= 768 else 16]
    n_merged = vocab - 256 - len(specials)
    if n_merged < 0:
        raise UsageError(f"--vocab must be at least {256 + len(specials)}, got {vocab}")
    base = _byte_to_unicode()
    space = base[ord(" ")]  # 'Ġ': a word's leading space, as the gpt-2 pre-tokenizer leaves it
    letters = "etaoinshrdlcumwfgypbvkjxqz" + "ETAOINSHRDLCUMWFGYPBVKJXQZ" + "0123456789"
    tokens, merges = list(base), []
    # Breadth first, so every prefix is a token before anything is built on it: level 2 is 'Ġ' or a letter
    # followed by a letter, level k+1 a level-k token followed by a letter (62^k more each level).
    level = [space] + list(letters)
    while len(merges) < n_merged:
        nxt = []
        for prefix in level:
            for c in letters:
                if len(merges) == n_merged:
                    break
                tokens.append(prefix + c)
                merges.append(f"{prefix} {c}")
                nxt.append(prefix + c)
        level = nxt
    types_ = [int(gguf.TokenType.NORMAL)] * len(tokens) + [int(gguf.TokenType.CONTROL)] * len(specials)
    bos = len(tokens)
    tokens += specials
    assert len(tokens) == vocab and len(set(tokens)) == vocab
    return tokens, types_, merges, bos, bos + 1


# ---- layout ----

def resolve_shape(a):
    """The shape dict (dim, layers, heads, kv_heads, ffn, vocab, ctx, rope_theta, tied, name) from the
    arguments; raises UsageError on an inconsistent one."""
    flags = dict(dim=a.dim, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, ffn=a.ffn, vocab=a.vocab,
                 ctx=a.ctx, rope_theta=a.rope_theta, tied=a.tied)
    given = {k: v for k, v in flags.items() if v is not None}
    if a.shape == "custom":
        missing = [k for k in ("dim", "layers", "heads", "ffn", "vocab") if k not in given]
        if missing:
            raise UsageError("--shape custom needs " + ", ".join("--" + k.replace("_", "-") for k in missing))
        s = dict(CUSTOM_DEFAULTS, kv_heads=given["heads"])
    else:
        s = dict(SHAPES[a.shape])
        if any(s[k] != v for k, v in given.items()):
            s["name"] += " modified"
    s.update(given)
    for k in ("dim", "layers", "heads", "kv_heads", "ffn", "vocab", "ctx"):
        if s[k] < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be positive, got {s[k]}")
    if s["dim"] % s["heads"] or s["heads"] % s["kv_heads"] or (s["dim"] // s["heads"]) % 2:
        raise UsageError(f"dim {s['dim']} / heads {s['heads']} / kv heads {s['kv_heads']}: heads must divide dim "
                         "into an even head_dim, and kv heads divide heads")
    if s["rope_theta"] <= 0:
        raise UsageError(f"--rope-theta must be positive, got {s['rope_theta']}")
    return s


def tensor_layout(s, dtype):
    """[(name, ne, ggml type)] in file order; ne is GGUF order (ne[0] = the row length, i.e. the input dim of a
    matrix), which is what GGUFReader reports as a tensor's shape."""
    qtype = DTYPES[dtype][0]
    hd = s["dim"] // s["heads"]
    dim, q_dim, kv_dim, ffn, vocab = s["dim"], s["heads"] * hd, s["kv_heads"] * hd, s["ffn"], s["vocab"]
    t = [("token_embd.weight", (dim, vocab), qtype)]
    for i in range(s["layers"]):
        b = f"blk.{i}."
        t += [(b + "attn_norm.weight", (dim,), Q.F32),
              (b + "attn_q.weight", (dim, q_dim), qtype),
              (b + "attn_k.weight", (dim, kv_dim), qtype),
              (b + "attn_v.weight", (dim, kv_dim), qtype),
              (b + "attn_output.weight", (q_dim, dim), qtype),
              (b + "ffn_norm.weight", (dim,), Q.F32),
              (b + "ffn_gate.weight", (dim, ffn), qtype),
              (b + "ffn_up.weight", (dim, ffn), qtype),
              (b + "ffn_down.weight", (ffn, dim), qtype)]
    t.append(("output_norm.weight", (dim,), Q.F32))
    if not s["tied"]:
        t.append(("output.weight", (dim, vocab), qtype))
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, ne, ty in t:
        if ne[0] % gguf.GGML_QUANT_SIZES[ty][0]:
            raise UsageError(f"{name}: row length {ne[0]} is not a multiple of {dtype}'s block of {block}")
    return t


def tensor_bytes(ne, ty):
    block, size = gguf.GGML_QUANT_SIZES[ty]
    n = int(np.prod(ne, dtype=np.int64))
    return n // block * size


# ---- data ----

def _convert(x, ty):
    """float32 rows (scaled) -> the stored bytes of type ty, rows kept."""
    if ty == Q.F32:
        return x
    if ty == Q.F16:
        return x.astype(np.float16)
    if ty == Q.BF16:
        # the upper half of each little-endian float32: truncation, not rounding (values are random anyway)
        return np.ascontiguousarray(x.view(np.uint16)[:, 1::2])
    return gguf.quants.quantize(x, ty)


class _TensorStream:
    """Stands in for the ndarray GGUFWriter.write_tensor_data takes: that method only reads .nbytes and calls
    .tofile(fp), so a tensor of any size can be generated and written chunk by chunk, through the writer's
    own order, size and alignment checks."""

    def __init__(self, ne, ty, seed, index, pool, jobs, is_norm):
        self.ne, self.ty, self.seed, self.index, self.pool, self.jobs = ne, ty, seed, index, pool, jobs
        self.is_norm = is_norm
        self.nbytes = tensor_bytes(ne, ty)

    def _chunk(self, c, r0, r1):
        cols = self.ne[0]
        if self.is_norm:
            return np.ones((r1 - r0, cols), dtype=np.float32)
        rng = np.random.default_rng([self.seed, self.index, c])
        x = rng.standard_normal((r1 - r0, cols), dtype=np.float32)
        x *= INIT_STD
        return _convert(x, self.ty)

    def tofile(self, fp):
        rows = self.ne[1] if len(self.ne) > 1 else 1
        per = max(1, CHUNK_ELEMS // self.ne[0])
        spans = [(c, r0, min(rows, r0 + per)) for c, r0 in enumerate(range(0, rows, per))]
        pending, written = collections.deque(), 0
        for span in spans:  # at most 2 * jobs chunks in flight: memory stays bounded
            pending.append(self.pool.submit(self._chunk, *span))
            if len(pending) >= 2 * self.jobs:
                written += fp.write(memoryview(pending.popleft().result()).cast("B"))
        while pending:
            written += fp.write(memoryview(pending.popleft().result()).cast("B"))
        if written != self.nbytes:
            raise RuntimeError(f"wrote {written} bytes of a {self.nbytes}-byte tensor")


def _add_metadata(w, s, dtype, seed):
    hd = s["dim"] // s["heads"]
    w.add_name(f"{s['name']} random")
    w.add_description(f"random weights N(0, {INIT_STD}^2), seed {seed}, in the tensor layout of {s['name']}, with a "
                      "synthetic vocabulary; made by pdserve deploy/make_random_gguf.py for speed benchmarks")
    w.add_file_type(int(DTYPES[dtype][1]))
    if dtype in ("q8_0", "q4_1"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(s["vocab"])
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["dim"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(float(s["rope_theta"]))
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_dimension_count(hd)
    tokens, types_, merges, bos, eos = build_vocab(s["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types_)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write_gguf(path, s, dtype, seed, jobs):
    """Writes the file; returns (params, bytes of tensor data)."""
    layout = tensor_layout(s, dtype)
    build_vocab(s["vocab"])  # a bad vocabulary size is a usage error: find out before creating the file
    w = gguf.GGUFWriter(path, "llama")
    _add_metadata(w, s, dtype, seed)
    for name, ne, ty in layout:
        # element shape in numpy order (rows, cols); with a non-uint8 dtype the writer takes it as is
        w.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), tensor_bytes(ne, ty), raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, (name, ne, ty) in enumerate(layout):
            w.write_tensor_data(_TensorStream(ne, ty, seed, i, pool, jobs, len(ne) == 1))
    w.close()
    return sum(int(np.prod(ne)) for _, ne, _ in layout), sum(tensor_bytes(ne, ty) for _, ne, ty in layout)


def print_table(s, dtype):
    layout = tensor_layout(s, dtype)
    print(f"{'tensor':<28} {'ne':<18} {'type':<5} {'params':>12} {'bytes':>14}")
    params = nbytes = 0
    for name, ne, ty in layout:
        n, b = int(np.prod(ne)), tensor_bytes(ne, ty)
        params, nbytes = params + n, nbytes + b
        print(f"{name:<28} {str(list(ne)):<18} {ty.name:<5} {n:>12} {b:>14}")
    print(f"total: shape={s['name']} dtype={dtype} tied={int(s['tied'])} tensors={len(layout)} params={params} "
          f"({params / 1e9:.3f}e9) tensor_bytes={nbytes} ({nbytes / 2**30:.2f} GiB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output GGUF")
    ap.add_argument("--shape", required=True, choices=[*SHAPES, "custom"])
    for flag in ("dim", "layers", "heads", "kv-heads", "ffn", "vocab", "ctx"):
        ap.add_argument("--" + flag, type=int)
    ap.add_argument("--rope-theta", type=float)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="matrix type (default bf16)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tie = ap.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", default=None, help="no output.weight")
    tie.add_argument("--untied", dest="tied", action="store_false", help="write output.weight")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="generator threads (default: all cores)")
    ap.add_argument("--dry-run", action="store_true", help="print the tensor table and totals, write nothing")
    a = ap.parse_args()
    try:
        if a.seed < 0 or a.jobs < 1:
            raise UsageError("--seed must be >= 0 and --jobs >= 1")
        s = resolve_shape(a)
        if a.dry_run:
            print_table(s, a.dtype)
            return 0
        t0 = time.monotonic()
        params, _ = write_gguf(a.out, s, a.dtype, a.seed, a.jobs)
    except UsageError as e:
        print(f"make_random_gguf: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as e:
        print(f"make_random_gguf: {a.out}: {e}", file=sys.stderr)
        if os.path.exists(a.out):
            os.unlink(a.out)  # never leave a truncated file that looks like a model
        return 1
    except KeyboardInterrupt:
        if os.path.exists(a.out):
            os.unlink(a.out)
        raise
    print(f"{a.out}: shape={s['name']} dtype={a.dtype} params={params} ({params / 1e9:.3f}e9) "
          f"bytes={os.path.getsize(a.out)} seconds={time.monotonic() - t0:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
