#!/usr/bin/env python3
"""ncu_kernels.py: where a decode step's GPU time goes, kernel by kernel, from Nsight Compute.

Runs COMMAND under `ncu --csv --metrics gpu__time_duration.sum` for LAUNCHES kernel launches after SKIP (pick them
inside the steady decode steps: graphs are off under ENG_CUDA_GRAPHS=0, so every kernel is its own launch), then
prints per kernel name: launches, total and mean duration, and share of the total. ncu serialises kernels, flushes
caches between them and locks clocks to base, so absolute times run high; the split is what this is for.
Usage: python3 tests/gpu/ncu_kernels.py --skip 1200 --count 200 -- ./build-gpu/bench/engine_cuda --model M ...
"""
import argparse
import collections
import csv
import io
import shutil
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip", type=int, default=1000, help="kernel launches to skip first")
    ap.add_argument("--count", type=int, default=200, help="kernel launches to measure")
    ap.add_argument("--ncu", default=shutil.which("ncu") or "/usr/local/cuda/bin/ncu")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to profile")
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command")
    run = subprocess.run([a.ncu, "--csv", "--print-units", "base", "--launch-skip", str(a.skip), "--launch-count",
                          str(a.count), "--metrics", "gpu__time_duration.sum"] + cmd, capture_output=True, text=True)
    # ncu's CSV starts at the first line beginning with a quoted "ID"; the program's own output comes before
    text = run.stdout[run.stdout.find('"ID"'):] if '"ID"' in run.stdout else ""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        sys.stderr.write(run.stderr[-2000:] + run.stdout[-2000:])
        sys.exit("ncu_kernels: no kernel rows (ncu exit %d)" % run.returncode)
    per = collections.defaultdict(list)
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r["Kernel Name"].split("(")[0].replace("void ", "")
        per[name].append(float(r["Metric Value"].replace(",", "")) / 1000.0)  # base units: ns
    total = sum(sum(v) for v in per.values())
    print(f"{'kernel':<58} {'launches':>8} {'total us':>10} {'mean us':>9} {'share':>7}")
    for name, v in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name[:58]:<58} {len(v):>8} {sum(v):>10.1f} {sum(v) / len(v):>9.2f} {100 * sum(v) / total:>6.1f}%")
    print(f"{'all':<58} {sum(len(v) for v in per.values()):>8} {total:>10.1f}")


if __name__ == "__main__":
    main()
