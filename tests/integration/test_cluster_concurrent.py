"""test_cluster_concurrent.py: two prefill + two decode workers, 64 concurrent greedy requests of mixed prompt
lengths (the long ones cross prefill.chunk_tokens = 64 several times and many 16-token KV block boundaries), each answer
equal to its single-process reference; afterwards every worker's KV pool is back to its idle size and
nothing is left queued or running (per the router's /metrics, fed by the workers' heartbeats).
PD_TEST_QUICK=1 (the sanitizer run, where the engine is ~50x slower) keeps the shape at a smaller size: 16
requests, prompts up to ~41 tokens, chunk_tokens 16."""
import concurrent.futures
import os
import sys
import time

import openai

from cluster import Cluster, metric_values, pdctl_generate, run_cluster_tests

QUICK = os.environ.get("PD_TEST_QUICK") == "1"
N_REQUESTS = 16 if QUICK else 64
MAX_TOKENS = 4 if QUICK else 8
CHUNK_TOKENS = 16 if QUICK else 64
_STORY = ("The old lighthouse keeper climbed the spiral stairs every evening, counting each of the one hundred "
          "and twelve steps, while the gulls circled above the harbour and the fishing boats came home. ")
PROMPTS = [
    "The capital of France is",
    "List three colors:",
    "def fibonacci(n):",
    "In 1969, the first humans",
    _STORY + "One night he saw",  # ~45 tokens: one chunk, three blocks
    _STORY * 2 + "Then, suddenly,",  # ~85: two chunks
    "A story in three parts.\n" + _STORY * 3 + "\nPart two: the storm",  # ~130: three chunks
    _STORY * 6 + "The end came when",  # ~225: four chunks, fifteen blocks
][: 5 if QUICK else None]
IDLE_SERIES = ("pdserve_worker_queue_depth", "pdserve_worker_running_seqs", "pdserve_worker_requests")
R = {}
C = None
client = None
idle_before = {}


def compute_references():
    for p in PROMPTS:
        R[p] = pdctl_generate(p, max_tokens=MAX_TOKENS)
    lens = sorted(r["prompt_tokens"] for r in R.values())
    assert lens[-1] > 2 * CHUNK_TOKENS and lens[0] < 16, lens  # the mix this test is about


def kv_state():
    m = C.metrics()
    free = metric_values(m, "pdserve_worker_kv_blocks_free")
    total = metric_values(m, "pdserve_worker_kv_blocks_total")
    busy = {s: metric_values(m, s) for s in IDLE_SERIES}
    return free, total, busy


def test_idle_before():
    # a worker's pool shows in /metrics from its first heartbeat on, a moment after it registers
    deadline = time.monotonic() + 10
    while True:
        free, total, _ = kv_state()
        if (len(free) == 4 and free == total and all(free.values())) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(free) == 4 and free == total and all(free.values()), (free, total)
    idle_before.update(free)


def test_concurrent_greedy():
    def one(i):
        p = PROMPTS[i % len(PROMPTS)]
        if i % 4 == 3:  # a quarter streamed: the same answer either way
            chunks = client.completions.create(model=model_id(), prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                               stream=True)
            return p, "".join(c.choices[0].text for c in chunks if c.choices)
        return p, client.completions.create(model=model_id(), prompt=p, max_tokens=MAX_TOKENS,
                                            temperature=0).choices[0].text

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(N_REQUESTS) as ex:
        results = list(ex.map(one, range(N_REQUESTS)))
    wrong = [(p[:30], got, R[p]["text"]) for p, got in results if got != R[p]["text"]]
    assert not wrong, f"{len(wrong)} of {N_REQUESTS} differ from the reference: {wrong[:4]}"
    print(f"     {N_REQUESTS} requests in {time.monotonic() - t0:.1f} s", flush=True)


def test_kv_back_to_idle():
    # heartbeats every 250 ms carry the pools' state: allow a few
    deadline = time.monotonic() + 10
    while True:
        free, total, busy = kv_state()
        leftover = {s: {w: v for w, v in vals.items() if v} for s, vals in busy.items()}
        ok = free == idle_before and free == total and not any(leftover.values())
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert free == total, f"KV blocks not all free: free {free} total {total}"
    assert free == idle_before, (free, idle_before)
    assert not any(leftover.values()), leftover


_model = []


def model_id():
    if not _model:
        _model.append(client.models.list().data[0].id)
    return _model[0]


def main():
    global C, client
    compute_references()
    C = Cluster(n_prefill=2, n_decode=2, config={"prefill": {"chunk_tokens": CHUNK_TOKENS}})
    client = openai.OpenAI(base_url=C.url + "/v1", api_key="unused", max_retries=0, timeout=180)
    return run_cluster_tests(C, [test_idle_before, test_concurrent_greedy, test_kv_back_to_idle])


if __name__ == "__main__":
    sys.exit(main())
