"""A non-dense policy served through the real engine: `streaming` (sinks + window)."""

import json

import pytest

from casakv_vllm.tools.greedy import chat_steps, divergence

pytestmark = pytest.mark.e2e

SINK, WINDOW = 4, 60


@pytest.fixture(scope="module")
def streaming_server(server_factory):
    cfg = {"casakv": {"policy": "streaming", "policy_params": {"sink": SINK, "window": WINDOW}}}
    server = server_factory("casakv", ["--additional-config", json.dumps(cfg)])
    yield server
    server.stop()


def test_short_prompt_inside_window_matches_dense(streaming_server, casakv_server):
    """While the whole context fits in sink + window, streaming == dense (up to near-ties)."""
    prompt = "What is the capital of France?"
    ours = chat_steps(streaming_server.chat(prompt, max_tokens=12, logprobs=True, top_logprobs=3))
    dense = chat_steps(casakv_server.chat(prompt, max_tokens=12, logprobs=True, top_logprobs=3))
    d = divergence(ours, dense)
    assert d is None or d.is_near_tie(0.5), d
    # this chat prompt's first token is an exact bf16 tie ("The" / "L") on this model: the fact check
    # uses a completion without one
    text = streaming_server.post("/v1/completions", {"model": "demo", "prompt": "The capital of France is",
                                                     "max_tokens": 6, "temperature": 0.0})["choices"][0]["text"]
    assert "Paris" in text


def test_long_prompt_attends_only_sink_and_window(streaming_server, prompts):
    _, long_doc = prompts
    names = ["casakv_kv_tokens_attended_total", "casakv_kv_tokens_causal_total"]
    before = streaming_server.metric_values(names)
    reply = streaming_server.post("/v1/completions", {"model": "demo", "prompt": long_doc, "max_tokens": 8,
                                                      "temperature": 0.0})
    n_prompt = reply["usage"]["prompt_tokens"]
    assert n_prompt > 1000 and reply["choices"][0]["text"]
    after = streaming_server.metric_values(names)
    attended = after["casakv_kv_tokens_attended_total"] - before["casakv_kv_tokens_attended_total"]
    causal = after["casakv_kv_tokens_causal_total"] - before["casakv_kv_tokens_causal_total"]
    # each query token sees at most sink + window keys: density ~ (sink+window) / (n/2)
    assert 0 < attended < causal * 4 * (SINK + WINDOW) / n_prompt
    lines = streaming_server.casakv_metrics()
    assert any('policy="streaming"' in ln for ln in lines), lines
