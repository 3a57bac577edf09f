#!/usr/bin/env python3
"""check_quoting.py: do the RAG answers of a running cluster really copy their prompt? Sends prompts of a
workload file as chat messages to the router's OpenAI-compatible HTTP API (greedy, max_tokens from the
file) and prints, per prompt and overall, the fraction of the answer's word 3-grams that occur in the
prompt (what n-gram prompt lookup can draft), and for prompts with a "quote" how much of it the answer
reproduced. Stdlib only; a few requests at once (a measurement of the text, not of speed; keep --jobs
within what the decode worker's KV pool holds, or the router answers 429).
Run: python3 bench/workloads/check_quoting.py --url http://127.0.0.1:PORT [--file rag.jsonl] [--n 8]
"""
import argparse
import concurrent.futures
import json
import os
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def ngrams(words, n=3):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def copied_fraction(answer, source, n=3):
    """Fraction of the answer's word n-grams found in source (None for answers under n words)."""
    grams = ngrams(answer.split(), n)
    if not grams:
        return None
    have = set(ngrams(source.split(), n))
    return sum(g in have for g in grams) / len(grams)


def chat(url, prompt, max_tokens, timeout):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="router HTTP base URL")
    ap.add_argument("--file", default=os.path.join(HERE, "rag.jsonl"))
    ap.add_argument("--n", type=int, default=0, help="first N prompts only (0 = all)")
    ap.add_argument("--stride", type=int, default=1, help="every STRIDE-th prompt")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--jobs", type=int, default=4, help="requests in flight")
    ap.add_argument("--show", action="store_true", help="print each answer")
    a = ap.parse_args()
    with open(a.file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][::a.stride]
    if a.n:
        rows = rows[:a.n]
    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as ex:
        answers = list(ex.map(lambda r: chat(a.url, r["prompt"], r.get("max_tokens", 128), a.timeout), rows))
    fr, qr = [], []
    for r, ans in zip(rows, answers):
        f = copied_fraction(ans, r["prompt"])
        q = copied_fraction(r["quote"], ans) if "quote" in r else None
        fr.append(f or 0.0)
        if q is not None:
            qr.append(q)
        print(f"{r.get('id', '?')}: answer 3-grams in prompt {0 if f is None else f:.2f}"
              + (f", quote 3-grams in answer {q:.2f}" if q is not None else ""), flush=True)
        if a.show:
            print("  " + ans.replace("\n", "\n  "), flush=True)
    if fr:
        print(f"overall: {len(fr)} prompts, mean answer 3-grams found in prompt {sum(fr) / len(fr):.3f}"
              + (f", mean quote recall {sum(qr) / len(qr):.3f}" if qr else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
