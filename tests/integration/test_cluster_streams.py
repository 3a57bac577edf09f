"""test_cluster_streams.py: SSE behaviour on the real cluster (1 prefill + 1 decode).

- A client that stops reading a stream is cut off once the router's per-stream buffer (router.sse_buffer, small
  here) fills, its request is cancelled on the workers (KV blocks back to idle), and streams read normally at the
  same time finish with their full answers (the slow reader does not hold them back).
- A stream whose first token takes longer than router.sse_keepalive gets ": keep-alive" comments meanwhile, so
  proxies with idle timeouts keep the connection.
Raw sockets on purpose: the slow reader must control exactly when (never) it reads."""
import http.client
import json
import os
import socket
import sys
import time

from cluster import Cluster, http_post_json, metric_values, run_cluster_tests

QUICK = os.environ.get("PD_TEST_QUICK") == "1"
C = None


def post_raw(path, body, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: it sets the window
    host, port = C.url.split("//")[1].split(":")
    s.connect((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    return s


def read_all(s, timeout):
    s.settimeout(timeout)
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except socket.timeout:
        pass
    return out


def kv_idle(timeout=10):
    """Every worker's free KV blocks back to its total, as the router sees them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = C.metrics()
        free = metric_values(m, "pdserve_worker_kv_blocks_free")
        total = metric_values(m, "pdserve_worker_kv_blocks_total")
        if free and all(free[k] == total.get(k) for k in free):
            return True
        time.sleep(0.1)
    return False


def cut_count():
    return metric_values(C.metrics(), "pdserve_router_http_sse_streams_cut_total").get("", 0)


def test_slow_reader_is_cut_others_unaffected():
    if QUICK:  # ~150 KB of events must pile up (64 KiB kernel send buffer + 4 KiB cap): minutes under ASan
        print("  skipped under PD_TEST_QUICK (the Release run covers it)", flush=True)
        return
    n_tokens = 800
    prompt = "Write a long story about a lighthouse keeper."
    ref_status, ref = http_post_json(C.url + "/v1/completions",
                                     {"prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert ref_status == 200, ref
    before = cut_count()
    # the slow reader: logprobs make every event ~1 KB, ignore_eos keeps it going, and it never reads
    slow = post_raw("/v1/completions", {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True,
                                        "logprobs": 5, "ignore_eos": True}, rcvbuf=4096)
    # normal readers at the same time (http.client undoes the chunked framing)
    host, port = C.url.split("//")[1].split(":")
    fast = []
    for _ in range(3):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                            "stream": True}), {"Content-Type": "application/json"})
        fast.append(conn)
    t0 = time.monotonic()
    outs = [conn.getresponse().read() for conn in fast]
    fast_s = time.monotonic() - t0
    for out in outs:
        text = "".join(json.loads(line[6:])["choices"][0]["text"]
                       for line in out.decode().split("\n") if line.startswith("data: {"))
        assert text == ref["choices"][0]["text"], (text, ref)
        assert out.rstrip().endswith(b"data: [DONE]"), out[-200:]
    # the slow stream gets cut (its buffer fills long before n_tokens are generated) and its KV is freed
    deadline = time.monotonic() + 90
    while cut_count() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cut_count() == before + 1, (before, cut_count())
    assert kv_idle(), C.metrics()
    rest = read_all(slow, 5)  # what was in flight, then the close; never a [DONE]
    assert b"data: [DONE]" not in rest, rest[-200:]
    slow.close()
    for s in fast:
        s.close()
    print(f"  3 normal streams done in {fast_s:.1f} s next to a stalled reader", flush=True)


def test_keepalive_before_first_token():
    # a prompt long enough that its prefill outlasts router.sse_keepalive (300 ms here) on the CPU
    prompt = "The lighthouse keeper counted the steps. " * (40 if QUICK else 120)
    s = post_raw("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True})
    out = read_all(s, 120)
    s.close()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b": keep-alive" in body, body[:300]
    assert body.index(b": keep-alive") < body.index(b"data: {"), body[:300]
    assert b"data: [DONE]" in body


def main():
    global C
    C = Cluster(1, 1, config={"router": {"sse_buffer": "4KiB", "sse_keepalive": "300ms"},
                              "engine": {"kv_mem": "64MiB"}})
    return run_cluster_tests(C, [test_slow_reader_is_cut_others_unaffected, test_keepalive_before_first_token])


if __name__ == "__main__":
    sys.exit(main())
