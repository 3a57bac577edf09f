"""test_cluster_openai.py: one prefill + one decode worker behind the router, driven by the official `openai`
client: completions and chat, streamed and not, each compared with `pdctl generate` (the single-process
reference); usage counts; logprobs and top logprobs through the disaggregated path; seeded sampling
repeatable and equal to the reference; stop strings; error mapping (400 with a message, 404 for an unknown
model)."""
import sys

import openai

from cluster import Cluster, pdctl_generate, run_cluster_tests

PROMPT = "The capital of France is"
CHAT = "What is the capital of France?"
STORY = "Once upon a time"
LP_TOL = 2e-3  # the reference prints logprobs with 4 decimals

R = {}  # references, computed before the cluster starts (no CPU contention, no shared state)
C = None  # the cluster
client = None
model_id = None


def compute_references():
    R["greedy"] = pdctl_generate(PROMPT, max_tokens=8, logprobs=3)
    R["chat"] = pdctl_generate(CHAT, max_tokens=12, chat=True, logprobs=3)
    R["chat_long"] = pdctl_generate(CHAT, max_tokens=64, chat=True)
    R["seeded"] = pdctl_generate(STORY, max_tokens=16, temperature=0.9, seed=1234)
    R["stop"] = pdctl_generate(PROMPT, max_tokens=8, stop=["answer"])


def check_usage(usage, ref):
    assert usage.prompt_tokens == ref["prompt_tokens"], (usage, ref)
    if ref["finish"] == "length":
        assert usage.completion_tokens == ref["completion_tokens"], (usage, ref)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage


def test_models_list():
    ids = [m.id for m in client.models.list().data]
    assert ids == [model_id], ids


def test_completion_greedy():
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, temperature=0)
    ref = R["greedy"]
    assert r.choices[0].text == ref["text"], (r.choices[0].text, ref["text"])
    assert ref["finish"] == "length" and r.choices[0].finish_reason == "length", r.choices[0].finish_reason
    check_usage(r.usage, ref)


def test_completion_stream():
    text, finish, usage = "", None, None
    stream = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    n_chunks = 0
    for ch in stream:
        n_chunks += 1
        if ch.choices:
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    assert text == R["greedy"]["text"], (text, R["greedy"]["text"])
    assert n_chunks > 2, n_chunks  # really streamed, not one body
    assert finish == "length", finish
    assert usage is not None
    check_usage(usage, R["greedy"])


def test_chat_greedy():
    ref = R["chat_long"]
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT}], max_tokens=64,
                                       temperature=0)
    m = r.choices[0]
    assert m.message.role == "assistant"
    assert m.message.content == ref["text"], (m.message.content, ref["text"])
    assert m.finish_reason == ref["finish"], (m.finish_reason, ref["finish"])
    check_usage(r.usage, ref)


def test_chat_stream():
    ref = R["chat_long"]
    text, finish, roles = "", None, set()
    for ch in client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT}],
                                             max_tokens=64, temperature=0, stream=True):
        for c in ch.choices:
            if c.delta.role:
                roles.add(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == ref["text"], (text, ref["text"])
    assert finish == ref["finish"], finish
    assert roles == {"assistant"}, roles


def test_completion_logprobs():
    ref = R["greedy"]["logprobs"]
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ref) == 8, (lp, ref)
    for i, (tok, want, tops) in enumerate(ref):
        assert abs(lp.token_logprobs[i] - want) < LP_TOL, (i, lp.token_logprobs[i], want)
        got = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert len(lp.top_logprobs[i]) == 3, lp.top_logprobs[i]
        assert all(abs(a - b) < LP_TOL for a, b in zip(got, [t[1] for t in tops])), (i, got, tops)
    assert "".join(lp.tokens) == r.choices[0].text, (lp.tokens, r.choices[0].text)


def test_chat_logprobs():
    ref = R["chat"]
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT}], max_tokens=12,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == ref["text"]
    n = len(ref["logprobs"]) - (1 if ref["finish"] == "stop" else 0)  # the end-of-turn token has no text
    assert len(content) >= n, (len(content), n)
    for i, (tok, want, tops) in enumerate(ref["logprobs"][:n]):
        assert abs(content[i].logprob - want) < LP_TOL, (i, content[i].logprob, want)
        assert len(content[i].top_logprobs) == 3, content[i].top_logprobs
        got = [t.logprob for t in content[i].top_logprobs]
        assert all(abs(a - b) < LP_TOL for a, b in zip(got, [t[1] for t in tops])), (i, got, tops)


def test_seeded_sampling():
    ref = R["seeded"]
    texts = [client.completions.create(model=model_id, prompt=STORY, max_tokens=16, temperature=0.9, top_p=1,
                                       seed=1234).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1], texts
    assert texts[0] == ref["text"], (texts[0], ref["text"])
    other = client.completions.create(model=model_id, prompt=STORY, max_tokens=16, temperature=0.9, seed=4321)
    assert other.choices[0].text != ref["text"], "another seed gave the same 16 sampled tokens"


def test_stop_string():
    ref = R["stop"]
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, temperature=0, stop=["answer"])
    assert r.choices[0].text == ref["text"] == " Paris.\n\nThe ", (r.choices[0].text, ref["text"])
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason


def test_bad_temperature():
    try:
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=4, temperature=-1)
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert "temperature" in str(e.message), e.message
        return
    raise AssertionError("temperature -1 was accepted")


def test_unknown_model():
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4)
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert "no-such-model" in str(e.message), e.message
        return
    raise AssertionError("an unknown model was served")


def test_health_and_metrics():
    m = C.metrics()
    assert "pdserve_requests_total" in m, m[:400]


def main():
    global C, client, model_id
    compute_references()
    C = Cluster(n_prefill=1, n_decode=1)
    client = openai.OpenAI(base_url=C.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def setup_model_id():
        global model_id
        model_id = client.models.list().data[0].id

    return run_cluster_tests(C, [setup_model_id, test_models_list, test_completion_greedy, test_completion_stream,
                                 test_chat_greedy, test_chat_stream, test_completion_logprobs, test_chat_logprobs,
                                 test_seeded_sampling, test_stop_string, test_bad_temperature, test_unknown_model,
                                 test_health_and_metrics])


if __name__ == "__main__":
    sys.exit(main())
