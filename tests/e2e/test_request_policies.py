"""Per-request policies (``vllm_xargs``) through the real server, and the quick quality suite."""

import json
import subprocess
import sys
import urllib.error

import pytest

from casakv_vllm.tools.greedy import chat_steps, divergence

pytestmark = pytest.mark.e2e

LAYERS, KV_HEADS = 30, 3  # the demo model


def _post_error(server, xargs):
    try:
        server.post("/v1/completions", {"model": "demo", "prompt": "Hello", "max_tokens": 2, "vllm_xargs": xargs})
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    return 200, ""


@pytest.mark.parametrize("xargs, expected", [
    ({"casakv_policy": "nope"}, "casakv request parameters: policy="),
    ({"casakv_policy": "snapkv"}, "needs kv_budget or kv_ratio"),
    ({"casakv_policy": "snapkv", "casakv_kv_budget": -3}, "kv_budget=-3"),
    ({"casakv_policy": "snapkv", "casakv_kv_ratio": 0.5, "casakv_kv_budget": 9}, "not both"),
    ({"casakv_budget": 64}, "unknown request parameter 'casakv_budget'"),
    ({"casakv_policy": "snapkv", "casakv_kv_budget": 8, "casakv_policy_params": "{window: 4"}, "not valid JSON"),
    ({"casakv_policy": "streaming", "casakv_kv_budget": 64}, "changes prefill attention"),
])
def test_bad_request_parameters_are_rejected_with_one_line(casakv_server, xargs, expected):
    code, body = _post_error(casakv_server, xargs)
    assert code == 400, body
    message = json.loads(body)["error"]["message"]
    assert expected in message and "\n" not in message and "Traceback" not in message
    assert casakv_server.chat("Say hi.", max_tokens=4)["choices"][0]["message"]["content"]  # still serving


def test_keeping_everything_is_full_attention(casakv_server, prompts):
    """snapkv with a budget above the prompt length keeps every token: same greedy output as dense."""
    _, long_doc = prompts
    kw = dict(max_tokens=16, logprobs=True, top_logprobs=3)
    dense = chat_steps(casakv_server.chat(long_doc, **kw))
    ours = chat_steps(casakv_server.chat(long_doc, vllm_xargs={"casakv_policy": "snapkv", "casakv_kv_budget": 4096},
                                         **kw))
    d = divergence(ours, dense)
    assert d is None or d.is_near_tie(0.5), d


@pytest.mark.parametrize("policy, params", [("h2o", None), ("streaming", {"scope": "decode"})])
def test_fixed_budget_policy_reads_exactly_its_budget(casakv_server, prompts, policy, params):
    """Every decode step of h2o / decode-scope streaming reads exactly `budget` tokens per layer and head."""
    _, long_doc = prompts
    budget = 64
    xargs = {"casakv_policy": policy, "casakv_kv_budget": budget}
    if params:
        xargs["casakv_policy_params"] = json.dumps(params)
    label = f"{policy}/kv_budget={budget}"
    names = [f'casakv_decode_kv_tokens_attended_total{{policy="{label}"}}',
             f'casakv_decode_kv_tokens_causal_total{{policy="{label}"}}']

    def counters():
        casakv_server.metric_values(["casakv_forward_calls_total"])
        text = casakv_server.get_text("/metrics")
        return [next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(n)), 0.0) for n in names]

    before = counters()
    reply = casakv_server.post("/v1/completions", {"model": "demo", "prompt": long_doc, "max_tokens": 12,
                                                   "temperature": 0.0, "ignore_eos": True, "vllm_xargs": xargs})
    n_prompt, n_out = reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]
    assert n_out == 12 and n_prompt > 1000
    after = counters()
    steps = n_out - 1  # the first token comes from the prefill
    assert after[0] - before[0] == budget * LAYERS * KV_HEADS * steps
    causal = sum(n_prompt + s for s in range(1, n_out)) * LAYERS * KV_HEADS  # step s reads n_prompt + s
    assert after[1] - before[1] == causal


def test_quick_quality_suite(casakv_server, tmp_path):
    """`casakv eval quality` end to end against the running server: a few samples, two policies."""
    out = tmp_path / "q.json"
    cmd = [sys.executable, "-m", "casakv_vllm.tools.cli", "eval", "quality", "--url", casakv_server.url,
           "--policies", "full,snapkv", "--budgets", "128", "--tasks", "passkey,longdoc", "--samples", "2",
           "--context", "1024", "--json", str(out), "--md", str(tmp_path / "q.md"), "--plot", str(tmp_path / "q.png")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    cells = {(r["policy"], r["budget"], r["protocol"], r["task"]): r for r in data["results"]}
    for protocol in ("aware", "agnostic"):  # --protocol both, the default
        for task in ("passkey", "longdoc", "longdoc_kl"):
            assert cells[("snapkv", "128", protocol, task)]["n"] == 2
        assert 0.0 < cells[("snapkv", "128", protocol, "passkey")]["kv_ratio"] < 0.3  # 128 + generated of ~1k
    assert cells[("full", "full", "both", "passkey")]["kv_ratio"] == 1.0
    assert cells[("full", "full", "both", "longdoc")]["score"] == 1.0  # the reference agrees with itself
    assert data["settings"]["protocols"] == ["aware", "agnostic"] and data["settings"]["finished"]
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    assert "snapkv" in (tmp_path / "q.md").read_text()
