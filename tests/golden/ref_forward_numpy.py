#!/usr/bin/env python3
"""Independent numpy float64 llama forward pass straight from the GGUF file.

Second reference for pdserve's C forward pass, and executable documentation of
the GGUF tensor layout. It uses nothing but gguf-py (GGUFReader + dequantize)
and numpy; no torch / transformers.

Layout facts this file relies on (llama arch, as written by llama.cpp's
convert_hf_to_gguf.py):
  * A 2-D GGUF tensor with ne = [ne0, ne1] is ne1 rows of ne0 contiguous
    elements; dequantize() returns it as a numpy array of shape (ne1, ne0) =
    (out_features, in_features), so y = W @ x.
  * attn_q / attn_k rows are PERMUTED relative to the HF checkpoint: inside
    every head of head_dim=64 rows, HF row (j*32 + i) (j in {0,1}, i < 32) is
    stored at GGUF row (2*i + j). With the weights as stored, RoPE must rotate
    ADJACENT pairs (x[2i], x[2i+1]) by angle pos * base^(-2i/head_dim)
    (llama.cpp "normal" rope mode). HF instead rotates halves
    (x[i], x[i+32]) on un-permuted weights; both give identical results.
    Using the half-rotation on GGUF weights is WRONG (see --rope halves).
  * Grouped-query attention: query head h uses kv head h // (n_head/n_head_kv).
  * No output.weight: logits = token_embd @ final_norm(x) (tied embeddings).
  * RMSNorm: x / sqrt(mean(x^2) + eps) * w, eps from the GGUF (1e-5 as f32).
  * FFN: down( silu(gate(x)) * up(x) ).

Usage:
  /opt/pdgolden/bin/python tests/golden/ref_forward_numpy.py \
      [--cases capital_france,code_fib,story_ws] [--rope pairs|halves]

Compares float64 logits with the transformers golden in tests/golden/logits
(last prompt position, plus the extra positions where a case has them) and
prints the max abs difference and whether the argmax agrees.
"""
import argparse
import os
import sys

import numpy as np
import gguf
from gguf.quants import dequantize


class GGUFLlama:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        self.t = {t.name: t for t in r.tensors}

        def kv(key):
            return r.fields[key].contents()

        assert kv("general.architecture") == "llama"
        self.n_layer = int(kv("llama.block_count"))
        self.dim = int(kv("llama.embedding_length"))
        self.n_head = int(kv("llama.attention.head_count"))
        self.n_kv = int(kv("llama.attention.head_count_kv"))
        self.head_dim = self.dim // self.n_head
        self.rope_dim = int(kv("llama.rope.dimension_count"))
        self.base = float(kv("llama.rope.freq_base"))
        self.eps = float(kv("llama.attention.layer_norm_rms_epsilon"))
        self.add_bos = bool(kv("tokenizer.ggml.add_bos_token"))
        assert self.rope_dim == self.head_dim
        self._cache = {}

    def w(self, name):
        if name not in self._cache:
            t = self.t[name]
            a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
            self._cache[name] = a
        return self._cache[name]

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos, layout):
        # x: [T, H, head_dim], pos: [T]
        hd = self.head_dim
        i = np.arange(hd // 2, dtype=np.float64)
        inv = self.base ** (-2.0 * i / hd)                 # [hd/2]
        ang = pos[:, None].astype(np.float64) * inv[None]   # [T, hd/2]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        if layout == "pairs":      # correct for GGUF weights as stored
            x0, x1 = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = x0 * c - x1 * s
            out[..., 1::2] = x0 * s + x1 * c
        elif layout == "halves":   # HF/NeoX style: wrong for GGUF-permuted weights
            x0, x1 = x[..., : hd // 2], x[..., hd // 2:]
            out = np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
        else:
            raise ValueError(layout)
        return out

    def forward(self, ids, positions=None, layout="pairs"):
        """Full-sequence causal forward. Returns logits for `positions` ([P, vocab])."""
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        if positions is None:
            positions = [T - 1]
        hd, H, KV = self.head_dim, self.n_head, self.n_kv
        emb = self.w("token_embd.weight")                  # [vocab, dim]
        x = emb[ids].copy()                                # [T, dim]
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self.rmsnorm(x, self.w(p + "attn_norm.weight"))
            q = (h @ self.w(p + "attn_q.weight").T).reshape(T, H, hd)
            k = (h @ self.w(p + "attn_k.weight").T).reshape(T, KV, hd)
            v = (h @ self.w(p + "attn_v.weight").T).reshape(T, KV, hd)
            q = self.rope(q, pos, layout)
            k = self.rope(k, pos, layout)
            att = np.empty((T, H, hd))
            for hh in range(H):
                kvh = hh // (H // KV)
                sc = q[:, hh, :] @ k[:, kvh, :].T / np.sqrt(hd) + mask
                sc = sc - sc.max(axis=-1, keepdims=True)
                pr = np.exp(sc)
                pr /= pr.sum(axis=-1, keepdims=True)
                att[:, hh, :] = pr @ v[:, kvh, :]
            x = x + att.reshape(T, H * hd) @ self.w(p + "attn_output.weight").T
            h = self.rmsnorm(x, self.w(p + "ffn_norm.weight"))
            g = h @ self.w(p + "ffn_gate.weight").T
            u = h @ self.w(p + "ffn_up.weight").T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ self.w(p + "ffn_down.weight").T
        out_w = self.w("output.weight") if "output.weight" in self.t else emb
        xs = self.rmsnorm(x[positions], self.w("output_norm.weight"))
        return xs @ out_w.T


def load_case(gdir, name, n_vocab):
    with open(os.path.join(gdir, f"{name}.tokens.txt")) as f:
        lines = f.read().split("\n")
    ids = [int(t) for t in lines[0].split()]
    extra = [int(t) for t in lines[3].split()] if len(lines) > 3 else []
    rows = np.fromfile(os.path.join(gdir, f"{name}.logits.f32"), dtype="<f4").reshape(-1, n_vocab)
    assert rows.shape[0] == 1 + len(extra)
    return ids, extra, rows


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/root/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--golden", default=os.path.join(here, "logits"))
    ap.add_argument("--cases", default="capital_france,code_fib,story_ws",
                    help="comma-separated case names from index.txt, or 'all'")
    ap.add_argument("--rope", default="pairs", choices=["pairs", "halves"])
    ap.add_argument("--tol", type=float, default=2e-3, help="max abs logit diff allowed")
    a = ap.parse_args()

    m = GGUFLlama(a.model)
    n_vocab = m.w("token_embd.weight").shape[0]
    print(f"model: n_layer={m.n_layer} dim={m.dim} n_head={m.n_head} n_kv={m.n_kv} "
          f"head_dim={m.head_dim} rope_base={m.base} eps={m.eps!r} add_bos={m.add_bos} "
          f"tied={'output.weight' not in m.t} rope_layout={a.rope}")
    names = []
    with open(os.path.join(a.golden, "index.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                names.append(line.split()[0])
    if a.cases != "all":
        names = a.cases.split(",")
    worst = 0.0
    ok = True
    for name in names:
        ids, extra, rows = load_case(a.golden, name, n_vocab)
        positions = [len(ids) - 1] + extra
        ref = m.forward(ids, positions, layout=a.rope)
        for r, pos in enumerate(positions):
            d = float(np.max(np.abs(ref[r] - rows[r].astype(np.float64))))
            am_np, am_hf = int(np.argmax(ref[r])), int(np.argmax(rows[r]))
            worst = max(worst, d)
            good = d <= a.tol and am_np == am_hf
            ok &= good
            print(f"{name:16s} n_prompt={len(ids):5d} pos={pos:5d} max|numpy64 - hf32|={d:.3e} "
                  f"argmax numpy={am_np} hf={am_hf} {'OK' if good else 'MISMATCH'}")
            sys.stdout.flush()
    print(f"worst max abs diff: {worst:.3e}  ({'PASS' if ok else 'FAIL'}, tol {a.tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
