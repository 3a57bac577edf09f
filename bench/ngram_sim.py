#!/usr/bin/env python3
"""ngram_sim.py: n-gram prompt-lookup policies replayed on recorded greedy outputs (bench/spec --dump FILE).

Greedy verification keeps the longest prefix of the drafts that equals the model's own tokens, then adds the model's
next token. With the model's greedy output recorded, any proposer can be replayed offline: at each verification step
the history is the prompt plus the output up to the pending token, the proposer drafts from it, and the step emits
(matching drafts + 1) tokens. This gives tokens per step exactly, and an estimate of the speed-up from a table of what
a verification step of n tokens costs against a plain one (default: the H100's, SmolLM2 layout, one sequence, bench/
RESULTS.md spec session 14).

Usage: ngram_sim.py DUMP.jsonl [--workload rag] [--eos 2]
"""
import argparse
import json

# verification of n tokens (pending + drafts) against a plain step, one sequence, H100, SmolLM2 layout (1, 4, 5, 6, 8
# measured; between them interpolated; above 8 one more attention tile per 5 tokens, +0.05 each, a guess)
COST = {1: 1.0, 2: 1.03, 3: 1.07, 4: 1.10, 5: 1.12, 6: 1.17, 7: 1.17, 8: 1.17, 9: 1.19, 10: 1.20}


def cost(n):
    return COST.get(n, 1.20 + 0.05 * ((n - 10 + 4) // 5))


def find(hist, n_min, n_max, pick):
    """Continuation start of the last n tokens' earlier occurrence, n from n_max down; (start, backward match length)."""
    for n in range(min(n_max, len(hist) - 1), n_min - 1, -1):
        tail = hist[len(hist) - n:]
        best = None
        for start in range(len(hist) - n - 1, -1, -1):
            if hist[start:start + n] != tail:
                continue
            if pick == "recent":
                return start + n, n
            # "longest": the occurrence whose context matches furthest back (ties: the most recent)
            m = n
            while start - (m - n) - 1 >= 0 and hist[start - (m - n) - 1] == hist[len(hist) - m - 1] and m < 64:
                m += 1
            if best is None or m > best[1]:
                best = (start + n, m)
        if best:
            return best
    return None, 0


def replay(seqs, n_min, n_max, k_of, pick="recent"):
    emitted = steps = 0
    c = 0.0
    for prompt, out in seqs:
        i = 0  # out[i] is the pending token (prefill's first)
        while i < len(out) - 1:
            hist = prompt + out[:i + 1]
            frm, m = find(hist, n_min, n_max, pick)
            k = k_of(m) if frm is not None else 0
            drafts = hist[frm:frm + k] if frm is not None else []
            a = 0
            while a < len(drafts) and i + 1 + a < len(out) and drafts[a] == out[i + 1 + a]:
                a += 1
            emitted += a + 1
            steps += 1
            c += cost(len(drafts) + 1)
            i += a + 1
    return emitted / steps, emitted / c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dump")
    ap.add_argument("--workload", default="rag")
    ap.add_argument("--eos", type=int, default=2)
    a = ap.parse_args()
    seqs = []
    for line in open(a.dump):
        j = json.loads(line)
        if j["workload"] != a.workload:
            continue
        out = j["out"]
        if a.eos in out:
            out = out[:out.index(a.eos) + 1]
        seqs.append((j["prompt"], out))
    assert seqs, "no sequences of that workload"
    print(f"{len(seqs)} sequences, {sum(len(o) for _, o in seqs)} output tokens")
    print("| policy | tokens/step | est. speed-up |")
    print("| --- | --- | --- |")
    rows = []
    for n_min, n_max in [(2, 4), (1, 4), (2, 8), (3, 8), (2, 16)]:
        for k in [3, 5, 7, 9]:
            rows.append((f"n {n_min}-{n_max}, recent, k {k}", n_min, n_max, lambda m, k=k: k, "recent"))
    for n_min, n_max in [(2, 4), (2, 8)]:
        for k in [5, 7, 9]:
            rows.append((f"n {n_min}-{n_max}, longest, k {k}", n_min, n_max, lambda m, k=k: k, "longest"))
            rows.append((f"n {n_min}-{n_max}, longest, k min({k}, match)", n_min, n_max,
                         lambda m, k=k: max(1, min(k, m)), "longest"))
            rows.append((f"n {n_min}-{n_max}, longest, k min({k}, 2 match)", n_min, n_max,
                         lambda m, k=k: max(1, min(k, 2 * m)), "longest"))
    for name, n_min, n_max, k_of, pick in rows:
        tps, sp = replay(seqs, n_min, n_max, k_of, pick)
        print(f"| {name} | {tps:.3f} | {sp:.3f} |")


if __name__ == "__main__":
    main()
