"""cluster_http.py: what the GPU scripts' cluster clients share (standard library only: the GPU machine has no pip)."""
import sys
import time
import urllib.request


def wait_healthy(base, timeout_s):
    """Returns once base/health answers 200; exits 1 after timeout_s."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            print(f"cluster not healthy after {timeout_s} s")
            sys.exit(1)
        time.sleep(0.5)
