"""test_cluster_faults_workers.py: the cluster when its services die or stop, and one sampling contract across
paths (issue 4, "How it is checked"); each scenario on its own small cluster of real services:

  5. SIGKILL one of two decode workers while streams run on it: its requests end with ERR_UNAVAILABLE within
     router.worker_timeout + S_LOST_MARGIN (no hang), the other streams finish with the reference's text,
     /health stays 200 (min_decode 1), /metrics shows the worker lost, new requests are served by the survivor;
     restarted, the worker registers again and serves;
  6. SIGKILL one of two prefill workers while it prefills: the requests it held end with ERR_UNAVAILABLE within
     the same bound, the others finish correctly, new requests go to the survivor, and the decode worker's
     blocks reserved for the lost prompts are freed;
  7. SIGTERM to the router with a stream in flight: /health turns 503, new requests are refused (503 /
     ERR_UNAVAILABLE), the stream completes with the reference's text, the router exits 0; the workers then
     exit 0 on SIGTERM;
  8. seeded sampling (temperature 0.9, top_p 0.95, seed 7) gives the single-process reference's text alone, in a
     batch of 8 different concurrent requests, and through decode-only (router.local_prefill_tokens large)
     as through prefill + decode, with logprobs in both (and equal).

Helpers come from test_cluster_faults.py (scenarios 1-4). PD_TEST_QUICK=1 shrinks token counts."""
import concurrent.futures
import signal
import sys
import threading
import time

from cluster import http_get, metric_values, pdctl_generate, run_tests
from native_client import NativeClient, pb
from test_cluster_faults import (HB_S, LONG_PROMPT, QUICK, _STORY, Http, check_error_shape, cluster, completion_body,
                                 post, stream_text, wait_for, wait_idle, worker_label)

WORKER_TIMEOUT_S = 1.0  # router.worker_timeout in these clusters
S_LOST_MARGIN = 1.5  # a lost worker's requests end within worker_timeout + this after the kill
PROMPT = "The capital of France is"
STORY = "Once upon a time"  # short: the streams all start (prefilled one after the other) before any ends
LP_TOL = 2e-3  # pdctl prints logprobs with 4 decimals


def metric(C, name, worker=None):
    vals = metric_values(C.metrics(), name)
    return vals.get(worker_label(C, worker) if worker else "", 0)


def collect(nc, rids, until_first=False, timeout_s=120):
    """Reads chunks of rids on one NativeClient: {rid: [chunks]} and {rid: monotonic end time}. until_first:
    return once every rid has a chunk."""
    chunks, ends = {r: [] for r in rids}, {}
    deadline = time.monotonic() + timeout_s
    while (not all(chunks.values())) if until_first else len(ends) < len(rids):
        c = nc.recv_chunk(max(0.1, deadline - time.monotonic()))
        chunks[c.request_id].append(c)
        if c.finish_reason != pb.FINISH_NONE:
            ends[c.request_id] = time.monotonic()
    return chunks, ends


def text_of(chunks):
    return "".join(c.text for c in chunks)


def check_lost_ends(chunks, ends, t_kill, refs, n_lost, who, exact=True):
    """Every request ended: n_lost with ERR_UNAVAILABLE naming the worker within the bound, the rest with
    their reference's text (refs: {rid: text}). exact False: 1..n_lost failed (a prefill worker may hand one
    over between the count and the kill)."""
    bound = WORKER_TIMEOUT_S + S_LOST_MARGIN
    failed = {r: cs[-1] for r, cs in chunks.items() if cs[-1].finish_reason == pb.FINISH_ERROR}
    for r, last in failed.items():
        assert last.error.code == pb.ERR_UNAVAILABLE and who in last.error.message, last.error
        assert ends[r] - t_kill <= bound, f"req {r} ended {ends[r] - t_kill:.2f} s after the kill (bound {bound})"
    for r, cs in chunks.items():
        if r not in failed:
            assert cs[-1].finish_reason in (pb.FINISH_LENGTH, pb.FINISH_STOP), cs[-1]
            assert text_of(cs) == refs[r], (r, text_of(cs)[:60], refs[r][:60])
    ok = len(failed) == n_lost if exact else 1 <= len(failed) <= n_lost
    assert ok, f"{len(failed)} requests failed, {who} held {n_lost}"
    return len(failed), max(ends[r] - t_kill for r in failed) if failed else 0.0


# ---- 5. a decode worker dies ----

def test_decode_worker_killed():
    n = 60 if QUICK else 150
    ref = pdctl_generate(STORY, max_tokens=n, extra=["--ignore-eos"])
    short = pdctl_generate(PROMPT, max_tokens=8)
    long_ref = pdctl_generate(LONG_PROMPT, max_tokens=8)
    with cluster(1, 2, router={"min_decode": 1, "worker_timeout": f"{int(WORKER_TIMEOUT_S * 1000)}ms"}) as C:
        wait_idle(C)
        with NativeClient(C.api, timeout_s=60) as nc:
            rids = [nc.submit(prompt=STORY, max_tokens=n, ignore_eos=True) for _ in range(4)]
            chunks, _ = collect(nc, rids, until_first=True)
            # two more still in prefill at the kill, one bound for each decode worker (whose blocks are reserved
            # for it): the prefill worker must give up the hand-off to the dead one and free its blocks
            pending = [nc.submit(prompt=LONG_PROMPT, max_tokens=8) for _ in range(2)]
            refs = {r: ref["text"] if r in rids else long_ref["text"] for r in rids + pending}
            wait_for(lambda: metric(C, "pdserve_requests_inflight") == 6, 10, "the router holds all 6")
            held = metric(C, "pdserve_worker_requests", "decode-1")
            assert held >= 2 and metric(C, "pdserve_worker_requests", "decode-0") >= 2, C.metrics()
            t_kill = time.monotonic()
            C.kill("decode-1")
            more, ends = collect(nc, rids + pending)
            for r in rids + pending:
                chunks.setdefault(r, []).extend(more[r])
            n_failed, worst = check_lost_ends(chunks, ends, t_kill, refs, held, "decode-1")
            # out of rotation, /health still 200 with one decode worker left
            wait_for(lambda: metric(C, "pdserve_worker_up", "decode-1") == 0, WORKER_TIMEOUT_S + S_LOST_MARGIN,
                     "decode-1 out of rotation")
            assert metric_values(C.metrics(), "pdserve_workers")['{role="decode",state="lost"}'] == 1
            assert http_get(C.url + "/health")[0] == 200
            for _ in range(2):
                text, _ = nc.generate(PROMPT, max_tokens=8)
                assert text == short["text"], (text, short["text"])
            wait_idle(C, names=["prefill-0", "decode-0"])
            # back: it registers again and takes work
            C.restart("decode-1")
            wait_for(lambda: metric(C, "pdserve_worker_up", "decode-1") == 1 and
                     metric(C, "pdserve_worker_kv_blocks_total", "decode-1") > 0, 10, "decode-1 back in rotation")
            assert metric_values(C.metrics(), "pdserve_workers")['{role="decode",state="lost"}'] == 0
            rids = [nc.submit(prompt=PROMPT, max_tokens=8) for _ in range(4)]
            chunks, _ = collect(nc, rids)
            assert all(text_of(cs) == short["text"] for cs in chunks.values()), [text_of(c) for c in chunks.values()]
        wait_for(lambda: metric(C, "pdserve_worker_kv_bytes_received_total", "decode-1") > 0, 4 * HB_S + 1,
                 "the restarted decode-1 received KV (served some of the 4 requests)")
        wait_idle(C)
        print(f"     {held:.0f} of 6 requests were on decode-1: {n_failed} failed, the last {worst:.2f} s after "
              "the kill", flush=True)


# ---- 6. a prefill worker dies ----

def test_prefill_worker_killed():
    prompt = _STORY * (1 if QUICK else 4) + "Then"
    ref = pdctl_generate(prompt, max_tokens=8)
    short = pdctl_generate(PROMPT, max_tokens=8)
    with cluster(2, 1, router={"min_prefill": 1, "worker_timeout": f"{int(WORKER_TIMEOUT_S * 1000)}ms"}) as C:
        wait_idle(C)
        with NativeClient(C.api, timeout_s=60) as nc:
            rids = [nc.submit(prompt=prompt, max_tokens=8) for _ in range(4)]
            wait_for(lambda: metric(C, "pdserve_requests_inflight") == 4, 10, "the router holds all 4")
            # kill while prefill-0 is at work on its share (its blocks in use), none of them answered yet
            wait_for(lambda: metric(C, "pdserve_worker_kv_blocks_total", "prefill-0") -
                     metric(C, "pdserve_worker_kv_blocks_free", "prefill-0") > 0, 10, "prefill-0 at work")
            held = metric(C, "pdserve_worker_requests", "prefill-0")
            t_kill = time.monotonic()
            C.kill("prefill-0")
            assert held >= 1, held
            chunks, ends = collect(nc, rids)
            n_failed, worst = check_lost_ends(chunks, ends, t_kill, {r: ref["text"] for r in rids}, held,
                                              "prefill-0", exact=False)
            wait_for(lambda: metric(C, "pdserve_worker_up", "prefill-0") == 0, 1, "prefill-0 out of rotation")
            assert http_get(C.url + "/health")[0] == 200
            # the decode worker's blocks reserved for the lost prompts are back too
            wait_idle(C, names=["prefill-1", "decode-0"])
            sent_before = metric(C, "pdserve_worker_kv_bytes_sent_total", "prefill-1")
            rids = [nc.submit(prompt=PROMPT, max_tokens=8) for _ in range(3)]
            chunks, _ = collect(nc, rids)
            assert all(text_of(cs) == short["text"] for cs in chunks.values()), [text_of(c) for c in chunks.values()]
        wait_idle(C, names=["prefill-1", "decode-0"])
        assert metric(C, "pdserve_worker_kv_bytes_sent_total", "prefill-1") > sent_before  # the survivor served
        print(f"     {held:.0f} of 4 prompts were on prefill-0: {n_failed} failed, the last {worst:.2f} s after "
              "the kill", flush=True)


# ---- 7. SIGTERM drains the router ----

def test_router_sigterm_drains():
    n = 30 if QUICK else 120
    ref = pdctl_generate(_STORY, max_tokens=n, extra=["--ignore-eos"])
    with cluster(router={"drain_timeout": "30s"}) as C:
        wait_idle(C)
        first, result = threading.Event(), []

        def run():
            h = Http(C, "/v1/completions", completion_body(C, _STORY, n, ignore_eos=True))
            result.append((h.status,) + stream_text(h, first) + (h.done,))
            h.close()

        t = threading.Thread(target=run)
        t.start()
        assert first.wait(60), "no first event"
        router = C.services["router"].proc
        router.send_signal(signal.SIGTERM)
        wait_for(lambda: http_get(C.url + "/health")[0] == 503, 1, "/health 503 while draining")
        st, hdrs, body, dt = post(C, "/v1/completions", completion_body(C, PROMPT, 4, stream=False))
        check_error_shape(st, body, 503, words=("shutting down",))
        assert "retry-after" in hdrs and dt < 1, (hdrs, dt)
        with NativeClient(C.api, timeout_s=10) as nc:
            last = list(nc.chunks(nc.submit(prompt=PROMPT, max_tokens=4)))[-1]
            assert last.error.code == pb.ERR_UNAVAILABLE, last
        assert t.is_alive(), "the stream ended before the refusals were checked"
        t.join(60)
        assert result and result[0] == (200, ref["text"], "length", None, True), (result, ref["text"][:60])
        assert router.wait(10) == 0, "the router did not exit 0 after draining"
        for name in ("prefill-0", "decode-0"):
            p = C.services[name].proc
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0, f"{name} did not exit 0 on SIGTERM"


# ---- 8. seeded sampling, any path ----

SEEDED = dict(temperature=0.9, top_p=0.95, seed=7)
OTHERS = ["List three colors:", "def fibonacci(n):", "In 1969, the first humans", _STORY + "One night he saw",
          "Write a haiku about the sea.", "The capital of France is", "1, 2, 3, 4,"]


def seeded_runs(C, n):
    """The seeded request alone (with 2 top logprobs), then in a batch of 8 different concurrent requests:
    (alone body, batch text)."""
    st, _, alone, _ = post(C, "/v1/completions", completion_body(C, "Once upon a time", n, stream=False,
                                                                 logprobs=2, **SEEDED))
    assert st == 200, alone

    def one(i):
        if i == 0:
            b = completion_body(C, "Once upon a time", n, stream=False, **SEEDED)
        else:  # different prompts, lengths and sampling
            b = completion_body(C, OTHERS[i - 1], n + i, stream=False, temperature=0.7 * (i % 2), seed=i)
        return post(C, "/v1/completions", b)

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        res = list(ex.map(one, range(8)))
    assert all(r[0] == 200 for r in res), [r[:3] for r in res if r[0] != 200]
    return alone, res[0][2]["choices"][0]["text"]


def test_seeded_sampling_any_path():
    n = 8 if QUICK else 24
    ref = pdctl_generate("Once upon a time", max_tokens=n, logprobs=2, **SEEDED)
    got = {}
    for mode, cfg in (("prefill+decode", {}), ("decode-only", {"local_prefill_tokens": 100000})):
        with cluster(router=cfg) as C:
            wait_idle(C)
            alone, batch = seeded_runs(C, n)
            text = alone["choices"][0]["text"]
            assert text == ref["text"], (mode, text, ref["text"])
            assert batch == text, (mode, batch, text)
            lp = alone["choices"][0]["logprobs"]
            assert lp and len(lp["token_logprobs"]) == alone["usage"]["completion_tokens"] == n, (mode, lp)
            # legacy completions: the 2 most likely, plus the sampled token where it is not one of them (OpenAI's)
            assert all(2 <= len(t) <= 3 and tok in t for t, tok in zip(lp["top_logprobs"], lp["tokens"])), (
                mode, lp["top_logprobs"])
            for i, (_, want, _) in enumerate(ref["logprobs"]):
                assert abs(lp["token_logprobs"][i] - want) < LP_TOL, (mode, i, lp["token_logprobs"][i], want)
            got[mode] = lp
            wait_idle(C)  # heartbeats carry the KV counters below
            sent = metric(C, "pdserve_worker_kv_bytes_sent_total", "prefill-0")
            assert (sent == 0) == (mode == "decode-only"), (mode, sent)  # the path really taken
    a, b = got["prefill+decode"], got["decode-only"]
    assert a["tokens"] == b["tokens"], (a["tokens"], b["tokens"])
    assert all(abs(x - y) < 1e-5 for x, y in zip(a["token_logprobs"], b["token_logprobs"])), (a, b)


def main():
    return run_tests([test_decode_worker_killed, test_prefill_worker_killed, test_router_sigterm_drains,
                      test_seeded_sampling_any_path])


if __name__ == "__main__":
    sys.exit(main())
