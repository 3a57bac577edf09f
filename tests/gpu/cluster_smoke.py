#!/usr/bin/env python3
"""cluster_smoke.py MODEL PORT PDCTL: the disaggregated path on the GPU (run by tests/gpu/run_gpu.sh cluster, next
to `pdctl up --backend cuda`). Waits for the router's /health, asks for a greedy completion of a ~200-token prompt
(long enough to go through the prefill worker and kvtransfer, through both host mirrors), and checks it against
`pdctl generate --backend cuda` on the same prompt: the same GPU kernels on the same shapes, so the same text.
Standard library only (the GPU machine has no pip access). Exit 0 when equal, 1 otherwise."""
import json
import subprocess
import sys
import time
import urllib.request

from cluster_http import wait_healthy

model, port, pdctl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
base = f"http://127.0.0.1:{port}"
prompt = " ".join(f"item {i} is {i * 7 % 13};" for i in range(40)) + " so item 41 is"

wait_healthy(base, 180)

body = json.dumps({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}).encode()
req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
t0 = time.time()
with urllib.request.urlopen(req, timeout=120) as r:
    out = json.load(r)
got = out["choices"][0]["text"]
print(f"cluster ({time.time() - t0:.2f} s, usage {out.get('usage')}): {got!r}")
ref = subprocess.run([pdctl, "generate", "--model", model, "--backend", "cuda", "--prompt", prompt, "--max-tokens", "24",
                      "--temperature", "0", "--ignore-eos"], capture_output=True, text=True, timeout=300)
print(f"pdctl generate --backend cuda (rc {ref.returncode}): {ref.stdout!r}")
if ref.returncode != 0:
    print(ref.stderr[-2000:])
same = ref.returncode == 0 and (ref.stdout.rstrip("\n") == got or ref.stdout.startswith(got))
print("identical" if same else "DIFFERENT")
sys.exit(0 if same else 1)
