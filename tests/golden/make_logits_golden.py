#!/usr/bin/env python3
"""Golden logits / greedy-continuation reference for pdserve's C forward pass.

Independent reference: Hugging Face transformers (eager attention, float32)
loading the *same* GGUF file the engine loads (transformers dequantizes the
Q4_1 / Q8_0 tensors to float32 through gguf-py on load).

Usage (from the repository root):

    HF_HUB_OFFLINE=1 /opt/pdgolden/bin/python tests/golden/make_logits_golden.py \
        [--model /root/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--out tests/golden/logits]

Output (all little-endian, parseable from C without a JSON library):

  index.txt          '#' comment lines (versions, command, notes), then one
                     line per case:  name n_prompt n_gen n_extra_pos
  NAME.tokens.txt    line 1: prompt token ids (exactly what was fed to the model)
                     line 2: n_gen greedy token ids (argmax, EOS ignored)
                     line 3: n_gen top-2 margins (max - second max) of the
                             logits each greedy token was picked from
                     line 4: extra prompt positions (0-based) or empty
  NAME.logits.f32    raw float32: logits at the LAST prompt position
                     (n_vocab floats), then one row per extra position in
                     the order of line 4.
  NAME.prompt.txt    the exact prompt text (UTF-8, no trailing newline added)
                     that tokenizes to line 1 (chat prompts: rendered template)

The greedy loop is implemented by hand with the KV cache so that EOS does not
stop it: all n_gen tokens are the argmax of the model's logits, including any
tokens after <|im_end|> (id 2).
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

N_GEN = 64

# ---------------------------------------------------------------------------
# Prompts. All text is fixed in this file: the output is fully deterministic.
# ---------------------------------------------------------------------------

MID_TEXT = (
    "The old lighthouse on the northern cape was built in 1874, after a winter "
    "storm wrecked three fishing boats within sight of the harbour. Its keeper, "
    "a quiet woman named Margaret Hale, kept a logbook for forty-one years. In "
    "it she recorded the weather twice a day, the ships that passed, and small "
    "things that nobody else would have noticed: the week the swallows came "
    "back early, the night the fog smelled of oranges because a cargo ship had "
    "lost part of its load, the morning a seal slept on the lowest step of the "
    "tower. When the lamp was finally automated in 1952, the logbooks were sent "
    "to the county museum, where they sat in a cardboard box for decades. A "
    "graduate student found them by accident while looking for tax records. She "
    "spent two summers reading every page, and she realised that Margaret's "
    "careful notes were one of the longest continuous weather records on that "
    "stretch of coast. Climate scientists now use the data to study how storms "
    "have changed over the last century. The lighthouse itself is a small "
    "museum today. Visitors can climb the ninety-six steps to the lamp room, "
    "look out over the grey water, and read a copy of the first entry, written "
    "in a steady hand: \"Wind from the north-east, sea rough, lamp lit at "
    "five. All well.\" Most people who read it stay a little longer than they "
    "planned, watching the waves and thinking about"
)

LONG_PARAGRAPHS = [
    "Bread is one of the oldest prepared foods, and its story is tangled up "
    "with the story of farming itself. Archaeologists have found charred crumbs "
    "at a site in Jordan that are more than fourteen thousand years old, which "
    "means people were baking flatbread from wild grains before anyone had "
    "planted a field. The early loaves were dense and heavy. Leavened bread, "
    "which rises because yeast produces bubbles of carbon dioxide, probably "
    "appeared by accident when a batch of dough was left out too long and "
    "caught wild yeast from the air. Egyptian bakers learned to keep a piece of "
    "each day's dough to start the next batch, a habit that survives in every "
    "sourdough kitchen in the world.",

    "A modern baker still works with the same four ingredients: flour, water, "
    "salt and yeast. What has changed is control. Professional bakeries measure "
    "the temperature of the dough to within half a degree, because yeast "
    "activity roughly doubles for every eight degrees of warmth. A dough mixed "
    "at 24 degrees Celsius might need three hours to rise, while the same dough "
    "at 30 degrees could be ready in ninety minutes, but with a flatter, less "
    "interesting flavour. Time is an ingredient too. Slow fermentation gives "
    "bacteria a chance to produce lactic and acetic acids, which is why a loaf "
    "that rested overnight in the refrigerator tastes richer than one made in "
    "a single afternoon.",

    "\"You are overthinking it,\" my grandfather told me the first time I tried "
    "to follow a recipe with a thermometer and a notebook. He had baked every "
    "Saturday for sixty years and never weighed anything. He judged the flour "
    "by the way it fell from his hand, and the dough by how it pushed back "
    "against his thumb. \"When it feels like the skin on the inside of your "
    "wrist, it's ready.\" I didn't believe him, of course. I kept my notebook, "
    "recorded hydration percentages and proofing times, and produced a long "
    "series of pale, disappointing loaves. It took me most of a year to admit "
    "that the numbers were useful only after my hands had learned what they "
    "meant.",

    "Rivers shaped the first cities in much the same way that yeast shapes "
    "bread: slowly, invisibly, and then all at once. The Tigris and the "
    "Euphrates flooded every spring, leaving behind a layer of fertile silt. "
    "Farmers who could predict the floods could plan their planting, and "
    "farmers who could store the surplus could feed people who did other work. "
    "Scribes, potters, priests and soldiers all depended on grain that someone "
    "else had grown. Writing itself seems to have begun as bookkeeping: the "
    "oldest clay tablets from Uruk are mostly lists of barley, sheep and beer, "
    "with a few names attached so that everyone knew who owed what to whom.",

    "Trade followed the rivers as well. A merchant in the third millennium "
    "before the common era might carry copper from the mountains of Oman, tin "
    "from as far away as Afghanistan, and lapis lazuli from the valleys of "
    "Badakhshan. None of these goods were necessary for survival, yet people "
    "were willing to travel for months to obtain them. Historians sometimes "
    "argue about whether ancient economies were driven by need or by desire. "
    "The honest answer is probably both, in proportions that changed from one "
    "generation to the next, depending on the harvest, the weather and the "
    "ambitions of whoever happened to be in charge.",

    "The same questions appear in unexpected places. When engineers design a "
    "computer network, they worry about bandwidth, latency and congestion, "
    "which are really questions about how goods move along a river. A packet "
    "of data is a small boat; a router is a busy harbour; a dropped "
    "connection is a cargo lost in a storm. The mathematics of queues, first "
    "developed by a Danish engineer studying telephone exchanges in 1909, "
    "applies just as well to the checkout line at a supermarket as it does to "
    "a data centre handling millions of requests per second. If the arrival "
    "rate approaches the service rate, waiting times grow without limit, no "
    "matter how clever the scheduling is.",

    "There is something comforting in the idea that a few simple rules can "
    "describe so many different systems. It suggests that the world is not "
    "completely arbitrary, that a careful observer can learn something in one "
    "field and carry it into another. My grandfather would have laughed at the "
    "comparison between his kitchen and a telephone exchange, but I think he "
    "would have understood it. He knew that dough needs time, that an oven "
    "needs space between the loaves, and that a baker who tries to rush "
    "everything at once ends up with nothing worth eating.",

    "On the last Saturday I spent with him, we made two loaves side by side. "
    "Mine was shaped a little unevenly, and the crust split along one edge "
    "where I had not sealed the seam. His was perfect, as always. He cut a "
    "slice from each, buttered them both, and ate mine first. \"It's good,\" "
    "he said. \"Next time, let it rest ten more minutes.\" Then he looked out of "
    "the window for a while, at the garden and the apple tree and the clouds "
    "moving slowly towards the hills, and he began to tell me about the summer "
    "he",
]
LONG_TEXT = "\n\n".join(LONG_PARAGRAPHS)

PLAIN_CASES = [
    ("capital_france", "The capital of France is"),
    ("code_fib", "def fibonacci(n):"),
    ("numbers", "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,"),
    ("unicode", "Café déjà vu — naïve résumé: 日本語のテキスト, emoji 🙂🚀, and Ωμέγα"),
    ("story_ws", "Once upon a time,\n  in a  small village,"),
]

CHAT_CASES = [
    # default system prompt inserted by the GGUF's ChatML template
    ("chat_default_sys", [
        {"role": "user", "content": "What is the capital of France?"},
    ]),
    ("chat_custom_sys", [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]),
    ("chat_multiturn", [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."},
        {"role": "user", "content": "Now one about mountains."},
    ]),
]

SINGLE_CASE = ("single_token", "Hello")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/root/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--out", default=os.path.join(here, "logits"))
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def verify_weights(model, gguf_path, cfg):
    """Check transformers really loaded the GGUF's dequantized weights, and the tie."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(gguf_path)
    tens = {t.name: t for t in r.tensors}

    def deq(name):
        t = tens[name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)

    n_head, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def unpermute(w, nh):
        # GGUF (llama.cpp) row order within a head: interleaved pairs (2i, 2i+1)
        # HF row order within a head: halves (i, i + hd/2)
        return w.reshape(nh, hd // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    assert "output.weight" not in tens, "expected tied embeddings (no output.weight)"
    L = model.model.layers
    report = []
    checks = [
        ("token_embd.weight", model.model.embed_tokens.weight, None),
        ("blk.0.attn_v.weight", L[0].self_attn.v_proj.weight, None),
        ("blk.0.ffn_down.weight", L[0].mlp.down_proj.weight, None),
        ("blk.29.ffn_gate.weight", L[29].mlp.gate_proj.weight, None),
        ("blk.29.attn_output.weight", L[29].self_attn.o_proj.weight, None),
        ("blk.0.attn_q.weight", L[0].self_attn.q_proj.weight, n_head),
        ("blk.17.attn_k.weight", L[17].self_attn.k_proj.weight, n_kv),
        ("blk.5.attn_norm.weight", L[5].input_layernorm.weight, None),
        ("output_norm.weight", model.model.norm.weight, None),
    ]
    for name, p, nh in checks:
        ref = deq(name)
        if nh is not None:
            ref = unpermute(ref, nh)
        got = p.detach().cpu().numpy()
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        d = float(np.max(np.abs(got - ref)))
        report.append(f"{name} shape={tuple(got.shape)} maxdiff={d:g}")
        assert d == 0.0, f"weight mismatch for {name}: {d}"
    # the Q4_1 tensors must really be quantized-then-dequantized values (not some
    # other checkpoint): Q4_1 blocks of 32 have at most 16 distinct values.
    w = L[0].mlp.down_proj.weight.detach().cpu().numpy().reshape(-1, 32)
    assert max(len(np.unique(b)) for b in w[:256]) <= 16
    tied = (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
            or torch.equal(model.lm_head.weight, model.model.embed_tokens.weight))
    assert tied and model.config.tie_word_embeddings, "lm_head is not tied to embed_tokens"
    report.append("lm_head tied to embed_tokens: yes")
    return report


@torch.no_grad()
def run_case(model, ids, extra_pos):
    """Prefill the prompt, return (last logits, extra rows, greedy ids, margins)."""
    inp = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=inp, use_cache=True)
    logits = out.logits[0].float()  # [n_prompt, vocab]
    last = logits[-1].clone()
    extra = [logits[p].clone() for p in extra_pos]
    past = out.past_key_values
    gen, margins = [], []
    cur = last
    for step in range(N_GEN):
        top2 = torch.topk(cur, 2)
        tok = int(torch.argmax(cur))  # first max index, same as topk[0] on ties
        assert tok == int(top2.indices[0]) or float(top2.values[0]) == float(top2.values[1])
        gen.append(tok)
        margins.append(float(top2.values[0] - top2.values[1]))
        if step == N_GEN - 1:
            break
        out = model(input_ids=torch.tensor([[tok]], dtype=torch.long),
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        cur = out.logits[0, -1].float()
    # Consistency check: teacher-forced single pass over prompt+gen[:-1] must
    # reproduce the same argmaxes (batch vs KV-cache path). Report disagreements.
    full = torch.tensor([ids + gen[:-1]], dtype=torch.long)
    tf = model(input_ids=full, use_cache=False).logits[0, len(ids) - 1:].float()
    tf_arg = torch.argmax(tf, dim=-1).tolist()
    mismatch = [i for i in range(N_GEN) if tf_arg[i] != gen[i]]
    maxdiff_last = float(torch.max(torch.abs(tf[0] - last)))
    return last, extra, gen, margins, mismatch, maxdiff_last


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception:  # pragma: no cover
        pass

    import transformers
    import gguf
    import tokenizers
    import jinja2
    from importlib.metadata import version as pkg_version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, model_file = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    assert model.config._attn_implementation == "eager"
    n_vocab = cfg.vocab_size

    for line in verify_weights(model, args.model, cfg):
        print("[verify]", line)

    def encode(text):
        ids = tok(text, add_special_tokens=True).input_ids
        ids2 = tok(text, add_special_tokens=False).input_ids
        assert ids == ids2, "tokenizer adds special tokens (BOS?) unexpectedly"
        return ids

    cases = []  # (name, text, ids, extra_pos)
    for name, text in PLAIN_CASES:
        cases.append((name, text, encode(text), []))
    for name, msgs in CHAT_CASES:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = encode(text)
        direct = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(direct, "keys"):
            direct = direct["input_ids"]
        assert list(direct) == ids, "chat template tokenization mismatch"
        cases.append((name, text, ids, []))
    name, text = SINGLE_CASE
    ids = encode(text)
    assert len(ids) == 1, ids
    cases.append((name, text, ids, []))
    ids = encode(MID_TEXT)
    assert 280 <= len(ids) <= 330, len(ids)
    n = len(ids)
    cases.append(("mid_300", MID_TEXT, ids, [0, n // 2, n - 2]))
    ids = encode(LONG_TEXT)
    assert 1000 <= len(ids) <= 1100, len(ids)
    cases.append(("long_1000", LONG_TEXT, ids, []))

    os.makedirs(args.out, exist_ok=True)
    index_lines = []
    summary = []
    for name, text, ids, extra_pos in cases:
        assert tok.decode(ids) == text or name.startswith("chat"), (name, tok.decode(ids))
        last, extra, gen, margins, mismatch, tfd = run_case(model, ids, extra_pos)
        rows = np.stack([t.numpy() for t in [last] + extra]).astype("<f4")
        assert rows.shape == (1 + len(extra_pos), n_vocab)
        assert np.all(np.isfinite(rows))
        with open(os.path.join(args.out, f"{name}.logits.f32"), "wb") as f:
            f.write(rows.tobytes())
        with open(os.path.join(args.out, f"{name}.tokens.txt"), "w") as f:
            f.write(" ".join(map(str, ids)) + "\n")
            f.write(" ".join(map(str, gen)) + "\n")
            f.write(" ".join("%.6g" % m for m in margins) + "\n")
            f.write(" ".join(map(str, extra_pos)) + "\n")
        with open(os.path.join(args.out, f"{name}.prompt.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        index_lines.append(f"{name} {len(ids)} {len(gen)} {len(extra_pos)}")
        eos = gen.index(cfg.eos_token_id) if cfg.eos_token_id in gen else -1
        mi = int(np.argmin(margins))
        summary.append(f"# {name}: n_prompt={len(ids)} first_eos_step={eos} "
                       f"min_margin={margins[mi]:.4g}@step{mi} "
                       f"cache_vs_batch_argmax_mismatch={mismatch} "
                       f"cache_vs_batch_last_maxdiff={tfd:.3g}")
        print(f"== {name} (n_prompt={len(ids)}, extra={extra_pos})")
        print("   prompt ids[:16]:", ids[:16])
        print("   greedy:", repr(tok.decode(gen)))
        print("   " + summary[-1][2:])
        sys.stdout.flush()

    with open(os.path.join(args.out, "index.txt"), "w") as f:
        f.write("# pdserve golden logits: HF transformers reference (eager attention, float32, CPU)\n")
        f.write(f"# torch {torch.__version__} transformers {transformers.__version__} "
                f"gguf {pkg_version('gguf')} numpy {np.__version__} tokenizers {tokenizers.__version__} "
                f"jinja2 {jinja2.__version__} accelerate {pkg_version('accelerate')}\n")
        f.write(f"# model: {model_file}  n_vocab={n_vocab}\n")
        f.write("# command: HF_HUB_OFFLINE=1 /opt/pdgolden/bin/python tests/golden/make_logits_golden.py\n")
        f.write("# format: name n_prompt n_gen n_extra_pos ; see tests/golden/README.md (logits section)\n")
        f.write("# greedy: argmax with KV cache, EOS (id 2 <|im_end|>) ignored, no penalties; no BOS added\n")
        for s in summary:
            f.write(s + "\n")
        for l in index_lines:
            f.write(l + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
