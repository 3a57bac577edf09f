"""test_pdctl_up.py: `pdctl up` end to end: it starts the cluster, prints the URL, the cluster serves a
request (the single-process reference's answer), a killed worker is restarted and serves again, and
SIGTERM stops pdctl with exit 0 and no child left behind; --gpus deals the workers' devices (the CPU backend ignores
engine.gpu, so only the command lines show it). Also: --prefill 0 (decode-only) serves, and a
missing service binary is one clear error line. --mps: pdctl's handling of a private MPS control daemon (started
with -d before the workers, which inherit its pipe folder, told to quit after them, its folders removed), with a
stand-in nvidia-cuda-mps-control that records its calls: the real one needs a GPU, and tests/gpu/run_gpu.sh's cluster
stage runs it there; --mps on without the program is one clear error, and auto with the CPU backend starts none."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from cluster import bin_path, http_post_json, model_path, pdctl_generate, run_tests

PROMPT = "The capital of France is"
R = {}


def children_of(pid):
    """pids whose parent is pid (from /proc)."""
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(d))
    return kids


def is_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Up:
    """A `pdctl up` process: stdout lines collected, stderr kept in a file (printed on failure)."""

    def __init__(self, *args, env=None):
        self.log = tempfile.NamedTemporaryFile(prefix="pdctl-up-", suffix=".log", delete=False)
        bins = {os.path.dirname(bin_path(k)) for k in ("router", "prefill", "decode")}
        self.bin_dir = None
        if len(bins) == 1:  # all in one folder: say so; else pdctl finds them in its build tree
            self.bin_dir = bins.pop()
        cmd = [bin_path("pdctl"), "up", "--model", model_path(), "--port", "0", "--threads", "2",
               "--ready-timeout", "90", "--stop-timeout", "30"] + list(args)
        if self.bin_dir:
            cmd += ["--bin-dir", self.bin_dir]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self.lines = []
        self.url = None
        self.has_url = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            m = re.match(r"pdserve up: (http://\S+) \(model (.+), (\d+) prefill, (\d+) decode\)$", line)
            if m:
                self.url = m.group(1)
                self.has_url.set()

    def wait_url(self, timeout=120):
        deadline = time.monotonic() + timeout
        while not self.has_url.wait(0.2):
            assert self.proc.poll() is None, f"pdctl up exited with {self.proc.returncode}:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"no URL within {timeout} s:\n{self.stderr()}"
        return self.url

    def stderr(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self, timeout=60):
        kids = children_of(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        return rc, kids

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)


def complete(url, prompt=PROMPT, max_tokens=8):
    status, body = http_post_json(url + "/v1/completions",
                                  {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, timeout=120)
    assert status == 200, (status, body)
    return body["choices"][0]["text"]


def test_up_serves_restarts_and_stops():
    up = Up("--prefill", "1", "--decode", "1", "--gpu", "7", "--gpus", "3,5")
    try:
        url = up.wait_url()
        assert any(l.strip().startswith("try: curl") for l in up.lines), up.lines
        assert complete(url) == R["greedy"]["text"]
        kids = children_of(up.proc.pid)
        assert len(kids) == 3, kids  # router, prefill-0, decode-0
        # --gpus 3,5: prefill-0 on 3, decode-0 on 5, each after the --gpu 7 it overrides (the services take the last)
        args = {k: open(f"/proc/{k}/cmdline").read().split("\0") for k in kids}
        for exe, gpu in (("pd-prefill", "3"), ("pd-decode", "5")):
            a = [v for v in args.values() if exe in v[0]]
            assert len(a) == 1 and a[0].index(f"--engine.gpu={gpu}") > a[0].index("--engine.gpu=7"), args
        # a worker that dies is reported and restarted; the cluster serves again
        decode = [k for k in kids if "pd-decode" in open(f"/proc/{k}/cmdline").read()]
        assert len(decode) == 1, decode
        os.kill(decode[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "decode-0 is ready again" not in up.stderr():
            assert time.monotonic() < deadline, up.stderr()
            time.sleep(0.2)
        text = None
        for _ in range(100):  # the router takes the new worker into rotation on its registration
            try:
                text = complete(url)
                break
            except AssertionError:
                time.sleep(0.1)
        assert text == R["greedy"]["text"], text
        rc, kids = up.stop()
        err = up.stderr()
        assert rc == 0, f"pdctl up exited with {rc}:\n{err}"
        assert len(kids) == 3, kids
        left = [k for k in kids if is_alive(k)]
        assert not left, f"children still running after pdctl up exited: {left}"
        assert "decode-0 (pid" in err and "restarting it" in err, err
        assert "pdctl up: stopped\n" in err, err
    except BaseException:
        sys.stderr.write(up.stderr())
        raise
    finally:
        up.cleanup()


FAKE_MPS = """#!/bin/sh
echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$PD_FAKE_MPS_RECORD"
if [ "$1" = "-d" ]; then touch "$CUDA_MPS_PIPE_DIRECTORY/control" "$CUDA_MPS_LOG_DIRECTORY/control.log"; exit 0; fi
read cmd; echo "stdin=$cmd" >> "$PD_FAKE_MPS_RECORD"
"""


def test_up_decode_only_with_mps():
    with tempfile.TemporaryDirectory() as fake:
        exe, record = os.path.join(fake, "nvidia-cuda-mps-control"), os.path.join(fake, "record")
        with open(exe, "w") as f:
            f.write(FAKE_MPS)
        os.chmod(exe, 0o755)
        env = dict(os.environ, PATH=fake + os.pathsep + os.environ.get("PATH", ""), PD_FAKE_MPS_RECORD=record)
        env.pop("CUDA_MPS_PIPE_DIRECTORY", None)
        up = Up("--prefill", "0", "--decode", "1", "--mps", "on", env=env)
        try:
            url = up.wait_url()
            assert "0 prefill, 1 decode" in up.lines[0], up.lines
            assert complete(url) == R["greedy"]["text"]
            with open(record) as f:
                calls = f.read().splitlines()
            assert len(calls) == 1 and calls[0].startswith("args=-d pipe=/"), calls
            pipe_dir = calls[0].split(" pipe=")[1].split(" ")[0]
            assert os.path.isfile(os.path.join(pipe_dir, "control")), pipe_dir
            kids = children_of(up.proc.pid)
            for k in kids:  # the workers and the router inherit the daemon's pipe folder
                with open(f"/proc/{k}/environ", "rb") as f:
                    assert f"CUDA_MPS_PIPE_DIRECTORY={pipe_dir}".encode() in f.read().split(b"\0"), k
            rc, kids = up.stop()
            assert rc == 0, up.stderr()
            assert len(kids) == 2 and not [k for k in kids if is_alive(k)], kids
            with open(record) as f:
                calls = f.read().splitlines()
            assert calls[1:] == [f"args= pipe={pipe_dir} log={os.path.dirname(pipe_dir)}/log", "stdin=quit"], calls
            assert not os.path.exists(os.path.dirname(pipe_dir)), pipe_dir
            assert "MPS control daemon stopped" in up.stderr(), up.stderr()
        except BaseException:
            sys.stderr.write(up.stderr())
            raise
        finally:
            up.cleanup()
        # auto with the CPU backend: no daemon; on without the program: one error line, nothing started
        os.unlink(record)
        up = Up("--prefill", "1", "--decode", "1", env=env)
        try:
            up.wait_url()
            rc, _ = up.stop()
            assert rc == 0 and not os.path.exists(record), (rc, up.stderr())
        finally:
            up.cleanup()
        os.unlink(exe)
        p = subprocess.run([bin_path("pdctl"), "up", "--mps", "on", "--model", model_path()], capture_output=True,
                           timeout=30, env=env)
        err = p.stderr.decode().strip().splitlines()
        assert p.returncode == 1 and err[-1] == "pdctl up: --mps on: no nvidia-cuda-mps-control in PATH", err


def test_up_missing_binary():
    with tempfile.TemporaryDirectory() as empty:
        p = subprocess.run([bin_path("pdctl"), "up", "--bin-dir", empty, "--model", model_path()],
                           capture_output=True, timeout=30)
    err = p.stderr.decode().strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "pd-router" in err[0], (p.returncode, err)


def main():
    R["greedy"] = pdctl_generate(PROMPT, max_tokens=8)
    return run_tests([test_up_missing_binary, test_up_serves_restarts_and_stops, test_up_decode_only_with_mps])


if __name__ == "__main__":
    sys.exit(main())
