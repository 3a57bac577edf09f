#!/usr/bin/env python3
"""test_router_http.py: pd-router's HTTP front end with no workers, over loopback, standard library only.

Starts pd-router (argv[1]) on free ports with the default model (env PDSERVE_MODEL, else
~/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf) and checks what the door does on its own: health
stays 503 without workers, the model list, OpenAI-shaped 400s (malformed JSON, wrong types, negative
max_tokens, prompt longer than the context), 413 for a body over router.max_body (announced or chunked), 415,
503 + Retry-After for a valid request, 404 / 405, an oversized head refused while the server keeps serving,
slow-loris connections cut at router.http_timeout while others are served, /metrics, and SIGTERM -> exit 0.
The cluster tests with workers (streaming, the openai client) live elsewhere. Exit status 0 = all passed.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

MODEL = os.environ.get("PDSERVE_MODEL") or os.path.expanduser("~/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf")
MAX_BODY = 128 << 10
N_FAILED = 0


def check(cond, what, detail=""):
    global N_FAILED
    if cond:
        print(f"ok   {what}")
    else:
        N_FAILED += 1
        print(f"FAIL {what} {detail}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Router:
    def __init__(self, exe):
        self.log = open(f"/tmp/test_router_http.{os.getpid()}.log", "w+")
        args = [exe, f"--router.model={MODEL}", "--router.http_addr=127.0.0.1", "--router.http_port=0",
                f"--router.control=tcp://127.0.0.1:{free_port()}", f"--router.api=tcp://127.0.0.1:{free_port()}",
                f"--router.max_body={MAX_BODY}",
                "--router.http_timeout=1s", "--router.drain_timeout=5s"]
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.p.stdout.readline()  # blocks until ready (or exit)
        if not line.startswith("pd-router ready "):
            self.dump()
            raise SystemExit(f"pd-router did not start: {line!r}")
        fields = dict(kv.split("=", 1) for kv in line.split()[2:])
        self.port = int(fields["http"].rsplit(":", 1)[1])
        if not (fields.get("api", "").startswith("tcp://127.0.0.1:") and fields.get("control", "").startswith("tcp://")):
            raise SystemExit(f"ready line lacks api= / control=: {line!r}")
        print(f"started: {line.strip()}")

    def dump(self):
        self.log.seek(0)
        sys.stdout.write("---- pd-router log ----\n" + self.log.read() + "-----------------------\n")


def request(port, method, path, body=None, headers=None, timeout=5):
    """One request on a fresh connection: (status, headers dict lower-cased, body bytes, json or None)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    hdrs = {k.lower(): v for k, v in r.getheaders()}
    c.close()
    try:
        js = json.loads(data)
    except ValueError:
        js = None
    return r.status, hdrs, data, js


def is_openai_error(js, param=None):
    """{"error": {"message": str, "type": str, "param": ..., "code": ...}}, param as given when not None."""
    if not isinstance(js, dict) or not isinstance(js.get("error"), dict):
        return False
    e = js["error"]
    ok = isinstance(e.get("message"), str) and e["message"] and isinstance(e.get("type"), str)
    ok = ok and "param" in e and "code" in e
    return ok and (param is None or e["param"] == param)


def raw_exchange(port, data, read_timeout=3.0):
    """Sends raw bytes, returns what comes back until the server closes or read_timeout passes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    got = b""
    try:
        s.sendall(data)
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
    except (socket.timeout, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        s.close()
    return got


def status_of(raw):
    try:
        return int(raw.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def t_health_and_models(port):
    st, h, _, js = request(port, "GET", "/health")
    check(st == 503 and js and js.get("status") == "not ready", "health: 503 not ready without workers", (st, js))
    st, h, _, js = request(port, "GET", "/v1/models")
    ok = st == 200 and js and js.get("object") == "list" and len(js.get("data", [])) == 1
    check(ok, "models: one model listed", (st, js))
    model = js["data"][0]["id"] if ok else ""
    check(bool(model) and js["data"][0].get("object") == "model", "models: the model has an id", model)
    return model


def t_bad_requests(port, model):
    st, _, _, js = request(port, "POST", "/v1/completions", body='{"model": "x", "prompt": "hi",')
    msg = js["error"]["message"] if is_openai_error(js) else ""
    check(st == 400 and is_openai_error(js, None) and js["error"]["type"] == "invalid_request_error",
          "malformed JSON: 400 invalid_request_error", (st, js))
    check("JSON" in msg and "line 1" in msg and "column" in msg, "malformed JSON: message says where", msg)
    for body, param, what in [
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens", "max_tokens as a string"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", "temperature as a string"),
        ({"prompt": 5}, "prompt", "prompt as a number"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens", "negative max_tokens"),
        ({"prompt": "hi", "n": 2}, "n", "n = 2 (not implemented)"),
    ]:
        st, _, _, js = request(port, "POST", "/v1/completions", body=body)
        check(st == 400 and is_openai_error(js, param), f"completions, {what}: 400 param {param}", (st, js))
    # what the JSON parser itself refuses: each a 400 whose message names the problem
    for raw, what, word in [
        ('{"prompt": "hi", "prompt": "again"}', "duplicate key", "duplicate"),
        ('{"prompt": "a\\u0000b"}', "NUL byte in a string", "\\u0000"),
        ('{"prompt": "hi", "x": ' + "[" * 3000 + "]" * 3000 + "}", "nesting deeper than 2048", "depth"),
        ('{"prompt": "hi", "temperature": 1e999}', "number out of range", "overflow"),
        ('{"prompt": "hi", "max_tokens": 123456789012345678901234567890}', "integer beyond 64 bits", "big"),
    ]:
        st, _, _, js = request(port, "POST", "/v1/completions", body=raw)
        msg = js["error"]["message"] if is_openai_error(js) else ""
        check(st == 400 and is_openai_error(js) and word in msg.lower(), f"{what}: 400 saying so", (st, msg))
    st, _, _, js = request(port, "POST", "/v1/chat/completions", body={"messages": "hi"})
    check(st == 400 and is_openai_error(js, "messages"), "chat, messages as a string: 400", (st, js))
    st, _, _, js = request(port, "POST", "/v1/chat/completions", body={"messages": [{"role": "user"}]})
    check(st == 400 and is_openai_error(js), "chat, message without content: 400", (st, js))
    # ~12k tokens of text: longer than the model's 8192-token context, shorter than router.max_body.
    long_prompt = "hello world " * 10000
    st, _, _, js = request(port, "POST", "/v1/completions", body={"model": model, "prompt": long_prompt})
    msg = js["error"]["message"] if is_openai_error(js) else ""
    check(st == 400 and is_openai_error(js) and ("context" in msg or "token" in msg),
          "prompt longer than the context: 400 saying so", (st, msg[:200]))
    st, _, _, js = request(port, "POST", "/v1/completions", body={"model": "no-such-model", "prompt": "hi"})
    check(st == 404 and is_openai_error(js) and js["error"]["code"] == "model_not_found", "unknown model: 404",
          (st, js))
    st, _, _, js = request(port, "POST", "/v1/completions", body="{}", headers={"Content-Type": "text/plain"})
    check(st == 415 and is_openai_error(js), "Content-Type text/plain: 415", (st, js))


def t_body_limits(port):
    # Announced length over the cap: refused from the head alone, before any body byte is sent.
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n").encode()
    t0 = time.monotonic()
    raw = raw_exchange(port, head, read_timeout=3)
    body = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
    try:
        js = json.loads(body)
    except ValueError:
        js = None
    check(status_of(raw) == 413 and is_openai_error(js) and time.monotonic() - t0 < 2,
          "Content-Length over router.max_body: 413 at once, OpenAI shape", raw[:300])
    # A chunked body has no length up front: 413 once the cap is passed.
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * 16384
    got = b""
    try:
        for _ in range(MAX_BODY // len(chunk) + 4):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        s.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while b"\r\n\r\n" not in got:
            b = s.recv(65536)
            if not b:
                break
            got += b
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    check(status_of(got) == 413, "chunked body over router.max_body: 413", got[:200])
    # A body just under the cap is read whole (and refused for what it says, not for its size).
    pad = "x" * (MAX_BODY - 100)
    st, _, _, js = request(port, "POST", "/v1/completions", body=json.dumps({"prompt": "hi", "user": pad}))
    check(st == 503, "body just under router.max_body: read and submitted (503 without workers)", (st, js))


def t_valid_requests_unavailable(port, model):
    for path, body in [("/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 4}),
                       ("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "stream": True}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
        st, h, _, js = request(port, "POST", path, body=body)
        ok = st == 503 and h.get("retry-after") == "1" and is_openai_error(js)
        check(ok and js["error"]["code"] == "unavailable", f"{path} without workers: 503 + Retry-After: 1",
              (st, h.get("retry-after"), js))


def t_routes(port):
    st, _, _, js = request(port, "GET", "/v2/nothing")
    check(st == 404 and is_openai_error(js), "unknown path: 404 OpenAI shape", (st, js))
    st, h, _, js = request(port, "GET", "/v1/completions")
    check(st == 405 and is_openai_error(js) and h.get("allow") == "POST", "GET /v1/completions: 405 Allow: POST",
          (st, h, js))
    st, h, _, js = request(port, "DELETE", "/health")
    check(st == 405 and is_openai_error(js), "DELETE /health: 405", (st, js))
    st, h, data, _ = request(port, "GET", "/metrics")
    text = data.decode(errors="replace")
    check(st == 200 and h.get("content-type", "").startswith("text/plain")
          and 'pdserve_router_http_responses_total{code="503"}' in text, "metrics: text with response counts",
          (st, h.get("content-type"), text[-500:]))
    # keep-alive: two requests on one connection
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/v1/models")
    r1 = c.getresponse()
    r1.read()
    c.request("GET", "/v1/models")
    r2 = c.getresponse()
    r2.read()
    c.close()
    check(r1.status == 200 and r2.status == 200, "two GETs on one kept-alive connection")


def t_big_head(port):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 1000) for i in range(64))
    raw = raw_exchange(port, head + b"\r\n", read_timeout=3)
    st = status_of(raw)
    check(st is not None and 400 <= st < 500, "64 KB of headers: refused with a 4xx", raw[:120])
    st, _, _, _ = request(port, "GET", "/health")
    check(st == 503, "still serving after the oversized head", st)


def t_slow_loris(port):
    """A head sent one byte every 0.2 s (always active, never complete) is cut at router.http_timeout (1 s)."""
    result = {}

    def loris():
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        t0 = time.monotonic()
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 100 + b"\r\n\r\n"
        try:
            for b in head:
                s.send(bytes([b]))
                time.sleep(0.2)
            result["got"] = s.recv(100)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            result["got"] = b""
        result["secs"] = time.monotonic() - t0
        s.close()

    th = threading.Thread(target=loris)
    th.start()
    lat = []
    for _ in range(5):  # served meanwhile, promptly
        t0 = time.monotonic()
        st, _, _, _ = request(port, "GET", "/v1/models", timeout=2)
        lat.append((st, time.monotonic() - t0))
        time.sleep(0.2)
    th.join(timeout=30)
    check(all(st == 200 and dt < 0.8 for st, dt in lat), "other requests served during a slow loris", lat)
    check(result.get("got") == b"" and result.get("secs", 99) < 4,
          "slow-loris connection cut within ~router.http_timeout", result)
    # an idle connection that sends nothing at all is closed too
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.monotonic()
    try:
        got = s.recv(100)
    except (ConnectionResetError, socket.timeout):
        got = b"?"
    dt = time.monotonic() - t0
    s.close()
    check(got == b"" and dt < 4, "silent connection closed within ~router.http_timeout", (got, dt))


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: test_router_http.py PATH/TO/pd-router")
    if not os.path.exists(MODEL):
        raise SystemExit(f"model not found: {MODEL} (set PDSERVE_MODEL)")
    r = Router(sys.argv[1])
    try:
        model = t_health_and_models(r.port)
        t_bad_requests(r.port, model)
        t_body_limits(r.port)
        t_valid_requests_unavailable(r.port, model)
        t_routes(r.port)
        t_big_head(r.port)
        t_slow_loris(r.port)
        st, _, _, _ = request(r.port, "GET", "/health")
        check(st == 503, "health still 503 at the end (no workers)", st)
    finally:
        t0 = time.monotonic()
        r.p.send_signal(signal.SIGTERM)
        try:
            rc = r.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            r.p.kill()
            rc = "hung"
        check(rc == 0 and time.monotonic() - t0 < 5, "SIGTERM: exit 0 within 5 s", (rc, time.monotonic() - t0))
        if N_FAILED:
            r.dump()
        r.log.close()
        os.unlink(r.log.name)
    print(f"{N_FAILED} failed")
    sys.exit(1 if N_FAILED else 0)


if __name__ == "__main__":
    main()
