"""native_client.py: a Python client of pdserve's native API (protobuf over ZeroMQ), written from the
contract alone: proto/pdserve_api.proto, compiled at import time with grpcio-tools' protoc into a temp dir,
and router/rt_native.h's framing (a DEALER socket; one packed ClientMessage per frame out, one packed
ResponseChunk per frame back). It knows nothing of the C implementation.
"""
import atexit
import importlib
import os
import shutil
import sys
import tempfile
import time

import zmq

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(_ROOT, "proto")


def _compile_protos():
    """Runs grpcio-tools' protoc (python_out) on proto/*.proto; returns the imported pdserve_api_pb2."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="pd-proto-py-")
    atexit.register(shutil.rmtree, out, True)
    files = sorted(f for f in os.listdir(PROTO_DIR) if f.endswith(".proto"))
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}"] + [os.path.join(PROTO_DIR, f) for f in files])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {files}")
    sys.path.insert(0, out)
    return importlib.import_module("pdserve_api_pb2")


pb = _compile_protos()
FINISH_NONE = pb.FINISH_NONE


class NativeError(Exception):
    """A request that ended with FINISH_ERROR: code (pb.ErrorCode value), code_name and message."""

    def __init__(self, code, message):
        super().__init__(f"{pb.ErrorCode.Name(code)}: {message}")
        self.code = code
        self.code_name = pb.ErrorCode.Name(code)
        self.message = message


class NativeClient:
    """One DEALER connection. Requests get ids 1, 2, ... unless given one. Not thread-safe (like its socket)."""

    def __init__(self, endpoint, timeout_s=60.0):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.connect(endpoint)
        self.next_id = 1
        self.pending = {}  # request_id -> chunks that arrived while waiting for another request

    def close(self):
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- sending ----

    def send_raw(self, frame: bytes):
        self.sock.send(frame)

    def submit(self, prompt=None, chat=None, token_ids=None, max_tokens=16, stream=True, temperature=0.0,
               seed=None, stop=(), logprobs=0, ignore_eos=False, timeout_ms=0, model="", request_id=None, **sampling):
        """Sends a GenerateRequest; returns its request_id. chat is a list of (role, content)."""
        rid = request_id if request_id is not None else self.next_id
        self.next_id = max(self.next_id, rid) + 1
        g = pb.GenerateRequest(request_id=rid, model=model, max_tokens=max_tokens, stream=stream,
                               ignore_eos=ignore_eos, timeout_ms=timeout_ms, stop=list(stop))
        if prompt is not None:
            g.text = prompt
        elif chat is not None:
            g.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in chat)
        else:
            g.token_ids.ids.extend(token_ids)
        g.sampling.temperature = temperature
        g.sampling.logprobs = logprobs
        if seed is not None:
            g.sampling.seed = seed
            g.sampling.has_seed = True
        for k, v in sampling.items():
            setattr(g.sampling, k, v)
        self.send_raw(pb.ClientMessage(generate=g).SerializeToString())
        return rid

    def cancel(self, request_id):
        self.send_raw(pb.ClientMessage(cancel=pb.CancelRequest(request_id=request_id)).SerializeToString())

    # ---- receiving ----

    def recv_chunk(self, timeout_s=None):
        """The next ResponseChunk of any request; TimeoutError if none comes in time."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no chunk from {self.endpoint} within {timeout_s} s")
        c = pb.ResponseChunk()
        c.ParseFromString(self.sock.recv())
        return c

    def chunks(self, request_id, timeout_s=None):
        """Yields the chunks of request_id up to and including its last (finish_reason set)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            queue = self.pending.get(request_id)
            if queue:
                c = queue.pop(0)
            else:
                c = self.recv_chunk(max(0.0, deadline - time.monotonic()))
                if c.request_id != request_id:
                    self.pending.setdefault(c.request_id, []).append(c)
                    continue
            yield c
            if c.finish_reason != FINISH_NONE:
                self.pending.pop(request_id, None)
                return

    def generate(self, prompt=None, **kw):
        """One request to its end. Returns (text, chunks); raises NativeError on FINISH_ERROR."""
        rid = self.submit(prompt=prompt, **kw)
        chunks = list(self.chunks(rid))
        last = chunks[-1]
        if last.finish_reason == pb.FINISH_ERROR:
            raise NativeError(last.error.code, last.error.message)
        return "".join(c.text for c in chunks), chunks
