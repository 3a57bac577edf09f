"""test_cluster_faults.py: the cluster under client-side faults (issue 4, "How it is checked"), each scenario on
its own small cluster of real services (pd-router, pd-prefill, pd-decode on loopback, the real model on CPU):

  1. a client that goes away (HTTP stream closed mid-stream or before its first token; native CancelRequest
     mid-stream or while the prompt is still being prefilled) leaves no KV block held on any worker: every
     worker's pdserve_worker_kv_blocks_free is back to its idle value within a bound;
  2. a full router (router.max_inflight = 2) answers the next request at once (429 + Retry-After over HTTP,
     ERR_RESOURCE_EXHAUSTED natively) while the two it holds run on and finish with the reference's text;
  3. bad requests (malformed JSON, wrong types, negative max_tokens, prompts past the context, unknown model,
     bad sampling values) next to 4 good streaming ones: each bad one gets its 400/404 with an OpenAI-shaped
     message naming the problem, and the good ones give the same text as when each ran alone;
  4. deadlines: native timeout_ms ends a long request (mid-decode and mid-prefill) with ERR_DEADLINE_EXCEEDED
     within the deadline + S_DEADLINE_MARGIN; over HTTP router.request_timeout gives a 504 (non-stream) and an
     error event in place of a finish_reason (stream); blocks back to idle afterwards.

Worker deaths, SIGTERM drain and seeded sampling across paths are in test_cluster_faults_workers.py, which
uses the helpers below. PD_TEST_QUICK=1 (the sanitizer run, ~50x slower engine) keeps every scenario with
shorter prompts and fewer tokens."""
import concurrent.futures
import contextlib
import http.client
import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request

from cluster import Cluster, metric_values, pdctl_generate, run_tests
from native_client import NativeClient, pb

QUICK = os.environ.get("PD_TEST_QUICK") == "1"
HB_S = 0.25  # router.heartbeat_ivl (default): the workers' pool counters reach /metrics this often
# A prompt is prefilled in chunks of S_CHUNK tokens; one such engine step (and the hand-off of its KV) takes up
# to S_STEP_S (~0.3 s in Release on one thread; ASan is ~40x slower and shares the cores with the other worker).
# A request cancelled mid-step frees its blocks when the step ends.
S_CHUNK = 16 if QUICK else 64
S_STEP_S = 8.0 if QUICK else 0.5
# A client gone before its first token is noticed by the router's HTTP sweep (1 s with the default timeouts),
# then the cancel waits for the step in progress and the freed blocks take a heartbeat or so to show.
S_IDLE_BOUND = 1.0 + S_STEP_S + 4 * HB_S
S_DEADLINE_MARGIN = 1.5  # a request must end within its deadline + this
_STORY = ("The old lighthouse keeper climbed the spiral stairs every evening, counting each of the one hundred "
          "and twelve steps, while the gulls circled above the harbour and the fishing boats came home. ")
# a prompt whose prefill takes a while (~1 s in Release on one thread): long enough to act while it runs
LONG_PROMPT = _STORY * (1 if QUICK else 5) + "One night he saw"
LONG_TOKENS = 60 if QUICK else 400  # a decode that outlasts what the test does meanwhile


# ---- helpers (test_cluster_faults_workers.py uses them too) ----

@contextlib.contextmanager
def cluster(n_prefill=1, n_decode=1, **config):
    """A Cluster for one scenario (config: {section: {key: value}}): logs printed if the scenario fails, every
    service must exit 0 on SIGTERM at the end, logs removed after a clean run."""
    C = Cluster(n_prefill=n_prefill, n_decode=n_decode, config=config)
    with C:
        yield C
    shutil.rmtree(C.log_dir, ignore_errors=True)


def wait_for(pred, timeout, what, step=0.05):
    """Polls pred() until it returns something true; returns that value; AssertionError naming what (and the
    last value) if timeout passes first."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            break
        time.sleep(step)
    assert v, f"{what}: not within {timeout:.1f} s (last: {v!r})"
    return v


def pool_state(C):
    """(free, total, held) per worker label from /metrics; held: its requests, queue and running sequences."""
    m = C.metrics()
    free = metric_values(m, "pdserve_worker_kv_blocks_free")
    total = metric_values(m, "pdserve_worker_kv_blocks_total")
    held = {w: sum(metric_values(m, s).get(w, 0) for s in ("pdserve_worker_requests", "pdserve_worker_queue_depth",
                                                            "pdserve_worker_running_seqs")) for w in free}
    return free, total, held


def worker_label(C, name):
    """The /metrics label string of one worker ('{worker="decode-0",role="decode"}')."""
    role = name.split("-")[0]
    return f'{{worker="{name}",role="{role}"}}'


def wait_idle(C, timeout=10.0, names=None):
    """Waits until every worker in names (default: every alive one of C) has reported its pool, has every block
    free and holds nothing, and the router holds no request. Returns the seconds it took; AssertionError with
    the last state otherwise."""
    names = names or [n for n, s in C.services.items() if n != "router" and s.proc.poll() is None]
    labels = [worker_label(C, n) for n in names]
    t0 = time.monotonic()
    last = None
    while True:
        free, total, held = pool_state(C)
        inflight = metric_values(C.metrics(), "pdserve_requests_inflight").get("", -1)
        last = {w: (free.get(w), total.get(w), held.get(w)) for w in labels}, inflight
        if inflight == 0 and all(total.get(w) and free.get(w) == total[w] and not held.get(w) for w in labels):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"workers not idle within {timeout:.1f} s: (free, total, held) {last[0]}, router "
                                 f"in flight {last[1]}")
        time.sleep(0.05)


def blocks_in_use(C, name):
    free, total, _ = pool_state(C)
    w = worker_label(C, name)
    return total.get(w, 0) - free.get(w, 0)


_model_ids = {}


def model_id(C):
    if C.url not in _model_ids:
        with urllib.request.urlopen(C.url + "/v1/models", timeout=10) as r:
            _model_ids[C.url] = json.loads(r.read())["data"][0]["id"]
    return _model_ids[C.url]


class Http:
    """One POST on its own connection (http.client, so the test owns the socket): status, headers, and for a
    stream its SSE events one by one."""

    def __init__(self, C, path, body, timeout=120):
        u = urllib.parse.urlparse(C.url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        self.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()  # headers wait for the first chunk (rt_http.h)
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.done = False  # [DONE] seen

    def json(self):
        return json.loads(self.resp.read())

    def events(self):
        """Yields each SSE data payload parsed (an error event too); stops after [DONE] or at the stream's end."""
        for raw in self.resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                self.done = True
                return
            yield json.loads(line[6:])

    def close(self):
        """Goes away abruptly (no more reading, socket shut)."""
        with contextlib.suppress(OSError):
            if self.conn.sock:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def stream_text(h, first=None):
    """Reads a completions stream to its end: (text, finish_reason, error or None). first: an Event set at
    the first event."""
    text, finish, err = "", None, None
    for ev in h.events():
        if first:
            first.set()
        if "error" in ev:
            err = ev["error"]
            continue
        for ch in ev.get("choices", []):
            text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
            finish = ch.get("finish_reason") or finish
    return text, finish, err


def completion_body(C, prompt, max_tokens, stream=True, **kw):
    b = {"model": model_id(C), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    b.update(kw)
    return b


def native_end(nc, rid, timeout_s=30):
    """Reads request rid to its last chunk: (last chunk, text, n tokens, seconds it took)."""
    t0 = time.monotonic()
    chunks = list(nc.chunks(rid, timeout_s=timeout_s))
    return chunks[-1], "".join(c.text for c in chunks), sum(len(c.token_ids) for c in chunks), time.monotonic() - t0


def check_error_shape(status, body, want_status, param=None, words=()):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with the message naming words."""
    assert status == want_status, (status, want_status, body)
    e = body.get("error")
    assert isinstance(e, dict) and set(e) >= {"message", "type", "param", "code"}, body
    assert isinstance(e["message"], str) and e["message"], body
    for w in words:
        assert w in e["message"], (w, e["message"])
    if param is not None:
        assert e["param"] == param, (e["param"], param, e["message"])
    return e


def post(C, path, body, timeout=60):
    """A non-streaming POST: (status, headers, parsed body, seconds)."""
    t0 = time.monotonic()
    h = Http(C, path, body, timeout=timeout)
    try:
        return h.status, h.headers, h.json(), time.monotonic() - t0
    finally:
        h.close()


# ---- 1. a client that goes away frees every block ----

def test_client_gone_frees_blocks():
    with cluster(router={"worker_timeout": "5s"}, prefill={"chunk_tokens": S_CHUNK}) as C:
        wait_idle(C)
        times = {}
        # (a) HTTP stream closed after its first events: the decode worker holds prompt + generated blocks
        h = Http(C, "/v1/completions", completion_body(C, LONG_PROMPT, LONG_TOKENS, ignore_eos=True))
        assert h.status == 200, h.status
        events = h.events()
        for _ in range(3):
            next(events)
        wait_for(lambda: blocks_in_use(C, "decode-0") > 0, 5, "decode-0 shows the stream's blocks in use")
        t0 = time.monotonic()
        h.close()
        wait_idle(C, timeout=S_IDLE_BOUND + 3)
        times["http mid-stream"] = time.monotonic() - t0
        # (b) HTTP stream closed before its first token, while the prefill worker still works on the prompt
        s = socket.create_connection(("127.0.0.1", urllib.parse.urlparse(C.url).port))
        body = json.dumps(completion_body(C, LONG_PROMPT, LONG_TOKENS, ignore_eos=True)).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        seen = wait_for(lambda: blocks_in_use(C, "prefill-0") > 0 or blocks_in_use(C, "decode-0") > 0, 5,
                        "the request's blocks in use before its first token")
        t0 = time.monotonic()
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        wait_idle(C, timeout=S_IDLE_BOUND + 3)
        times["http before first token"] = time.monotonic() - t0
        # (c) native CancelRequest mid-stream, (d) native cancel while the prompt is being prefilled
        with NativeClient(C.api, timeout_s=60) as nc:
            rid = nc.submit(prompt=LONG_PROMPT, max_tokens=LONG_TOKENS, ignore_eos=True, stream=True)
            first = next(nc.chunks(rid))
            assert first.finish_reason == pb.FINISH_NONE, first
            t0 = time.monotonic()
            nc.cancel(rid)
            last, _, n, _ = native_end(nc, rid, timeout_s=10)
            assert n < LONG_TOKENS, n
            assert last.finish_reason == pb.FINISH_CANCELLED or last.error.code == pb.ERR_CANCELLED, last
            wait_idle(C, timeout=S_IDLE_BOUND + 3)
            times["native cancel mid-stream"] = time.monotonic() - t0
            rid = nc.submit(prompt=LONG_PROMPT + " again", max_tokens=LONG_TOKENS, ignore_eos=True, stream=True)
            wait_for(lambda: blocks_in_use(C, "prefill-0") > 0 or blocks_in_use(C, "decode-0") > 0, 5,
                     "the cancelled request's blocks in use")
            t0 = time.monotonic()
            nc.cancel(rid)
            last, _, n, _ = native_end(nc, rid, timeout_s=10)
            assert last.finish_reason in (pb.FINISH_CANCELLED, pb.FINISH_ERROR), last
            if last.finish_reason == pb.FINISH_ERROR:
                assert last.error.code == pb.ERR_CANCELLED, last.error
            wait_idle(C, timeout=S_IDLE_BOUND + 3)
            times["native cancel before first token"] = time.monotonic() - t0
        m = C.metrics()
        gone = metric_values(m, "pdserve_router_http_client_gone_total").get("", 0)
        cut = metric_values(m, "pdserve_router_http_sse_streams_cut_total").get("", 0)
        assert gone + cut >= 2, (gone, cut)  # both HTTP clients were noticed as gone
        cancelled = metric_values(m, "pdserve_requests_total").get('{outcome="cancelled"}', 0)
        assert cancelled >= 4, m
        print("     back to idle after: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()) +
              f" (bound {S_IDLE_BOUND:.2f} s; seen held before first token: {bool(seen)})", flush=True)
        slow = {k: v for k, v in times.items() if v > S_IDLE_BOUND}
        assert not slow, f"blocks freed later than {S_IDLE_BOUND} s: {slow}"


# ---- 2. a full router answers at once ----

def test_full_queue_answers_at_once():
    n = 40 if QUICK else 160
    ref = pdctl_generate(_STORY, max_tokens=n, extra=["--ignore-eos"])
    with cluster(router={"max_inflight": 2}) as C:
        wait_idle(C)
        results, firsts = [None, None], [threading.Event(), threading.Event()]

        def run(i):
            h = Http(C, "/v1/completions", completion_body(C, _STORY, n, ignore_eos=True))
            results[i] = (h.status,) + stream_text(h, firsts[i])
            h.close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for f in firsts:
            assert f.wait(60), "a long request got no first event"
        # HTTP, non-stream and stream: 429 with Retry-After, at once
        for stream in (False, True):
            st, hdrs, body, dt = post(C, "/v1/completions", completion_body(C, "Hello", 4, stream=stream))
            check_error_shape(st, body, 429, words=("too many requests",))
            assert body["error"]["type"] == "rate_limit_error", body
            assert int(hdrs.get("retry-after", "0")) >= 1, hdrs
            assert dt < 1.0, f"the refusal took {dt:.2f} s"
        # native: ERR_RESOURCE_EXHAUSTED, at once
        with NativeClient(C.api, timeout_s=10) as nc:
            last, _, _, dt = native_end(nc, nc.submit(prompt="Hello", max_tokens=4), timeout_s=5)
            assert last.finish_reason == pb.FINISH_ERROR and last.error.code == pb.ERR_RESOURCE_EXHAUSTED, last
            assert dt < 1.0, dt
        assert all(t.is_alive() for t in threads), "the long requests ended before the refusals were checked"
        for t in threads:
            t.join(120)
        for r in results:
            assert r and r[0] == 200 and r[3] is None, r
            assert r[1] == ref["text"] and r[2] == "length", (r[1][:80], ref["text"][:80])
        # room again: served
        st, _, body, _ = post(C, "/v1/completions", completion_body(C, "Hello", 4, stream=False))
        assert st == 200 and body["choices"][0]["text"], body
        wait_idle(C)


# ---- 3. bad input next to good traffic ----

GOOD = ["The capital of France is", "List three colors:", "def fibonacci(n):", "In 1969, the first humans"]


def bad_requests(C):
    """(what, path, body, status, param, words in the message) of each bad request."""
    mid = model_id(C)
    over = "hello " * 9000  # ~9000 tokens, past the 8192-token context
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("malformed JSON", "/v1/completions", '{"prompt": "x", "max_tokens": 4', 400, None, ("invalid JSON",)),
        ("not an object", "/v1/completions", "[1, 2]", 400, None, ("JSON object",)),
        ("max_tokens a string", "/v1/completions", {"model": mid, "prompt": "x", "max_tokens": "four"}, 400,
         "max_tokens", ("'max_tokens' must be an integer",)),
        ("negative max_tokens", "/v1/completions", {"model": mid, "prompt": "x", "max_tokens": -5}, 400,
         "max_tokens", ("'max_tokens' = -5",)),
        ("prompt a number", "/v1/completions", {"model": mid, "prompt": 42}, 400, "prompt", ("'prompt' must be",)),
        ("messages a string", chat, {"model": mid, "messages": "hi"}, 400, "messages", ("'messages' must be",)),
        ("prompt over the context", "/v1/completions", {"model": mid, "prompt": over, "max_tokens": 4}, 400, None,
         ("prompt has", "the context length is")),
        ("prompt + max_tokens over the context", "/v1/completions",
         {"model": mid, "prompt": "hello " * 8000, "max_tokens": 1000}, 400, None,
         ("maximum context length is", "Please reduce the length")),
        ("unknown model", chat, {"model": "no-such-model", "messages": msgs, "max_tokens": 4}, 404, None,
         ("no-such-model",)),
        ("temperature -1", "/v1/completions", {"model": mid, "prompt": "x", "temperature": -1}, 400, "temperature",
         ("temperature",)),
        ("temperature a string", chat, {"model": mid, "messages": msgs, "temperature": "hot"}, 400, "temperature",
         ("'temperature' must be a number",)),
        ("top_p 0", "/v1/completions", {"model": mid, "prompt": "x", "top_p": 0}, 400, "top_p", ("'top_p' = 0",)),
    ]


def test_bad_input_next_to_good():
    n = 12 if QUICK else 48
    with cluster() as C:
        wait_idle(C)
        alone = {}
        for p in GOOD:
            h = Http(C, "/v1/completions", completion_body(C, p, n))
            alone[p] = stream_text(h)
            h.close()
            assert alone[p][2] is None and alone[p][0], alone[p]
        firsts = [threading.Event() for _ in GOOD]

        def good(i):
            h = Http(C, "/v1/completions", completion_body(C, GOOD[i], n))
            try:
                return (h.status,) + stream_text(h, firsts[i])
            finally:
                h.close()

        with concurrent.futures.ThreadPoolExecutor(len(GOOD)) as ex:
            futs = [ex.submit(good, i) for i in range(len(GOOD))]
            for f in firsts:
                assert f.wait(60), "a good request got no first event"
            n_running = sum(not f.done() for f in futs)
            for what, path, body, status, param, words in bad_requests(C):
                st, _, js, dt = post(C, path, body)
                try:
                    e = check_error_shape(st, js, status, param, words)
                except AssertionError as ex_:
                    raise AssertionError(f"{what}: {ex_}") from None
                assert e["type"] == "invalid_request_error", (what, e)
                assert dt < 2.0, (what, dt)
            good_results = [f.result(timeout=120) for f in futs]
        assert n_running > 0, "the good requests had all ended before the bad ones were sent"
        for p, r in zip(GOOD, good_results):
            assert r[0] == 200 and r[3] is None, (p, r)
            assert (r[1], r[2]) == alone[p][:2], (p, r[1], alone[p][0])
        wait_idle(C)


# ---- 4. deadlines ----

def test_deadline():
    timeout_s = 1.0
    with cluster(router={"request_timeout": f"{int(timeout_s * 1000)}ms"}) as C:
        wait_idle(C)
        with NativeClient(C.api, timeout_s=30) as nc:
            # mid-decode: a long request with 300 ms to live
            last, _, n, dt = native_end(nc, nc.submit(prompt="Once upon a time", max_tokens=4000, ignore_eos=True,
                                                      timeout_ms=300))
            assert last.finish_reason == pb.FINISH_ERROR and last.error.code == pb.ERR_DEADLINE_EXCEEDED, last
            assert "deadline" in last.error.message, last.error
            assert 0.25 <= dt <= 0.3 + S_DEADLINE_MARGIN, f"ended after {dt:.2f} s for a 300 ms deadline"
            assert last.usage.completion_tokens == n < 4000, (last.usage, n)
            # mid-prefill: the deadline passes before the first token
            last, _, n, dt = native_end(nc, nc.submit(prompt=LONG_PROMPT * 2, max_tokens=16, timeout_ms=100))
            assert last.finish_reason == pb.FINISH_ERROR and last.error.code == pb.ERR_DEADLINE_EXCEEDED, last
            assert dt <= 0.1 + S_DEADLINE_MARGIN, f"ended after {dt:.2f} s for a 100 ms deadline"
        wait_idle(C)
        # HTTP, no timeout of its own: router.request_timeout; non-stream gets 504
        st, _, body, dt = post(C, "/v1/completions", completion_body(C, "Once upon a time", 4000, stream=False,
                                                                     ignore_eos=True))
        check_error_shape(st, body, 504, words=("deadline",))
        assert body["error"]["code"] == "deadline_exceeded", body
        assert timeout_s - 0.05 <= dt <= timeout_s + S_DEADLINE_MARGIN, dt
        # stream: 200 with tokens, then an error event (and [DONE], vLLM's convention: rt_openai.h), no finish_reason
        t0 = time.monotonic()
        h = Http(C, "/v1/completions", completion_body(C, "Once upon a time", 4000, ignore_eos=True))
        assert h.status == 200, h.status
        text, finish, err = stream_text(h)
        dt = time.monotonic() - t0
        h.close()
        assert text and err and finish is None, (text[:40], err, finish)
        assert err.get("code") == "deadline_exceeded", err
        assert dt <= timeout_s + S_DEADLINE_MARGIN, dt
        wait_idle(C)
        errs = metric_values(C.metrics(), "pdserve_request_errors_total").get('{code="ERR_DEADLINE_EXCEEDED"}')
        assert errs == 4, errs


def main():
    return run_tests([test_client_gone_frees_blocks, test_full_queue_answers_at_once, test_bad_input_next_to_good,
                      test_deadline])


if __name__ == "__main__":
    sys.exit(main())
