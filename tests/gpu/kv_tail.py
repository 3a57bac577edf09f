#!/usr/bin/env python3
"""kv_tail.py PORT N_TOKENS N_REQ VOCAB: the KV hand-off at service level (issue 3), run by tests/gpu/run_gpu.sh kvtail
next to `pdctl up`. Waits for the router's /health, then sends N_REQ completions one after another, each a prompt
of N_TOKENS random token ids and max_tokens 1, so every request is one prefill step and one KV transfer of the whole
prompt. Prints each request's latency as the client sees it; the prefill worker's own figure (KV ready -> decode
worker's commit) is the "kv hand-off" line it logs at exit. Standard library only."""
import json
import random
import sys
import time
import urllib.request

from cluster_http import wait_healthy

port, n_tokens, n_req, vocab = (int(a) for a in sys.argv[1:5])
base = f"http://127.0.0.1:{port}"
wait_healthy(base, 300)

rng = random.Random(1)
lat = []
for i in range(n_req):
    prompt = [rng.randrange(256, vocab - 256) for _ in range(n_tokens)]
    body = json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.load(r)
    lat.append((time.time() - t0) * 1e3)
    print(f"request {i}: {lat[-1]:.1f} ms, usage {out.get('usage')}")
steady = sorted(lat[1:]) if len(lat) > 1 else lat
print(f"{n_tokens}-token prompts: median {steady[len(steady) // 2]:.1f} ms over {len(steady)} (the first one left out)")
