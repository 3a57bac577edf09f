"""test_cluster_native.py: the native API (protobuf over ZeroMQ) of a 1 prefill + 1 decode cluster, through
native_client.py (compiled from proto/*.proto, no knowledge of the C code): streamed and single-chunk
answers equal the single-process reference, chat and token-id prompts, cancel ends a request early, a
malformed frame gets an error chunk and the connection keeps working, and `pdctl chat` (non-interactive)
holds a conversation over the same API."""
import subprocess
import sys
import time

from cluster import Cluster, bin_path, pdctl_generate, run_cluster_tests
from native_client import NativeClient, NativeError, pb

PROMPT = "The capital of France is"
CHAT = "What is the capital of France?"
R = {}
C = None
nc = None


def compute_references():
    R["greedy"] = pdctl_generate(PROMPT, max_tokens=8)
    R["chat"] = pdctl_generate(CHAT, max_tokens=24, chat=True)
    R["chat_sys"] = pdctl_generate(CHAT, max_tokens=24, chat=True, system="Answer in French.")


def test_stream():
    rid = nc.submit(prompt=PROMPT, max_tokens=8, stream=True)
    chunks = list(nc.chunks(rid))
    assert all(c.request_id == rid for c in chunks)
    assert len(chunks) >= 2, chunks  # more than one chunk: streamed
    assert chunks[-1].finish_reason == pb.FINISH_LENGTH, chunks[-1]
    assert "".join(c.text for c in chunks) == R["greedy"]["text"]
    assert sum(len(c.token_ids) for c in chunks) == 8
    assert chunks[-1].usage.prompt_tokens == R["greedy"]["prompt_tokens"], chunks[-1].usage
    assert chunks[-1].usage.completion_tokens == 8, chunks[-1].usage
    for c in chunks[:-1]:
        assert c.finish_reason == pb.FINISH_NONE and not c.HasField("error")


def test_single_chunk():
    text, chunks = nc.generate(PROMPT, max_tokens=8, stream=False)
    assert len(chunks) == 1, chunks
    assert text == R["greedy"]["text"], text
    assert chunks[0].finish_reason == pb.FINISH_LENGTH


def test_chat_and_token_ids():
    text, chunks = nc.generate(chat=[("user", CHAT)], max_tokens=24)
    assert text == R["chat"]["text"], (text, R["chat"]["text"])
    text, _ = nc.generate(chat=[("system", "Answer in French."), ("user", CHAT)], max_tokens=24)
    assert text == R["chat_sys"]["text"], (text, R["chat_sys"]["text"])
    ids = [t for c in chunks for t in c.token_ids]
    # the answer's own ids as a prompt: a token-id prompt reaches the engine as is
    text2, chunks2 = nc.generate(token_ids=ids[:8], max_tokens=4)
    assert chunks2[-1].usage.prompt_tokens == 8, chunks2[-1].usage
    assert len(text2) > 0


def test_seed_reported():
    _, chunks = nc.generate(PROMPT, max_tokens=4, temperature=0.8, seed=77)
    assert chunks[0].seed == 77, chunks[0]
    _, chunks = nc.generate(PROMPT, max_tokens=4, temperature=0.8)
    a = chunks[0].seed
    text_a = "".join(c.text for c in chunks)
    text_b, _ = nc.generate(PROMPT, max_tokens=4, temperature=0.8, seed=a)
    assert text_a == text_b, (a, text_a, text_b)  # the reported seed reproduces the answer


def test_cancel():
    rid = nc.submit(prompt="Write a long story about a dragon.", max_tokens=400, ignore_eos=True, stream=True)
    first = next(nc.chunks(rid))
    assert first.finish_reason == pb.FINISH_NONE, first
    t0 = time.monotonic()
    nc.cancel(rid)
    rest = list(nc.chunks(rid, timeout_s=15))
    n_tokens = len(first.token_ids) + sum(len(c.token_ids) for c in rest)
    last = rest[-1]
    assert last.finish_reason in (pb.FINISH_CANCELLED, pb.FINISH_ERROR), last
    if last.finish_reason == pb.FINISH_ERROR:
        assert last.error.code == pb.ERR_CANCELLED, last.error
    assert n_tokens < 400, n_tokens
    assert time.monotonic() - t0 < 10
    text, _ = nc.generate(PROMPT, max_tokens=8)  # the connection and the cluster go on
    assert text == R["greedy"]["text"]


def test_malformed_frame():
    nc.send_raw(b"\x0a\xff\xff\xff\xff\xff")  # field 1 (generate), a length far past the frame
    c = nc.recv_chunk(timeout_s=10)
    assert c.request_id == 0, c
    assert c.finish_reason == pb.FINISH_ERROR and c.error.code != pb.ERR_NONE, c
    assert c.error.message, c
    text, _ = nc.generate(PROMPT, max_tokens=8)
    assert text == R["greedy"]["text"]


def test_invalid_request():
    try:
        nc.generate(PROMPT, max_tokens=8, temperature=-1.0)
    except NativeError as e:
        assert e.code == pb.ERR_INVALID_ARGUMENT and "temperature" in e.message, e
    else:
        raise AssertionError("temperature -1 was accepted")
    try:
        nc.generate(PROMPT, max_tokens=8, model="no-such-model")
    except NativeError as e:
        assert e.code == pb.ERR_NOT_FOUND, e
    else:
        raise AssertionError("an unknown model was served")


def test_interleaved():
    """Two requests in flight on one connection: each gets its own chunks."""
    a = nc.submit(prompt=PROMPT, max_tokens=8)
    b = nc.submit(chat=[("user", CHAT)], max_tokens=24)
    tb = "".join(c.text for c in nc.chunks(b))
    ta = "".join(c.text for c in nc.chunks(a))
    assert ta == R["greedy"]["text"] and tb == R["chat"]["text"], (ta, tb)


def test_pdctl_chat():
    """`pdctl chat` non-interactively: one prompt per line, /reset, one answer line each."""
    lines = f"{CHAT}\n/reset\n{CHAT}\n/quit\nnot sent\n"
    p = subprocess.run([bin_path("pdctl"), "chat", "--api", C.api, "--temperature", "0", "--max-tokens", "24"],
                       input=lines.encode(), capture_output=True, timeout=120)
    out = p.stdout.decode()
    assert p.returncode == 0, (p.returncode, p.stderr.decode())
    want = R["chat"]["text"] + "\n"
    assert out == want + want, (out, want)  # /reset: the second answer is the first one again
    p = subprocess.run([bin_path("pdctl"), "chat", "--api", C.api, "--temperature", "0", "--max-tokens", "24",
                        "--system", "Answer in French."], input=f"{CHAT}\n".encode(), capture_output=True,
                       timeout=120)
    assert p.stdout.decode() == R["chat_sys"]["text"] + "\n", p.stdout
    p = subprocess.run([bin_path("pdctl"), "chat", "--api", C.api, "--model", "no-such-model"],
                       input=b"hello\n", capture_output=True, timeout=60)
    err = p.stderr.decode().strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "ERR_NOT_FOUND" in err[0], (p.returncode, err)


def main():
    global C, nc
    compute_references()
    C = Cluster(n_prefill=1, n_decode=1)

    def connect():
        global nc
        nc = NativeClient(C.api, timeout_s=60)

    rc = run_cluster_tests(C, [connect, test_stream, test_single_chunk, test_chat_and_token_ids, test_seed_reported,
                               test_cancel, test_malformed_frame, test_invalid_request, test_interleaved,
                               test_pdctl_chat])
    if nc:
        nc.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
