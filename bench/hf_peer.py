#!/usr/bin/env python3
"""hf_peer.py: HF transformers (eager PyTorch, SDPA attention, bf16) on one GPU, measured as the peer for our
CUDA engine benchmark on the same Llama shapes as deploy/make_random_gguf.py, with random weights (speed does
not depend on the values).

Measures
  decode   per batch B: model.generate() of --new greedy tokens after a (B, --ctx) random prompt. Decode
           tok/s = B*(new-1) / (t(new) - t(1)), so the prompt's prefill and the first token cancel out;
           ms = (t(new) - t(1)) / (new-1), the time of one decode step of the whole batch.
  prefill  per batch B: the decoder on (B, --prefill-len) random ids plus the LM head on the last position
           only (what a serving prefill does; full logits would be B*len*vocab*2 bytes, 8 GB at B=8).
           Reports tok/s and achieved TFLOP/s (formula in FLOP_FORMULA below, also written to the JSON).
Every time is the median of --reps runs after one warm-up. A batch that runs out of memory is reported
as "oom" and the run goes on.

On the GPU machine (torch + transformers installed, no network needed):
  python3 bench/hf_peer.py --shape 1b --json hf_1b.json
  python3 bench/hf_peer.py --shape 8b --json hf_8b.json
CPU smoke test (seconds): python3 bench/hf_peer.py --device cpu --shape tiny
"""
import argparse
import contextlib
import gc
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

# Must match SHAPES in deploy/make_random_gguf.py (the public HF config.json of each model).
SHAPES = {
    "1b": dict(name="Llama-3.2-1B", hidden=2048, inter=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True),
    "8b": dict(name="Llama-3.1-8B", hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
               tied=False),
    "tiny": dict(name="tiny", hidden=64, inter=128, layers=2, heads=4, kv_heads=2, vocab=1000, tied=True),
}
# Per-shape defaults of the size flags: the tiny shape is a smoke test and must finish in seconds on a CPU.
DEFAULTS = {
    "full": dict(decode_batches="1,8,32,64,128", ctx=512, new=128, prefill_len=4096, prefill_batches="1,8"),
    "tiny": dict(decode_batches="1,4", ctx=16, new=4, prefill_len=32, prefill_batches="1,2"),
}
FLOP_FORMULA = ("prefill FLOPs = 2*P*B*L + 2*vocab*hidden*B + 4*layers*hidden*L^2/2*B, where P = parameters of "
                "the decoder layers and final norm (input embedding table and LM head excluded), L = prefill-len; "
                "the LM head runs on the last position of each of the B rows only; attention is causal (half of "
                "QK^T and PV)")
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def make_config(s):
    # No rope_scaling: our engine does not implement llama3 scaling, and at these lengths it costs nothing.
    # bos/eos None so that generate() never stops early on a random-weights model.
    return LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=s["tied"], bos_token_id=None, eos_token_id=None,
                       pad_token_id=0, use_cache=True)


def no_init_context():
    # transformers' own init of 8B parameters is minutes on a CPU and seconds even on a GPU; we overwrite
    # every weight anyway. The context moved between major versions.
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return getattr(__import__(mod, fromlist=["no_init_weights"]), "no_init_weights")()
        except (ImportError, AttributeError):
            pass
    return contextlib.nullcontext()


def build_model(s, device):
    cfg = make_config(s)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate in bf16 directly: no fp32 copy of 8B parameters
    try:
        with torch.device(device), no_init_context():
            # torch_dtype is what transformers 4.x takes; 5.x renamed it dtype and warns on the old name
            key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", **{key: torch.bfloat16})
    finally:
        torch.set_default_dtype(old)
    model.tie_weights()  # skipped init may have skipped tying too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)  # RMSNorm gains
    if s["tied"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "LM head not tied"
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, reps, device):
    """Median seconds of reps calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_decode(model, s, b, a):
    ids = torch.randint(0, s["vocab"], (b, a.ctx), device=a.device)
    mask = torch.ones_like(ids)

    def gen(n):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             use_cache=True, pad_token_id=0, eos_token_id=None)
        assert out.shape == (b, a.ctx + n), f"generate returned {tuple(out.shape)}, expected {(b, a.ctx + n)}"

    t_new = timed(lambda: gen(a.new), a.reps, a.device)
    t_one = timed(lambda: gen(1), a.reps, a.device)
    step = (t_new - t_one) / (a.new - 1)
    if step <= 0:  # only seen with tiny shapes on a busy CPU, where noise exceeds the decode time
        return dict(phase="decode", batch=b, ctx=a.ctx, new=a.new, t_new_s=t_new, t_one_s=t_one,
                    tok_s="noise", ms="noise", tflops=None)
    return dict(phase="decode", batch=b, ctx=a.ctx, new=a.new, t_new_s=t_new, t_one_s=t_one,
                tok_s=b / step, ms=step * 1e3, tflops=None)


def prefill_flops(s, p_decoder, b, length):
    return (2 * p_decoder * b * length + 2 * s["vocab"] * s["hidden"] * b
            + 4 * s["layers"] * s["hidden"] * length * length / 2 * b)


def bench_prefill(model, s, b, a, p_decoder):
    ids = torch.randint(0, s["vocab"], (b, a.prefill_len), device=a.device)

    def fwd():
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state
        model.lm_head(h[:, -1, :])

    t = timed(fwd, a.reps, a.device)
    return dict(phase="prefill", batch=b, len=a.prefill_len, t_s=t, tok_s=b * a.prefill_len / t, ms=t * 1e3,
                tflops=prefill_flops(s, p_decoder, b, a.prefill_len) / t / 1e12)


def guarded(fn, phase, b):
    """fn() or an "oom" row: one batch too large must not lose the rows already measured."""
    try:
        return fn()
    except OOM:
        return dict(phase=phase, batch=b, oom=True, tok_s="oom", ms="oom", tflops="oom")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=list(SHAPES))
    ap.add_argument("--decode-batches")
    ap.add_argument("--ctx", type=int)
    ap.add_argument("--new", type=int)
    ap.add_argument("--prefill-len", type=int)
    ap.add_argument("--prefill-batches")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for k, v in DEFAULTS["tiny" if a.shape == "tiny" else "full"].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.decode_batches = [int(x) for x in a.decode_batches.split(",") if x]
    a.prefill_batches = [int(x) for x in a.prefill_batches.split(",") if x]
    if a.new < 2:
        ap.error("--new must be at least 2 (decode time is t(new) - t(1))")
    if a.ctx + a.new > 8192 or a.prefill_len > 8192:
        ap.error("ctx+new and prefill-len must fit max_position_embeddings 8192")
    return a


def fmt(v, spec):
    return v if isinstance(v, str) else ("-" if v is None else format(v, spec))


def print_table(name, rows):
    print(f"\n{'shape':<14}{'phase':<9}{'batch':>6}{'tok/s':>12}{'ms':>11}{'TFLOP/s':>9}")
    for r in rows:
        print(f"{name:<14}{r['phase']:<9}{r['batch']:>6}{fmt(r['tok_s'], '.1f'):>12}{fmt(r['ms'], '.2f'):>11}"
              f"{fmt(r['tflops'], '.1f'):>9}")
    print("decode ms = one step of the whole batch; prefill ms = the whole (B, len) forward")
    print(FLOP_FORMULA)


def main(argv):
    a = parse_args(argv)
    s = SHAPES[a.shape]
    torch.manual_seed(a.seed)
    cuda = a.device.startswith("cuda")
    gpu = torch.cuda.get_device_name(torch.device(a.device)) if cuda else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {gpu}", flush=True)
    t0 = time.perf_counter()
    model = build_model(s, a.device)
    sync(a.device)
    p_decoder = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    p_total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    print(f"{s['name']}: {p_total:.4g} params ({p_decoder:.4g} in decoder layers), built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    with torch.inference_mode():
        for b in a.decode_batches:
            rows.append(guarded(lambda: bench_decode(model, s, b, a), "decode", b))
            free(a.device)
            print(f"decode  B={b}: {fmt(rows[-1]['tok_s'], '.1f')} tok/s", flush=True)
        for b in a.prefill_batches:
            rows.append(guarded(lambda: bench_prefill(model, s, b, a, p_decoder), "prefill", b))
            free(a.device)
            print(f"prefill B={b}: {fmt(rows[-1]['tok_s'], '.1f')} tok/s", flush=True)
    print_table(s["name"], rows)
    if a.json:
        out = dict(shape=s["name"], shape_params=s, params_total=p_total, params_decoder=p_decoder,
                   torch=torch.__version__, transformers=transformers.__version__, device=a.device, gpu=gpu,
                   cuda=torch.version.cuda, dtype="bfloat16", attn_implementation="sdpa", reps=a.reps,
                   args={k: v for k, v in vars(a).items() if k != "json"}, flop_formula=FLOP_FORMULA,
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, results=rows)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
