#!/usr/bin/env python3
"""make_spec_workloads.py: writes the prompt files of the speculative-decoding benchmark
(bench/run_spec_bench.sh), rag.jsonl and chat.jsonl, next to this script.

rag.jsonl: 40 prompts, each a document of 1000-2000 tokens (a window of whole paragraphs of a license
text from /usr/share/common-licenses, present on every Debian machine) followed by a question whose
answer quotes the document (copy the paragraph that starts with given words). Answers that copy the
prompt are what n-gram prompt lookup is made for.
chat.jsonl: 40 ordinary chat prompts (questions, instructions, small stories) that share nothing with a
document: the case where speculation should not pay and must not cost much.

Each line is {"prompt": USER_MESSAGE, "max_tokens": 128, ...}: "prompt" is meant to be sent as the one
user turn of a chat (the model's chat template, generation prompt added), not as a raw completion. Extra
keys (ignored by pdctl bench): "id", "source", "doc_tokens", "prompt_tokens" (tokens of the user message
alone, before the template adds its ~30), "count" (how tokens were counted: exact or approx_4chars), and
for RAG "quote" (the passage the answer should copy).

Tokens are counted with the reference tokenizer of tests/golden/make_tok_golden.py (the Hugging Face
`tokenizers` library rebuilt from the GGUF, exact with engine/eng_tok.c), which needs the `gguf` and
`tokenizers` packages (e.g. /opt/pdtools/bin/python); without them the script approximates 1 token per 4
characters, says so, and the windows come out different. The committed files were made with the exact
tokenizer. Deterministic: the same Python version, license files and seed give the same files.
Run: /opt/pdtools/bin/python bench/workloads/make_spec_workloads.py [--model GGUF] [--out DIR]
"""
import argparse
import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SEED = 20250502
MAX_TOKENS = 128
N_RAG = 40
DOC_MIN, DOC_MAX = 1000, 2000  # document tokens, inclusive

# Distinct texts only (GPL, LGPL and GFDL are links to the newest versions).
LICENSES = ["Apache-2.0", "Artistic", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2", "GPL-3", "LGPL-2",
            "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0"]
LICENSE_DIR = "/usr/share/common-licenses"

# ---- token counting ----


def make_counter(model):
    """A function text -> token count: exact when gguf + tokenizers import, else len/4."""
    try:
        sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
        import make_tok_golden as mtg  # noqa: E402 (needs gguf, tokenizers)
        tk = mtg.build_reference(mtg.read_gguf(model or mtg.default_model_path()))
        return (lambda s: len(tk.encode(s, add_special_tokens=False).ids)), "exact"
    except Exception as e:  # missing packages or model: the documented fallback
        print(f"make_spec_workloads: no exact tokenizer ({e}); approximating 1 token = 4 characters",
              file=sys.stderr)
        return (lambda s: (len(s) + 3) // 4), "approx_4chars"


# ---- documents: lists of paragraphs ----


def license_paragraphs(name):
    """Paragraphs of a license text, each reflowed onto one line (the wrapping is typesetting, not content;
    one-line paragraphs let an answer match the document token for token)."""
    with open(os.path.join(LICENSE_DIR, name), encoding="utf-8") as f:
        text = f.read()
    paras = []
    for block in re.split(r"\n\s*\n", text):
        words = block.split()
        if words and not all(set(w) <= set("=-_*") for w in words):
            paras.append(" ".join(words))
    return paras


# ---- questions ----
# What SmolLM2-135M-Instruct does with them (greedy; bench/workloads/check_quoting.py, mean fraction of the
# answer's word 3-grams found in the prompt, 8-16 prompts per wording): naming the passage by its first six
# words after the document works best. Over 10 prompts each of a 40-prompt run: 0.42, 0.41 and 0.33 for
# the three templates below (chat.jsonl: 0.017); single tries on 8-16 prompts:
# ("Copy the paragraph that starts with ... word for word" 0.42-0.55;
# "what does the text say right after ..." 0.41-0.49; "Here is a document: ... Task: find the paragraph ...
# and write it out again" 0.33-0.57). Worse: "Quote the sentence/paragraph that contains ..." (0.20-0.44),
# giving both ends of the paragraph (0.22), the question before and after the document (0.28-0.53), the
# document in <document> tags (0.32), marking the passage in bold, with >>> or BEGIN/END QUOTE (0.28-0.50),
# "the first/last paragraph" (0.28-0.31), "repeat the text from its beginning" (0.37), a summary with
# quotes (0.21), keeping the license's line wrapping (0.26-0.48), pydoc text (0.05). The model often
# copies the wrong paragraph or a paragraph and then its neighbours: fine for n-gram lookup, which only
# needs the answer to repeat the prompt. Each template: (text before the document, question after it,
# what the answer should copy: "para" the paragraph, "rest" the paragraph after the quoted start).

RAG_TEMPLATES = [
    ("", 'Copy the paragraph that starts with "{start}" word for word.', "para"),
    ("", 'What does the text above say, word for word, right after "{start}"?', "rest"),
    ("Here is a document:\n\n", 'Task: find the paragraph that starts with "{start}" and write it out again, '
     "word for word.", "para"),
]


def first_words(p, n):
    return " ".join(p.split()[:n])


def pick_window(paras, counts, rng):
    """A run of at least 4 whole paragraphs whose tokens (joined by blank lines) fall in [DOC_MIN,
    DOC_MAX], or None when the text is too short."""
    if sum(counts) + 2 * len(counts) < DOC_MIN:
        return None
    target = rng.randint(DOC_MIN + 100, DOC_MAX - 100)
    for _ in range(100):
        i = rng.randrange(len(paras))
        j, n = i, 0
        while j < len(paras) and n + counts[j] + 2 <= target:
            n += counts[j] + 2
            j += 1
        if n >= DOC_MIN and j - i >= 4:
            return i, j
    return None


def quotable(p):
    """A paragraph worth copying: prose of 20-90 words (not a heading, not a wall of text)."""
    return 20 <= len(p.split()) <= 90


def make_question(paras, cands, kind_tpl, rng):
    """(question, quote) for one template, or None when the window has nothing that fits it."""
    pre, tpl, kind = kind_tpl
    rng.shuffle(cands)
    for q in cands:
        para = paras[q]
        start = first_words(para, 6)
        if sum(p.startswith(start) for p in paras) != 1:
            continue  # the start must name one paragraph of the document
        quote = para if kind == "para" else " ".join(para.split()[6:])
        return pre, tpl.format(start=start), quote
    return None


def make_rag(count, rng):
    sources = [(name, license_paragraphs(name)) for name in LICENSES]
    counts = {name: [count(p) for p in paras] for name, paras in sources}
    rows, k = [], 0
    while len(rows) < N_RAG:
        name, paras = sources[k % len(sources)]
        tpl = RAG_TEMPLATES[len(rows) % len(RAG_TEMPLATES)]
        k += 1
        win = pick_window(paras, counts[name], rng)
        if not win:
            continue
        i, j = win
        made = make_question(paras[i:j], [q - i for q in range(i + 2, j) if quotable(paras[q])], tpl, rng)
        if not made:
            continue
        pre, question, quote = made
        doc = "\n\n".join(paras[i:j])
        if not DOC_MIN <= count(doc) <= DOC_MAX:
            continue  # the window's estimate of the joins was off
        prompt = f"{pre}{doc}\n\n{question}"
        rows.append({"id": f"rag-{len(rows):02d}", "prompt": prompt, "max_tokens": MAX_TOKENS, "source": name,
                     "doc_tokens": count(doc), "prompt_tokens": count(prompt), "quote": quote})
    return rows


# ---- chat: ordinary requests with nothing to copy ----

CHAT_PROMPTS = [
    "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?",
    "Explain in simple terms how a rainbow forms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
    "How do I make a simple tomato sauce for pasta?",
    "Why is the sky blue?",
    "Describe a day in the life of a honeybee.",
    "What are the main causes of the French Revolution?",
    "Write a polite email asking a colleague to review my report by Friday.",
    "Explain what a black hole is to a ten-year-old.",
    "List five healthy snacks that are easy to prepare.",
    "Tell me a story about a dragon who is afraid of the dark.",
    "What is photosynthesis?",
    "How can I stay focused while studying at home?",
    "Write a short poem about the ocean at night.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Explain the rules of chess in a few sentences.",
    "Why do cats purr?",
    "Write a short dialogue between a robot and a gardener.",
    "What are the benefits of learning a second language?",
    "How does a bicycle stay upright when it is moving?",
    "Give me an idea for a birthday party for a seven-year-old.",
    "Write a story about a lost umbrella that travels around the world.",
    "What is the difference between a virus and a bacterium?",
    "How do airplanes fly?",
    "Suggest a name for a small bakery and explain your choice.",
    "Write a limerick about a forgetful wizard.",
    "What happens to water when it freezes?",
    "Explain why exercise is good for the heart.",
    "Tell me about the history of the printing press.",
    "Write a short fairy tale about a fox and a crow.",
    "How do I start learning to play the guitar?",
    "What is the tallest mountain in the world, and how high is it?",
    "Describe the smell of rain to someone who has never experienced it.",
    "Write a motivational message for someone starting a new job.",
    "What are some good habits for saving money?",
    "Explain how the moon causes the tides.",
    "Write a story about a little boat that wants to see the sea.",
]


def make_chat(count):
    return [{"id": f"chat-{i:02d}", "prompt": p, "max_tokens": MAX_TOKENS, "source": "chat",
             "prompt_tokens": count(p)} for i, p in enumerate(CHAT_PROMPTS)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF for the tokenizer (default: the test model)")
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args()
    count, how = make_counter(a.model)
    rng = random.Random(SEED)
    assert len(CHAT_PROMPTS) == 40
    for name, rows in (("rag", make_rag(count, rng)), ("chat", make_chat(count))):
        with open(os.path.join(a.out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                r["count"] = how
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}.jsonl: {len(rows)} prompts, tokens {how}")


if __name__ == "__main__":
    main()
