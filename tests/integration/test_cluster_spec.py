"""test_cluster_spec.py: speculative decoding is lossless through the whole path (router -> prefill -> decode).

100 prompts of mixed lengths (short questions, code and lists that repeat themselves, RAG-style documents with
a question whose answer quotes them; a few as chat) are answered greedily by `pdctl generate` (the engine in one
process, no speculation: the reference). Then a 1 prefill + 1 decode cluster with n-gram drafting, and one with a
draft model (deploy/make_draft.py: the default model's first 4 layers), answer every prompt alone (one request at a
time) and in batches of 32 (concurrent requests): every answer must be the reference's, token id for token id,
over the native API. Seeded sampled requests must give the reference's tokens too (verification samples with the
request's own random stream). The router's /metrics must show drafts proposed, accepted and rejected, and every
KV block free at the end. PD_TEST_QUICK=1 (the sanitizer run, ~30x slower forwards) keeps the shape at 4 prompts
of 4 tokens: the services' speculation paths under the sanitizers, not the statistics."""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from cluster import Cluster, metric_values, model_path, pdctl_generate
from native_client import NativeClient

QUICK = os.environ.get("PD_TEST_QUICK") == "1"
N_PROMPTS = 4 if QUICK else 100
MAX_TOKENS = 4 if QUICK else 10
BATCH = 32
N_SAMPLED = 1 if QUICK else 10

_FACTS = [
    "The river Ode runs through the town of Marrow for eleven miles before it reaches the sea.",
    "The town council of Marrow meets on the first Tuesday of every month in the old grain hall.",
    "In 1887 a flood destroyed the bridge at Marrow, and the new stone bridge opened in 1891.",
    "The main export of the region is wool, followed by apples, cider and slate from the northern hills.",
    "The Marrow library holds twelve thousand books and a collection of maps drawn by sailors.",
    "Every autumn the town holds a lantern festival that ends with a procession along the river.",
    "The lighthouse at the mouth of the Ode was built in 1902 and is still operated by hand.",
    "Marrow has two schools, a hospital with forty beds and a railway station on the coastal line.",
]
_TOPICS = ["France", "Japan", "Brazil", "Kenya", "Norway", "Canada", "Egypt", "India", "Peru", "Spain"]


def make_prompts(n):
    """Deterministic mix: ~half short, ~a quarter self-repeating (code, lists, counting), the rest RAG-style
    documents of ~80-200 tokens with a question to be answered by quoting; every 7th is a chat request."""
    out = []
    for i in range(n):
        t = _TOPICS[i % len(_TOPICS)]
        kind = i % 4
        if kind in (0, 1):
            text = [f"The capital of {t} is", f"Three facts about {t}:", f"Write a sentence about {t}.",
                    f"{t} is famous for"][i % 4]
        elif kind == 2:
            text = [f"def area_{i}(w, h):\n    return w * h\n\ndef perimeter_{i}(w, h):\n    return",
                    f"{t}, {t}, {t}, Italy, {t}, {t}, {t},",
                    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,",
                    f"a{i} = 1\nb{i} = 2\na{i} = 1\nb{i} = 2\na{i} ="][i % 4]
        else:
            facts = [_FACTS[(i + j) % len(_FACTS)] for j in range(2 + i % 4)]
            doc = " ".join(facts) + " " + " ".join(facts[: 1 + i % 2])
            q = facts[i % len(facts)].split(" ")[1:4]
            text = (f"Document:\n{doc}\n\nQuestion: which sentence of the document mentions "
                    f"\"{' '.join(q)}\"? Quote it exactly.\nAnswer: \"")
        out.append({"prompt": text, "chat": i % 7 == 6})
    return out


PROMPTS = make_prompts(N_PROMPTS)
REF = {}
SAMPLED_REF = {}
draft_path = None


def compute_references():
    for i, p in enumerate(PROMPTS):
        r = pdctl_generate(p["prompt"], max_tokens=MAX_TOKENS, chat=p["chat"], logprobs=1)
        REF[i] = [t for t, _, _ in r["logprobs"]]
        assert len(REF[i]) == r["completion_tokens"], r
    for i in range(N_SAMPLED):
        r = pdctl_generate(PROMPTS[i * 3]["prompt"], max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=100 + i,
                           logprobs=1)
        SAMPLED_REF[i] = [t for t, _, _ in r["logprobs"]]
    lens = [len(p["prompt"]) for p in PROMPTS]
    print(f"     references: {len(REF)} greedy + {len(SAMPLED_REF)} seeded, prompts of {min(lens)}-{max(lens)} "
          f"characters", flush=True)


def make_draft():
    global draft_path
    draft_path = os.path.join(tempfile.mkdtemp(prefix="pd-draft-"), "draft-l4.gguf")
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "make_draft.py")
    subprocess.run([sys.executable, tool, model_path(), draft_path, "--layers", "4"], check=True,
                   capture_output=True, timeout=300)


def _submit(nc, i, sampled=False):
    if sampled:
        p = PROMPTS[i * 3]
        return nc.submit(prompt=p["prompt"], max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=100 + i)
    p = PROMPTS[i]
    if p["chat"]:
        return nc.submit(chat=[("user", p["prompt"])], max_tokens=MAX_TOKENS)
    return nc.submit(prompt=p["prompt"], max_tokens=MAX_TOKENS)


def _tokens(nc, rid):
    return [t for c in nc.chunks(rid, timeout_s=300) for t in c.token_ids]


def _check(label, got, ref):
    wrong = []
    for i, toks in got.items():
        if toks != ref[i]:
            k = next((j for j, (a, b) in enumerate(zip(toks, ref[i])) if a != b), min(len(toks), len(ref[i])))
            wrong.append((i, k, toks[:k + 2], ref[i][:k + 2]))
    assert not wrong, f"{label}: {len(wrong)} of {len(got)} differ (prompt, first differing token, got, want): " \
                      f"{wrong[:4]}"


def run_alone(c):
    with NativeClient(c.api) as nc:
        got = {i: _tokens(nc, _submit(nc, i)) for i in range(N_PROMPTS)}
    _check("alone", got, REF)


def run_batched(c):
    got = {}
    with NativeClient(c.api) as nc:
        for start in range(0, N_PROMPTS, BATCH):
            ids = {i: _submit(nc, i) for i in range(start, min(N_PROMPTS, start + BATCH))}
            for i, rid in ids.items():
                got[i] = _tokens(nc, rid)
    _check(f"batches of {BATCH}", got, REF)


def run_sampled(c):
    with NativeClient(c.api) as nc:
        ids = {i: _submit(nc, i, sampled=True) for i in range(N_SAMPLED)}
        got = {i: _tokens(nc, rid) for i, rid in ids.items()}
    _check("seeded sampling, batched", got, SAMPLED_REF)


def check_metrics_and_idle(c):
    deadline = time.monotonic() + 10
    while True:
        m = c.metrics()
        drafts = sum(metric_values(m, "pdserve_spec_draft_tokens_total").values())
        accepted = sum(metric_values(m, "pdserve_spec_accepted_tokens_total").values())
        rows = sum(metric_values(m, "pdserve_decode_rows_total").values())
        tokens = sum(metric_values(m, "pdserve_decode_tokens_total").values())
        free = metric_values(m, "pdserve_worker_kv_blocks_free")
        total = metric_values(m, "pdserve_worker_kv_blocks_total")
        running = sum(metric_values(m, "pdserve_worker_running_seqs").values())
        if (free == total and not running and drafts > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    c.summary = (f"{drafts:.0f} drafts, {accepted:.0f} accepted ({accepted / max(drafts, 1):.0%}), "
                 f"{tokens / max(rows, 1):.2f} tokens per sequence per step")
    assert 0 < accepted <= drafts, (drafts, accepted)  # drafts were used
    assert QUICK or accepted < drafts, (drafts, accepted)  # and some rolled back (4 tokens may all be right)
    assert free == total and not running, (free, total, running)


def cluster(spec):
    # fixed k: this test is about correctness, and with the cost model a loaded machine may (rightly) draft little.
    # One thread per worker: the two clusters run at the same time, on 2 cores.
    cfg = {"decode": {"spec": spec, "spec_k": 3 if spec == "ngram" else 2, "spec_fixed_k": True},
           "engine": {"threads": 1}}
    if spec == "draft":
        cfg["decode"]["draft_model"] = draft_path
    return Cluster(n_prefill=1, n_decode=1, config=cfg)


def _run_one(spec, c, results):
    """The checks against one cluster, in order; (name, seconds, traceback or None) into results."""
    for t in (run_alone, run_batched, run_sampled, check_metrics_and_idle):
        t0 = time.monotonic()
        try:
            t(c)
            results.append((f"{t.__name__}[{spec}]", time.monotonic() - t0, None))
        except Exception:
            results.append((f"{t.__name__}[{spec}]", time.monotonic() - t0, traceback.format_exc()))


def main():
    compute_references()
    make_draft()
    clusters = {spec: cluster(spec) for spec in ("ngram", "draft")}
    results = {spec: [] for spec in clusters}
    started = []
    try:
        for spec, c in clusters.items():
            c.start()
            started.append(c)
        # both at once: an "alone" run keeps one request in flight, so one cluster leaves a core idle
        threads = [threading.Thread(target=_run_one, args=(spec, c, results[spec])) for spec, c in clusters.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except Exception:
        traceback.print_exc()
        results["start"] = [("cluster start", 0.0, traceback.format_exc())]
    n_fail = 0
    for spec, rs in results.items():
        for name, dt, tb in rs:
            print(f"{'ok  ' if tb is None else 'FAIL'} {name} ({dt:.1f} s)", flush=True)
            if tb:
                n_fail += 1
                print(tb, file=sys.stderr, flush=True)
        c = clusters.get(spec)
        if c is not None and getattr(c, "summary", None):
            print(f"     {spec}: {c.summary}", flush=True)
    for spec, c in clusters.items():
        try:
            c.stop(check=n_fail == 0)  # every service exits 0 on SIGTERM
            print(f"ok   clean_shutdown[{spec}]", flush=True)
        except Exception:
            n_fail += 1
            print(f"FAIL clean_shutdown[{spec}]", flush=True)
            traceback.print_exc()
    if n_fail:
        for c in started:
            c.dump_logs()
    for c in clusters.values():
        c.stop(check=False)
        if n_fail == 0:
            shutil.rmtree(c.log_dir, ignore_errors=True)
    print(f"{sum(len(r) for r in results.values()) + len(clusters) - n_fail} passed, {n_fail} failed", flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
