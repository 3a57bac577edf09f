#!/usr/bin/env python3
"""spec_report.py: the arithmetic of bench/run_spec_bench.sh (stdlib only).

  spec_report.py result --spec S --workload W --concurrency C [--round N] --prompt-format F \\
                        --bench BENCH.json --before METRICS.txt --after METRICS.txt
      prints one JSON line for one run: pdctl bench's figures plus the deltas of the router's per-worker
      speculation counters between two /metrics scrapes (summed over decode workers).
  spec_report.py table RESULTS.jsonl
      prints a markdown table, one row per run, with the ratios of output tokens/s and of each stream's decode
      speed to spec=off's at the same workload, concurrency and round (run_spec_bench.sh --repeat); with more than
      one round, then one line per spec mode and cell: its ratios in every round, lowest and median.

Counters (Prometheus text from the router's /metrics, per worker label):
  pdserve_spec_draft_tokens_total     drafted tokens proposed for verification
  pdserve_spec_accepted_tokens_total  drafted tokens accepted
  pdserve_decode_steps_total          decode forwards (one verification step of the whole batch)
  pdserve_decode_tokens_total         tokens emitted by decode, all sequences
Derived (None where a counter is missing, e.g. before speculation landed):
  acceptance_rate        accepted / draft
  tokens_per_step        decode tokens / decode steps: all sequences of the batch together, so it grows
                         with the batch as well as with speculation
  rows_per_step_est      (decode tokens - accepted) / decode steps: mean sequences per step, assuming each
                         verified row emits its accepted drafts plus one token of its own (a row cut short
                         by max_tokens emits fewer, so this slightly undercounts)
  tokens_per_seq_step_est  decode tokens / (decode tokens - accepted): tokens per sequence per step under
                         the same assumption; 1.0 without speculation
"""
import argparse
import json
import re
import statistics
import sys

COUNTERS = {
    "draft": "pdserve_spec_draft_tokens_total",
    "accepted": "pdserve_spec_accepted_tokens_total",
    "steps": "pdserve_decode_steps_total",
    "tokens": "pdserve_decode_tokens_total",
}
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(path):
    """{counter key: {worker: value}} for the counters above; a counter absent from the text is absent."""
    out = {}
    names = {v: k for k, v in COUNTERS.items()}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _LINE.match(line)
            if not m or m.group(1) not in names:
                continue
            w = re.search(r'worker="([^"]*)"', m.group(2) or "")
            role = re.search(r'role="([^"]*)"', m.group(2) or "")
            if role and role.group(1) == "prefill":
                continue
            try:
                v = float(m.group(3))
            except ValueError:
                continue
            out.setdefault(names[m.group(1)], {})[w.group(1) if w else ""] = v
    return out


def deltas(before, after):
    """Per counter: the sum over workers of after - before (a worker new since `before` counts from 0)."""
    d = {}
    for key in COUNTERS:
        if key not in after:
            d[key] = None
            continue
        b = before.get(key, {})
        d[key] = sum(v - b.get(w, 0.0) for w, v in after[key].items())
    return d


def ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def cmd_result(a):
    with open(a.bench, encoding="utf-8") as f:
        bench = json.loads(f.read().strip().splitlines()[-1])
    d = deltas(parse_metrics(a.before), parse_metrics(a.after))
    tokens, steps, acc = d["tokens"], d["steps"], d["accepted"]
    rows_tokens = None if tokens is None else tokens - (acc or 0.0)
    row = {
        "spec": a.spec, "workload": a.workload, "concurrency": a.concurrency, "round": a.round,
        "prompt_format": a.prompt_format,
        "requests": bench.get("requests"), "ok": bench.get("ok"), "failed": bench.get("failed"),
        "duration_s": bench.get("duration_s"), "output_tokens": bench.get("output_tokens"),
        "output_tok_s": bench.get("output_tokens_per_s"),
        "decode_tok_s": ratio(tokens, bench.get("duration_s")),
        "stream_decode_tok_s": bench.get("decode_tokens_per_s_per_seq"),
        "ttft_ms_p50": bench.get("ttft_ms", {}).get("p50"), "itl_ms_p50": bench.get("itl_ms", {}).get("p50"),
        "itl_ms_p90": bench.get("itl_ms", {}).get("p90"),
        "acceptance_rate": ratio(acc, d["draft"]),
        "tokens_per_step": ratio(tokens, steps),
        "rows_per_step_est": ratio(rows_tokens, steps),
        "tokens_per_seq_step_est": ratio(tokens, rows_tokens),
        "counters": d,
    }
    for k, v in row.items():
        if isinstance(v, float):
            row[k] = round(v, 4)
    print(json.dumps(row))
    return 0


def fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def cmd_table(a):
    with open(a.results, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    base = {(r["workload"], r["concurrency"], r.get("round", 1)): r for r in rows if r["spec"] == "off"}
    rounds = sorted({r.get("round", 1) for r in rows})
    print("| spec | workload | conc | round | ok/req | output tok/s | vs off | decode tok/s | stream decode tok/s "
          "| vs off | ITL p50 ms | TTFT p50 ms | accept | tok/step (batch) | tok/seq-step (est) |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    order = {"off": 0, "ngram": 1, "draft": 2}
    key = lambda r: (r["workload"], r["concurrency"], r.get("round", 1))
    for r in sorted(rows, key=lambda r: key(r) + (order.get(r["spec"], 9),)):
        b = base.get(key(r), {})
        vs = ratio(r["output_tok_s"], b.get("output_tok_s"))
        stream = r.get("stream_decode_tok_s")
        stream_vs = ratio(stream, b.get("stream_decode_tok_s"))
        print(f"| {r['spec']} | {r['workload']} | {r['concurrency']} | {r.get('round', 1)} | {r['ok']}/{r['requests']} "
              f"| {fmt(r['output_tok_s'], 1)} | {fmt(vs)}x | {fmt(r['decode_tok_s'], 1)} | {fmt(stream, 1)} "
              f"| {fmt(stream_vs)}x | {fmt(r['itl_ms_p50'], 1)} | {fmt(r['ttft_ms_p50'], 0)} "
              f"| {fmt(r['acceptance_rate'])} | {fmt(r['tokens_per_step'])} | {fmt(r['tokens_per_seq_step_est'])} |")
    formats = sorted({r.get("prompt_format", "?") for r in rows})
    print(f"\nprompts sent as: {', '.join(formats)} (chat = the model's chat template; raw = completion text). "
          "vs off: output tok/s over spec=off's at the same workload and concurrency (the whole loop, prefill and "
          "TTFT included); stream decode tok/s: each stream's tokens after its first over the time from its first "
          "to its last (prefill excluded: the decode speed a client sees), and its ratio to spec=off's. ITL p50 "
          "says little with speculation (a run of accepted tokens arrives at once). tok/step counts every "
          "sequence of a step; tok/seq-step = decode tokens / (decode tokens - accepted drafts).")
    if len(rounds) > 1:
        print(f"\n{len(rounds)} rounds: each spec mode's ratio to spec=off in the same round, output tok/s / stream "
              "decode tok/s, round by round, then the lowest and the median\n")
        print("| spec | workload | conc | by round | lowest | median |")
        print("|---|---|--:|---|--:|--:|")
        cells = sorted({(r["spec"], r["workload"], r["concurrency"]) for r in rows if r["spec"] != "off"},
                       key=lambda c: (c[1], c[2], order.get(c[0], 9)))
        for spec, w, c in cells:
            pairs = []
            for rd in rounds:
                r = next((x for x in rows if (x["spec"], x["workload"], x["concurrency"], x.get("round", 1)) ==
                          (spec, w, c, rd)), None)
                b = base.get((w, c, rd), {})
                if r is None:
                    continue
                pairs.append((ratio(r["output_tok_s"], b.get("output_tok_s")),
                              ratio(r.get("stream_decode_tok_s"), b.get("stream_decode_tok_s"))))
            outs = sorted(p[0] for p in pairs if p[0] is not None)
            streams = sorted(p[1] for p in pairs if p[1] is not None)
            by = ", ".join(f"{fmt(o)} / {fmt(s)}" for o, s in pairs)
            low = f"{fmt(outs[0] if outs else None)} / {fmt(streams[0] if streams else None)}"
            med = f"{fmt(statistics.median(outs) if outs else None)} / " \
                  f"{fmt(statistics.median(streams) if streams else None)}"
            print(f"| {spec} | {w} | {c} | {by} | {low} | {med} |")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("result")
    r.add_argument("--spec", required=True)
    r.add_argument("--workload", required=True)
    r.add_argument("--concurrency", type=int, required=True)
    r.add_argument("--round", type=int, default=1, help="run_spec_bench.sh --repeat's round (default 1)")
    r.add_argument("--prompt-format", default="chat")
    r.add_argument("--bench", required=True)
    r.add_argument("--before", required=True)
    r.add_argument("--after", required=True)
    t = sub.add_parser("table")
    t.add_argument("results")
    a = ap.parse_args()
    return cmd_result(a) if a.cmd == "result" else cmd_table(a)


if __name__ == "__main__":
    sys.exit(main())
