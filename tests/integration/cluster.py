"""cluster.py: the integration tests' launcher and helpers (stdlib only).

Cluster starts pd-router, N pd-prefill and M pd-decode as separate processes on loopback: it picks free
ports, writes one JSON config with every service's section, waits for each service's ready line on its
stdout and then for the router's /health to answer 200, keeps each service's output in a log file (printed
when a test fails), and stop() sends SIGTERM by pid and checks that every service exits 0 in time.
kill(name) is for fault tests. pdctl_generate() runs the single-process reference (`pdctl generate`).
run_tests() runs a file's test functions and prints "N passed, N failed".

Binaries come from the environment (PD_ROUTER_BIN, PD_PREFILL_BIN, PD_DECODE_BIN, PDCTL_BIN, set by
tests/CMakeLists.txt) or else from PD_BUILD_DIR (default build/); the model from PDSERVE_MODEL or the
default model cache.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("PD_BUILD_DIR", os.path.join(ROOT, "build"))
_BINS = {"router": ("PD_ROUTER_BIN", "router/pd-router"), "prefill": ("PD_PREFILL_BIN", "prefill/pd-prefill"),
         "decode": ("PD_DECODE_BIN", "decode/pd-decode"), "pdctl": ("PDCTL_BIN", "deploy/pdctl")}


def bin_path(kind):
    env, rel = _BINS[kind]
    path = os.environ.get(env) or os.path.join(BUILD, rel)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{kind}: no executable at {path} (set {env} or PD_BUILD_DIR)")
    return path


def model_path():
    p = os.environ.get("PDSERVE_MODEL")
    if p:
        return p
    d = os.environ.get("PDSERVE_MODELS") or os.path.expanduser("~/.cache/pdserve/models")
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


def free_ports(n):
    """n distinct loopback ports free right now (each socket held until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(url, timeout=10):
    """(status, body text) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def http_post_json(url, body, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# ---- the single-process reference ----

_LP_RE = re.compile(r"\[(-?\d+) (.*?) lp=(\S+) \|((?: -?\d+:\S+?)*)\]\n", re.S)
_STATS_RE = re.compile(r"\[prompt (\d+) tokens in .*?; generated (\d+) tokens in .*?; finish=(\w+)\]")


def pdctl_generate(prompt, max_tokens=16, chat=False, system=None, temperature=0.0, seed=None, stop=(), logprobs=0,
                   top_k=0, top_p=1.0, min_p=0.0, threads=2, extra=()):
    """Runs `pdctl generate` (the engine in one process: the reference every cluster answer must equal).
    Sampling defaults are the API's (filters off), not pdctl's. Returns a dict: text, prompt_tokens,
    completion_tokens, finish ("stop"/"length"), logprobs [(token, logprob, [(token, logprob)...])]."""
    args = [bin_path("pdctl"), "generate", "--model", model_path(), "--prompt", prompt, "--max-tokens",
            str(max_tokens), "--temperature", repr(float(temperature)), "--top-k", str(top_k), "--top-p",
            repr(float(top_p)), "--min-p", repr(float(min_p)), "--threads", str(threads), "--logprobs", str(logprobs)]
    if chat:
        args.append("--chat")
    if system is not None:
        args += ["--system", system]
    if seed is not None:
        args += ["--seed", str(seed)]
    for s in stop:
        args += ["--stop", s]
    args += list(extra)
    p = subprocess.run(args, capture_output=True, timeout=300)
    err = p.stderr.decode("utf-8", "replace")
    if p.returncode != 0:
        raise RuntimeError(f"pdctl generate failed ({p.returncode}): {err}")
    out = p.stdout.decode("utf-8")
    assert out.endswith("\n"), out
    m = _STATS_RE.search(err)
    assert m, err
    lps = [(int(t), float(lp), [(int(a), float(b)) for a, b in (x.split(":") for x in tops.split())])
           for t, _, lp, tops in _LP_RE.findall(err)]
    return {"text": out[:-1], "prompt_tokens": int(m.group(1)), "completion_tokens": int(m.group(2)),
            "finish": m.group(3), "logprobs": lps}


# ---- the cluster ----

class Service:
    """One child process: its command line, its log file, and its ready line (read from stdout)."""

    def __init__(self, name, kind, args, log_dir):
        self.name, self.kind, self.args = name, kind, args
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.proc = None
        self.ready_line = None
        self.ready = threading.Event()
        self.lock = threading.Lock()

    def start(self):
        self.ready.clear()
        self.ready_line = None
        log = open(self.log_path, "ab")
        log.write(f"==== {' '.join(self.args)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        log.close()
        threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True).start()

    def _read_stdout(self, proc):
        want = f"pd-{self.kind} ready"
        with open(self.log_path, "ab") as log:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self.lock:
                    log.write(f"[stdout] {line}\n".encode())
                    log.flush()
                if (line == want or line.startswith(want + " ")) and not self.ready.is_set():
                    self.ready_line = line
                    self.ready.set()

    def field(self, key):
        """key=value from the ready line."""
        m = re.search(rf"(?:^| ){key}=(\S+)", self.ready_line or "")
        return m.group(1) if m else None

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


class Cluster:
    """pd-router + n_prefill pd-prefill + n_decode pd-decode on loopback.

    config: {section: {key: value}} merged over the defaults below. threads: engine.threads per worker.
    Use as a context manager, or start() / stop()."""

    def __init__(self, n_prefill=1, n_decode=1, config=None, threads=1, log_dir=None, ready_timeout=120):
        self.n_prefill, self.n_decode = n_prefill, n_decode
        self.ready_timeout = ready_timeout
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="pd-cluster-")
        http, control, api = free_ports(3)
        self.control = f"tcp://127.0.0.1:{control}"
        self.api = f"tcp://127.0.0.1:{api}"
        self.url = f"http://127.0.0.1:{http}"
        model = model_path()
        cfg = {
            "router": {"http_addr": "127.0.0.1", "http_port": http, "control": self.control, "api": self.api,
                       "model": model, "min_prefill": n_prefill, "min_decode": n_decode},
            "prefill": {"router": self.control},
            "decode": {"router": self.control, "kv_bind": "tcp://127.0.0.1:0"},
            "engine": {"model": model, "threads": threads, "kv_mem": "256MiB"},
        }
        for sec, kv in (config or {}).items():
            cfg.setdefault(sec, {}).update(kv)
        self.config = cfg
        self.config_path = os.path.join(self.log_dir, "cluster.json")
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=2)
        base = ["--config", self.config_path]
        self.services = {"router": Service("router", "router", [bin_path("router")] + base, self.log_dir)}
        for i in range(n_prefill):
            n = f"prefill-{i}"
            self.services[n] = Service(n, "prefill", [bin_path("prefill")] + base + [f"--prefill.id={n}"],
                                       self.log_dir)
        for i in range(n_decode):
            n = f"decode-{i}"
            self.services[n] = Service(n, "decode", [bin_path("decode")] + base + [f"--decode.id={n}"], self.log_dir)

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.dump_logs()
            self.stop(check=False)
            raise
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:
            self.dump_logs()
            self.stop(check=False)
        else:
            self.stop()

    def start(self):
        """Router first (workers register with it), then every worker; then /health must say 200."""
        deadline = time.monotonic() + self.ready_timeout
        self._start_and_wait(["router"], deadline)
        self._start_and_wait([n for n in self.services if n != "router"], deadline)
        self.wait_healthy(deadline - time.monotonic())

    def _start_and_wait(self, names, deadline):
        for n in names:
            self.services[n].start()
        for n in names:
            s = self.services[n]
            while not s.ready.wait(0.1):
                if s.proc.poll() is not None:
                    raise RuntimeError(f"{n} exited with {s.proc.returncode} before its ready line")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{n}: no ready line within {self.ready_timeout} s")

    def wait_healthy(self, timeout):
        deadline = time.monotonic() + max(timeout, 1)
        status = None
        while time.monotonic() < deadline:
            try:
                status, _ = http_get(self.url + "/health", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"/health not 200 within the ready timeout (last: {status})")

    def metrics(self):
        status, body = http_get(self.url + "/metrics")
        assert status == 200, (status, body)
        return body

    def kill(self, name, sig=signal.SIGKILL):
        """Fault tests: signal one service by pid (SIGKILL by default) and reap it."""
        s = self.services[name]
        s.proc.send_signal(sig)
        s.proc.wait(timeout=30)

    def restart(self, name, timeout=60):
        """Starts a stopped or killed service again and waits for its ready line."""
        self._start_and_wait([name], time.monotonic() + timeout)

    def stop(self, timeout=30, check=True):
        """SIGTERM to every running service by pid; each must exit 0 within timeout (else SIGKILL and, with
        check, AssertionError naming them)."""
        running = [s for s in self.services.values() if s.proc and s.proc.poll() is None]
        for s in running:
            s.proc.send_signal(signal.SIGTERM)
        bad = []
        deadline = time.monotonic() + timeout
        for s in running:
            try:
                rc = s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                if rc != 0:
                    bad.append(f"{s.name} exited with {rc} after SIGTERM")
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
                bad.append(f"{s.name} still running {timeout} s after SIGTERM (killed)")
        if bad and check:
            self.dump_logs()
            raise AssertionError("; ".join(bad))

    def dump_logs(self, out=sys.stderr):
        for s in self.services.values():
            out.write(f"\n======== {s.name} ({s.log_path}) ========\n{s.log_text()}")
        out.flush()


def metric_values(text, name):
    """{labels string: value} of one Prometheus metric."""
    vals = {}
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        vals[m.group(1) or ""] = float(m.group(2))
    return vals


# ---- a minimal runner ----

def run_tests(tests, on_failure=None):
    """Runs each callable; prints ok/FAIL per test and 'N passed, N failed'. on_failure() runs once after the
    first failure (dump logs). Returns the exit code."""
    n_pass = n_fail = 0
    for t in tests:
        t0 = time.monotonic()
        try:
            t()
            n_pass += 1
            print(f"ok   {t.__name__} ({time.monotonic() - t0:.1f} s)", flush=True)
        except Exception:
            n_fail += 1
            print(f"FAIL {t.__name__} ({time.monotonic() - t0:.1f} s)", flush=True)
            traceback.print_exc()
            sys.stderr.flush()
            if on_failure and n_fail == 1:
                on_failure()
    print(f"{n_pass} passed, {n_fail} failed", flush=True)
    return 1 if n_fail else 0


def run_cluster_tests(cluster, tests):
    """Starts cluster, runs tests against it, then stops it as one more test (every service must exit 0 on
    SIGTERM). Logs are printed after the first failure and kept; after a clean run they are removed. Returns the
    exit code."""
    t0 = time.monotonic()
    try:
        cluster.start()
    except Exception:
        traceback.print_exc()
        cluster.dump_logs()
        cluster.stop(check=False)
        print("FAIL cluster start\n0 passed, 1 failed", flush=True)
        return 1
    print(f"cluster up in {time.monotonic() - t0:.1f} s ({cluster.url}, logs in {cluster.log_dir})", flush=True)

    def clean_shutdown():
        cluster.stop()

    rc = 1
    try:
        rc = run_tests(list(tests) + [clean_shutdown], on_failure=cluster.dump_logs)
        return rc
    finally:
        cluster.stop(check=False)
        if rc == 0:  # logs are kept (and named above) only when something failed
            shutil.rmtree(cluster.log_dir, ignore_errors=True)
