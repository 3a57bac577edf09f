#!/usr/bin/env python3
"""make_tok_golden.py: writes tests/golden/tok/, the reference data for tests/unit/engine/test_eng_tok.c and
test_eng_chat.c.

Reference: the Hugging Face `tokenizers` library configured as SmolLM2-135M-Instruct's published
tokenizer.json, rebuilt from the GGUF's own vocabulary and merges (no package ships that tokenizer.json):
  BPE(vocab, merges, no unk, no byte fallback, ignore_merges=false)
  pre_tokenizer Sequence[Digits(individual_digits=true), ByteLevel(add_prefix_space=false, use_regex=true)]
  decoder ByteLevel; no normalizer; the 17 CONTROL tokens added as AddedToken(special=True, normalized=False).
parse_special=false is the same tokenizer with encode_special_tokens=True (special tokens encoded as text);
it is checked against a second tokenizer without the added tokens. Invalid UTF-8 inputs go through
bytes.decode('utf-8', 'replace') first, as the C tokenizer does.

Chat renderings come from transformers' apply_chat_template with the GGUF's tokenizer.chat_template.
transformers' own GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)) is cross-checked and
its differences are written to tok/crosscheck.txt (it has no Digits pre-tokenizer).

Files (all line-based, hex for bytes so the C test needs no JSON or escaping):
  encode.tsv  HEX_INPUT <TAB> IDS_PARSE_SPECIAL <TAB> IDS_AS_TEXT, or '=' when both are equal
  decode.tsv  IDS <TAB> HEX_OUTPUT            (tokenizers decode, skip_special_tokens=False)
  chat.txt    blocks: 'case NAME GEN' / 'template HEX' (optional) / 'msg HEX_ROLE HEX_CONTENT'... /
              'expect HEX', and 'reject HEX_TEMPLATE' lines for templates the C side must refuse
Deterministic (fixed seed). Run: /opt/pdgolden/bin/python tests/golden/make_tok_golden.py [--model P] [--out D]
"""
import argparse
import importlib.metadata
import os
import random
import sys

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 20241101


def default_model_path():
    """Same lookup as pd_test_model_path() in tests/pd_test.h."""
    if os.environ.get("PDSERVE_MODEL"):
        return os.environ["PDSERVE_MODEL"]
    models_dir = os.environ.get("PDSERVE_MODELS") or os.path.expanduser("~/.cache/pdserve/models")
    return os.path.join(models_dir, MODEL_FILE)


# ---- the reference tokenizer ----

def read_gguf(path):
    r = gguf.GGUFReader(path)

    def strs(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar_str(key):
        f = r.fields[key]
        return bytes(f.parts[f.data[0]]).decode("utf-8")

    tt = r.fields["tokenizer.ggml.token_type"]
    meta = {
        "tokens": strs("tokenizer.ggml.tokens"),
        "merges": [tuple(m.split(" ")) for m in strs("tokenizer.ggml.merges")],
        "types": [int(tt.parts[i][0]) for i in tt.data],
        "model": scalar_str("tokenizer.ggml.model"),
        "pre": scalar_str("tokenizer.ggml.pre"),
        "chat_template": scalar_str("tokenizer.chat_template"),
    }
    assert meta["model"] == "gpt2" and meta["pre"] == "smollm", (meta["model"], meta["pre"])
    return meta


def build_reference(meta, with_added=True):
    vocab = {t: i for i, t in enumerate(meta["tokens"])}
    assert len(vocab) == len(meta["tokens"]), "duplicate vocabulary strings"
    tk = Tokenizer(models.BPE(vocab, meta["merges"], fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    if with_added:
        specials = [t for t, ty in zip(meta["tokens"], meta["types"]) if ty in (3, 4)]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        for t in specials:
            assert tk.token_to_id(t) == vocab[t]
    return tk


# ---- the corpus ----

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.",
    "In 1492, Columbus sailed the ocean blue; in 1969, Apollo 11 landed on the Moon at 20:17 UTC.",
    "She said: \"I don't know why they'll never say it's fine, but we've seen it.\"",
    "I'M SHOUTING, YOU'RE WHISPERING, THEY'LL NEVER HEAR. He's here; she'd left; we're done.",
    "Don't stop believin'... 'cause 'twas the night before Christmas ''s '''re",
    "E-mail me at john.doe+test@example.com or visit https://example.org/path?q=1&x=2#frag.",
    "Mr. and Mrs. Dursley, of number four, Privet Drive, were proud to say that they were perfectly normal.",
    "The mitochondria is the powerhouse of the cell, producing ATP via oxidative phosphorylation.",
    "Prices rose 3.5% in Q3 2023, to $1,299.99 (up from $999) -- a 30% jump!",
    "A well-known, state-of-the-art, hard-to-find, one-of-a-kind item.",
    "What's the time? It's 10:45 a.m. on Tuesday, March 5th, 2024.",
    "Call me Ishmael. Some years ago -- never mind how long precisely -- having little or no money in my purse.",
    "Transformers use self-attention; the cost grows as O(n^2) in the sequence length n.",
    "He paid \u00a3100 and \u20ac250 and \u00a55000 for three tickets.",
    "\u201cSmart quotes\u201d and \u2018single ones\u2019 \u2014 with an em dash \u2013 and an en dash\u2026",
    "Tab\tseparated\tvalues\there",
    "Line one\nLine two\n\nLine four after a blank line\n",
    "Windows line endings\r\nare here\r\n\r\nand here",
    "   leading spaces and trailing spaces   ",
    "multiple    internal     spaces      here",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about autumn leaves falling gently on a quiet pond.",
]

CODE = [
    "#include <stdio.h>\n\nint main(void) {\n    printf(\"Hello, %s!\\n\", \"world\");\n    return 0;\n}\n",
    "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n",
    "const add = (a, b) => a + b;\nconsole.log(`sum = ${add(2, 3)}`); // 5\n",
    "fn main() {\n    let v: Vec<i32> = (1..=10).filter(|x| x % 2 == 0).collect();\n    println!(\"{:?}\", v);\n}\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "SELECT id, name, COUNT(*) AS n FROM users u JOIN orders o ON o.user_id = u.id WHERE u.age >= 18 "
    "GROUP BY id HAVING n > 3;",
    "<!DOCTYPE html>\n<html lang=\"en\">\n  <head><title>Test</title></head>\n  <body><p class='x'>Hi &amp; bye</p>"
    "</body>\n</html>",
    "{\"name\": \"pdserve\", \"version\": \"0.1.0\", \"tags\": [\"llm\", \"serving\"], \"ok\": true, \"n\": null}",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do\n  wc -l \"$f\" | awk '{print $1}'\ndone\n",
    "\\begin{equation}\n  E = mc^2 \\quad \\text{and} \\quad \\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}\n"
    "\\end{equation}",
    "x = [i**2 for i in range(100) if i % 3 == 0]\nprint(sum(x) / len(x))\n",
    "    if (a != b && c <= d || !e) { x += 1; y -= 2; z *= 3; w /= 4; }",
    "public static void main(String[] args) throws IOException {\n\tSystem.out.println(args.length);\n}",
    "  \t  mixed indentation\n\t\tdouble tab\n        eight spaces\n",
    "a=1;b=2;c=a+b;d=a*b-c/2;e=(a+b)*(c-d)%7;f=a<<2|b>>1&c^d;",
    "// comment\n/* block\n   comment */\n# hash comment\n-- sql comment\n",
]

NUMBERS = [
    "12345", "3.14159", "1,000,000", "2024-01-15", "+1 (555) 123-4567", "0x1F 0b1010 0o777", "1e-9 6.022e23",
    "a1b2c3", "abc123def456", "100%", "v1.2.3-rc.4", "192.168.0.1", "$5", "5$", "-42", "--42", " 7", "  7",
    "   7", "\t7", "\n7", "x 1 2 3", "x  12", "007", "1/2 3/4", "99 bottles of beer", "Room 101, floor 3",
    "\uff11\uff12\uff13 fullwidth", "\u0660\u0661\u0662 arabic-indic", "\u0966\u0967\u0968 devanagari",
    "x\u00b2 + y\u00b3", "\u00bd \u00bc \u00be fractions", "\u216b \u2163 roman", "\u2460\u2461\u2462 circled",
    "\U00011de0\U00011de1 Unicode 17 digits", "\U00016ff4 Unicode 17 number",
    "1" * 40, "0123456789" * 5, " " + "9" * 25, "3.141592653589793238462643383279",
]

WHITESPACE = [
    " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n\n", " \n ", "\t \t", "a ", " a", "a  ", "  a", "a \n b", "a\n\n b",
    "a \t b", "a\u00a0b", "a\u00a0\u00a0b", "a\u3000b", "a\u2028b", "a\u2029b", "a\u2003\u2003b", "a\x0bb",
    "a\x0cb", "a\x1cb\x1db\x1eb\x1fb", "a\u200bb zero width", "a\u180eb mongolian", "a\u0085b nel",
    "a\u202fb\u205fb", "end with spaces    ", "end with newline\n", "\n\nstart with newlines", " " * 50,
    "x" + " " * 17 + "y", "x" + "\n" * 9 + "y", "x \n\n\t  \r\n y", "a\x00b nul", "a\x7fb del", "a\x01\x02\x03b",
]

MULTILINGUAL = [
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u8fd9\u662f\u4e00\u4e2a\u6d4b\u8bd5\u3002",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u30ab\u30bf\u30ab\u30ca \u30fc",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4",
    "\u0420\u043e\u0441\u0441\u0438\u044f \u0438 \u0423\u043a\u0440\u0430\u0457\u043d\u0430, \u043f\u0440\u0438\u0432\u0435\u0442!",
    "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u03ba\u03cc\u03c3\u03bc\u03b5",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e, \u0915\u094d\u092f\u093e \u0939\u093e\u0932 \u0939\u0948?",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade \u00c5ngstr\u00f6m \u00fcber Stra\u00dfe",
    "Cafe\u0301 combining acute, n\u0303, a\u0308",
    "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u",
    "\u00bfQu\u00e9 tal? \u00a1Muy bien! \u00c7a va tr\u00e8s bien, merci.",
    "Z\u00fcrich, K\u00f8benhavn, \u0141\u00f3d\u017a, \u0130stanbul, Reykjav\u00edk",
    "\u1c89\u1c8a new Unicode 16 letters \ua7cb\ua7cc",
]

EMOJI = [
    "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
    "\U0001f1fa\U0001f1f8\U0001f1ef\U0001f1f5 flags", "\u2764\ufe0f heart", "1\ufe0f\u20e3 keycap",
    "\U0001f3f3\ufe0f\u200d\U0001f308 rainbow flag", "I love \U0001f355 and \U0001f363!!! \U0001f602\U0001f602",
    "\U0001f9d1\U0001f3fe\u200d\U0001f4bb coder", "emoji\U0001f600text\U0001f600", " \U0001f600 \U0001f600 ",
    "\u2603\u2605\u2620 symbols \u00a9\u00ae\u2122", "math \u2200x\u2208\u211d: x\u00b2 \u2265 0 \u21d2 \u221a",
]

SPECIAL = [
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|><|im_start|>", "<|endoftext|>", "abc<|endoftext|>def", " <|im_end|> ", "<<|im_start|>>",
    "<|im_start", "<|im_start|", "<|IM_START|>", "<|im_start|><|im_start|>", "<repo_name><reponame>x",
    "<file_sep>main.c<filename>a.py<gh_stars>100", "<issue_start><issue_comment><issue_closed>",
    "<jupyter_start><jupyter_text>t<jupyter_code>c<jupyter_output>o<jupyter_script><empty_output>",
    "text with <|im_end|>inside and 12<|im_end|>34", "<|im_end|>\n\n<|im_end|>  ", "<|<|im_end|>|>",
]

INVALID = [
    b"\xff", b"\xfe\xff", b"abc\x80def", b"\xe2\x82", b"\xe2\x82abc", b"\xed\xa0\x80 surrogate", b"\xc0\xaf overlong",
    b"\xf4\x90\x80\x80 too big", b"end \xf0\x9f\x98", b"\xf0\x9f\x98\x80\xf0\x9f", b"\x80\x80\x80", b"a\xc3",
    b"\xc3\x28", b"\xe0\x80\x80", b"\xf8\x88\x80\x80\x80", b"ok \xce\xbb \xce", b"<|im_end|>\xff<|im_start|>",
    b"12\xff34", b"\xc2 \xc2\xa0", b"\xef\xbf\xbd literal replacement char",
]


def random_text(rng):
    """Strings over an alphabet that stresses the pre-tokenizer: letters, digits, spaces, punctuation,
    apostrophes, newlines, non-ASCII of every class."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "     ", "\t\n\r",
        "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~", "''''", "sdtmlrev",
        "\u00e9\u00f1\u00fc\u00df\u0101\u0432\u043b\u03b1\u05d0\u0627\u0915\u094d\u0301",
        "\u4e2d\u6587\u65e5\u672c\ud55c\u3042\u30a2", "\u00a0\u3000\u2028\u200b\u2003",
        "\u00b2\u00bd\u0663\u0967\uff15\u2163", "\U0001f600\U0001f44d\u200d\ufe0f\U0001f3fd",
        "\u00a9\u2014\u2026\u201c\u201d\u00bf",
    ]
    n = rng.randint(1, 60)
    weights = [10, 5, 6, 3, 4, 2, 3, 3, 2, 1, 1, 1, 1]
    return "".join(rng.choice(rng.choices(pools, weights)[0]) for _ in range(n))


def build_corpus(rng, meta):
    cases = [s.encode("utf-8") for s in PROSE + CODE + NUMBERS + WHITESPACE + MULTILINGUAL + EMOJI + SPECIAL]
    cases += INVALID
    cases.append(" ".join(PROSE).encode("utf-8"))  # one long paragraph
    cases.append(("\n".join(CODE) * 3).encode("utf-8"))
    # sentences glued with special tokens, digits, emoji
    for _ in range(60):
        parts = rng.sample(PROSE + MULTILINGUAL + EMOJI + NUMBERS, 3)
        glue = rng.choice(["", " ", "\n", "<|im_end|>", "<|im_start|>user\n", "  ", "\t", "7", "'s "])
        cases.append(glue.join(parts).encode("utf-8"))
    for _ in range(320):
        cases.append(random_text(rng).encode("utf-8"))
    for _ in range(30):  # random bytes: mostly invalid UTF-8
        cases.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 24))))
    for _ in range(20):  # valid text cut at a random byte
        s = rng.choice(MULTILINGUAL + EMOJI).encode("utf-8")
        cases.append(s[:rng.randint(1, len(s))])
    # every vocabulary string of a few random tokens, as text (exercises the merges of long tokens)
    normal = [t for t, ty in zip(meta["tokens"], meta["types"]) if ty == 1]
    for _ in range(40):
        cases.append(bytearray_of_tokens(rng.sample(normal, rng.randint(1, 6))))
    seen, out = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


BYTE_TO_CHAR = {}


def init_byte_map():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    for b, c in zip(bs, cs):
        BYTE_TO_CHAR[b] = chr(c)


def bytearray_of_tokens(toks):
    char_to_byte = {c: b for b, c in BYTE_TO_CHAR.items()}
    return bytes(char_to_byte[ch] for t in toks for ch in t)


# ---- writers ----

def ids_str(ids):
    return " ".join(str(i) for i in ids)


def write_encode(path, corpus, ref):
    lines = []
    for raw in corpus:
        text = raw.decode("utf-8", "replace")
        ref.encode_special_tokens = False
        a = ref.encode(text, add_special_tokens=False).ids
        ref.encode_special_tokens = True
        b = ref.encode(text, add_special_tokens=False).ids
        ref.encode_special_tokens = False
        lines.append("%s\t%s\t%s" % (raw.hex(), ids_str(a), "=" if a == b else ids_str(b)))
    with open(path, "w") as f:
        f.write("# HEX_INPUT\tIDS_PARSE_SPECIAL\tIDS_AS_TEXT ('=' when equal); see make_tok_golden.py\n")
        f.write("\n".join(lines) + "\n")
    return len(lines)


def check_as_text(corpus, ref, plain):
    """encode_special_tokens=True must equal a tokenizer that has no added tokens at all."""
    ref.encode_special_tokens = True
    bad = [c for c in corpus if ref.encode(c.decode("utf-8", "replace"), add_special_tokens=False).ids !=
           plain.encode(c.decode("utf-8", "replace"), add_special_tokens=False).ids]
    ref.encode_special_tokens = False
    if bad:
        sys.exit("make_tok_golden: encode_special_tokens differs from a tokenizer without added tokens: %r" % bad[:3])


def decode_cases(rng, meta, ref, corpus):
    vocab = {t: i for i, t in enumerate(meta["tokens"])}
    # SmolLM2's vocabulary lacks 21 of the 256 byte tokens (0x04, 0xC0, 0xF5..0xFF, ...): encode drops
    # those bytes, as HF's BPE without unk_token does
    byte_tok = [vocab[BYTE_TO_CHAR[b]] for b in range(256) if BYTE_TO_CHAR[b] in vocab]
    n_vocab = len(meta["tokens"])
    cases = [[t] for t in byte_tok]  # every single byte
    for s in ["\U0001f600", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\u4e2d\u6587", "\u00e9", "\u20ac"]:
        bt = [vocab[BYTE_TO_CHAR[b]] for b in s.encode("utf-8")]
        cases.append(bt)
        for cut in range(1, len(bt)):
            cases.append(bt[:cut])  # truncated at the end
            cases.append(bt[:cut] + [vocab["a"]])  # truncated, then ASCII
            cases.append(bt[:cut] + bt)  # truncated, then a whole character
        cases.append([vocab["<|im_start|>"]] + bt + [vocab["<|im_end|>"]])
    for _ in range(300):
        n = rng.randint(1, 12)
        ids = []
        for _ in range(n):
            r = rng.random()
            if r < 0.1:
                ids.append(rng.randrange(17))  # special
            elif r < 0.5:
                ids.append(rng.choice(byte_tok))
            else:
                ids.append(rng.randrange(n_vocab))
        cases.append(ids)
    for raw in corpus[::5]:
        cases.append(ref.encode(raw.decode("utf-8", "replace"), add_special_tokens=False).ids)
    lines = []
    for ids in cases:
        text = ref.decode(ids, skip_special_tokens=False)
        lines.append("%s\t%s" % (ids_str(ids), text.encode("utf-8").hex()))
    return lines


def chat_cases(template):
    sys_msg = {"role": "system", "content": "You are a terse assistant."}
    u1 = {"role": "user", "content": "Hello!"}
    a1 = {"role": "assistant", "content": "Hi! How can I help you today?"}
    u2 = {"role": "user", "content": "What is 2+2? Answer in one word."}
    uni = {"role": "user", "content": "\u4f60\u597d \U0001f600 caf\u00e9 \u0645\u0631\u062d\u0628\u0627\nnew line\ttab"}
    tricky = {"role": "user", "content": "<|im_start|>system\nignore {{ braces }} {% raw %} '\"\\ <|im_end|>"}
    empty = {"role": "user", "content": ""}
    tool = {"role": "tool", "content": "{\"temp\": 21}"}
    convs = [
        ("single_user", [u1]), ("system_user", [sys_msg, u1]), ("multi_turn", [u1, a1, u2]),
        ("system_multi_turn", [sys_msg, u1, a1, u2]), ("unicode", [uni]), ("tricky", [tricky]),
        ("empty_content", [empty]), ("other_role", [u1, a1, tool]),
        ("assistant_first", [a1, u1]), ("two_systems", [sys_msg, sys_msg, u1]),
    ]
    plain_chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
                    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    pretty_chatml = ("{%- for message in messages %}\n    {{- \"<|im_start|>\" + message[\"role\"] + \"\\n\" + "
                     "message[\"content\"] + \"<|im_end|>\\n\" }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
                     "    {{- \"<|im_start|>assistant\\n\" }}\n{%- endif %}\n")
    other_sys = template.replace("named SmolLM, trained by Hugging Face", "called \\'Q\\', made by \"us\"")
    out = []
    for name, msgs in convs:
        for gen in (False, True):
            out.append((name, gen, None, msgs))
    for tname, t in (("plain_chatml", plain_chatml), ("pretty_chatml", pretty_chatml), ("other_system", other_sys)):
        for name, msgs in (("single_user", [u1]), ("system_multi_turn", [sys_msg, u1, a1, u2])):
            out.append((tname + "." + name, True, t, msgs))
    rejects = [
        # Llama 3 (not ChatML)
        "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>' }}{% endfor %}",
        # ChatML markers with extra logic (Qwen-style tools branch)
        "{% if tools %}{{ '<|im_start|>system\\n' + tools | tojson + '<|im_end|>\\n' }}{% endif %}" + plain_chatml,
        # ChatML that trims content
        plain_chatml.replace("message['content']", "message['content'] | trim"),
        # plain text
        "hello",
    ]
    return out, rejects


def write_chat(path, template, tok_cls, ref):
    cases, rejects = chat_cases(template)
    lines = ["# see make_tok_golden.py; hex strings, GEN is add_generation_prompt"]
    rendered = []
    for name, gen, tmpl, msgs in cases:
        t = tok_cls(tokenizer_object=ref)
        t.chat_template = tmpl if tmpl is not None else template
        text = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        lines.append("case %s %d" % (name, int(gen)))
        if tmpl is not None:
            lines.append("template " + tmpl.encode("utf-8").hex())
        for m in msgs:
            lines.append("msg %s %s" % (m["role"].encode().hex(), m["content"].encode("utf-8").hex()))
        lines.append("expect " + text.encode("utf-8").hex())
        rendered.append((name, gen, tmpl, msgs, text))
    for r in rejects:
        lines.append("reject " + r.encode("utf-8").hex())
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return rendered


def crosscheck_transformers(model_path, corpus, ref, cases):
    """transformers' own GGUF tokenizer against the reference; returns report lines."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path))
    n_diff, examples = 0, []
    for raw in corpus:
        text = raw.decode("utf-8", "replace")
        a = ref.encode(text, add_special_tokens=False).ids
        b = hf.encode(text, add_special_tokens=False)
        if a != b:
            n_diff += 1
            if len(examples) < 8:
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                examples.append("  %r: from id %d on, reference %s, transformers-gguf %s" %
                                (text[:40], k, a[k:k + 6], b[k:k + 6]))
    n_chat_diff = 0
    for name, gen, tmpl, msgs, text in cases:
        if tmpl is None and hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) != text:
            n_chat_diff += 1
    pt = hf.backend_tokenizer.pre_tokenizer.__getstate__() if hasattr(hf, "backend_tokenizer") else b"?"
    return [
        "transformers %s AutoTokenizer.from_pretrained(gguf_file=...) vs the reference:" %
        importlib.metadata.version("transformers"),
        "  pre_tokenizer there: %s" % (pt.decode() if isinstance(pt, bytes) else pt),
        "  encode: %d of %d corpus strings differ" % (n_diff, len(corpus)),
    ] + examples + ["  apply_chat_template: %d of the GGUF-template chat cases differ" % n_chat_diff]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tok"))
    ap.add_argument("--no-crosscheck", action="store_true", help="skip transformers' GGUF tokenizer")
    args = ap.parse_args()
    if not os.path.exists(args.model):
        sys.exit("make_tok_golden: model not found: %s (scripts/fetch_model.sh)" % args.model)
    init_byte_map()
    rng = random.Random(SEED)
    meta = read_gguf(args.model)
    ref = build_reference(meta)
    plain = build_reference(meta, with_added=False)
    os.makedirs(args.out, exist_ok=True)

    corpus = build_corpus(rng, meta)
    check_as_text(corpus, ref, plain)
    n_enc = write_encode(os.path.join(args.out, "encode.tsv"), corpus, ref)
    dec = decode_cases(rng, meta, ref, corpus)
    with open(os.path.join(args.out, "decode.tsv"), "w") as f:
        f.write("# IDS\tHEX_OUTPUT (tokenizers decode, skip_special_tokens=False); see make_tok_golden.py\n")
        f.write("\n".join(dec) + "\n")

    from transformers import PreTrainedTokenizerFast
    cases = write_chat(os.path.join(args.out, "chat.txt"), meta["chat_template"], PreTrainedTokenizerFast,
                               ref)
    report = ["reference: tokenizers %s, rebuilt from %s" % (importlib.metadata.version("tokenizers"),
                                                             os.path.basename(args.model))]
    if not args.no_crosscheck:
        report += crosscheck_transformers(args.model, corpus, ref, cases)
    with open(os.path.join(args.out, "crosscheck.txt"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("make_tok_golden: %d encode cases, %d decode cases, %d chat cases -> %s" %
          (n_enc, len(dec), len(cases), args.out))
    print("\n".join(report))


if __name__ == "__main__":
    main()
