#!/usr/bin/env python3
"""make_chatvar.py: writes chatvar.jsonl next to this script: chat.jsonl's prompts with output lengths drawn
uniformly from 64..192 tokens (seed 7) instead of 128 each.

Why: run_spec_bench.sh is a closed loop with ignore_eos. With equal lengths every stream of a concurrency-C cell
starts and ends together, so without speculation the C replacement prompts reach the prefill worker at once and
are prefilled in one batch; drafts desynchronise the streams and the same prompts then arrive one by one. That
difference, not the decode steps, is what chat at C = 32 measured as n-gram's loss on the H100 (bench/RESULTS.md,
spec, session 11). Real traffic has unequal lengths; this workload keeps the prompts and breaks the lockstep.
Standard library only. Run: python3 bench/workloads/make_chatvar.py
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    rng = random.Random(7)
    with open(os.path.join(HERE, "chat.jsonl")) as f, open(os.path.join(HERE, "chatvar.jsonl"), "w") as out:
        for line in f:
            d = json.loads(line)
            d["max_tokens"] = rng.randint(64, 192)
            out.write(json.dumps(d) + "\n")


if __name__ == "__main__":
    main()
