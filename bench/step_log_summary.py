#!/usr/bin/env python3
"""step_log_summary.py: where a decode worker's time went, from its DC_STEP_LOG file (one CSV line per step:
start_us, busy_us, verify_us, rows, decode_rows, tokens, one_time, emitted; dc_exec.c).

For each file: the steps that paid a one-time cost (a new batch shape's direct launch or graph capture) apart, then
plain steps (one token per row) and drafted steps (more tokens than rows) by rows per step, each with its count, busy
time and busy time per emitted token. --tail F keeps the last fraction F of the steps (a bench cell's measured part
after its warm-up). Measures; judges nothing.

usage: bench/step_log_summary.py [--tail F] STEP_LOG [STEP_LOG ...]
"""
import argparse
import csv

BUCKETS = [(1, 1), (2, 7), (8, 15), (16, 31), (32, 63), (64, 1 << 30)]


def bucket_name(lo, hi):
    return str(lo) if lo == hi else (f"{lo}+" if hi >= 1 << 30 else f"{lo}-{hi}")


def summarise(path, tail):
    with open(path, newline="") as f:
        steps = [{k: int(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if tail < 1.0:
        steps = steps[int(len(steps) * (1.0 - tail)):]
    if not steps:
        print(f"{path}: no steps")
        return
    span = (steps[-1]["start_us"] + steps[-1]["busy_us"] - steps[0]["start_us"]) / 1e6
    busy = sum(s["busy_us"] for s in steps) / 1e6
    emitted = sum(s["emitted"] for s in steps)
    one = [s for s in steps if s["one_time"]]
    print(f"{path}: {len(steps)} steps over {span:.3f} s, busy {busy:.3f} s, {emitted} tokens emitted, "
          f"{busy * 1e6 / max(emitted, 1):.1f} us busy per token")
    print(f"  one-time steps: {len(one)}, busy {sum(s['busy_us'] for s in one) / 1e6:.3f} s, "
          f"{sum(s['emitted'] for s in one)} tokens")
    print("  kind     rows    steps  busy s  us/step  tokens/step  us/token")
    for kind in ("plain", "drafted"):
        for lo, hi in BUCKETS:
            sel = [s for s in steps if not s["one_time"] and lo <= s["rows"] <= hi and s["decode_rows"] == s["rows"]
                   and ((s["tokens"] > s["rows"]) == (kind == "drafted"))]
            if not sel:
                continue
            b = sum(s["busy_us"] for s in sel)
            e = sum(s["emitted"] for s in sel)
            print(f"  {kind:8s} {bucket_name(lo, hi):>6s} {len(sel):8d} {b / 1e6:7.3f} {b / len(sel):8.0f} "
                  f"{e / len(sel):12.2f} {b / max(e, 1):9.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tail", type=float, default=1.0, help="keep the last fraction of the steps")
    ap.add_argument("logs", nargs="+")
    a = ap.parse_args()
    for p in a.logs:
        summarise(p, a.tail)


if __name__ == "__main__":
    main()
