"""casakv with the dense policy against vLLM's stock CPU backend (CPU_ATTN).

- float32: greedy output matches token for token (prompts incl. a chunked,
  prefix-cached ~2k-token prompt).
- bfloat16: the two kernels round differently (CPU_ATTN keeps probabilities in
  bf16, casakv in fp32), so sequences may part at a near-tie; they must be
  identical up to a token where both top choices are within NEAR_TIE nats.
- Installing the plugin changes nothing when another backend is chosen.
"""

import pytest

from casakv_vllm.tools.greedy import chat_steps, completion_steps, divergence

pytestmark = pytest.mark.e2e

MAX_TOKENS = 32
NEAR_TIE = 0.5
FP32 = ["--dtype", "float32"]


def _greedy_outputs(server, prompts):
    """Per prompt: list of (token, {top token: logprob})."""
    chat_prompts, long_doc = prompts
    outs = []
    for p in chat_prompts:
        outs.append(chat_steps(server.chat(p, max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=3)))
    payload = {"model": "demo", "prompt": long_doc, "max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": 3}
    outs.append(completion_steps(server.post("/v1/completions", payload)))
    return outs


def _tokens(outs):
    return [[tok for tok, _ in seq] for seq in outs]


def _outputs_of(server_factory, prompts, backend, extra=(), env=None):
    server = server_factory(backend, extra, env)
    try:
        return _greedy_outputs(server, prompts)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stock_bf16(server_factory, prompts):
    return _outputs_of(server_factory, prompts, None)


@pytest.mark.slow  # 100 s: make test-all; make test keeps the bf16 check
def test_dense_matches_stock_token_for_token_fp32(server_factory, prompts):
    stock = _tokens(_outputs_of(server_factory, prompts, None, FP32))
    ours = _tokens(_outputs_of(server_factory, prompts, "casakv", FP32 + ["--block-size", "16"]))
    assert len(ours) == len(stock) >= 5
    for i, (a, b) in enumerate(zip(ours, stock)):
        assert len(a) > 0 and a == b, f"prompt {i}: casakv {''.join(a)!r} != stock {''.join(b)!r}"


def test_dense_matches_stock_bf16_up_to_near_ties(casakv_server, stock_bf16, prompts):
    ours = _greedy_outputs(casakv_server, prompts)
    exact = 0
    for i, (a, b) in enumerate(zip(ours, stock_bf16)):
        d = divergence(a, b)
        if d is None:
            exact += 1
            continue
        assert d.is_near_tie(NEAR_TIE), f"prompt {i} parts at token {d.index} without a near-tie: {d}"
    assert exact >= len(ours) // 2, f"only {exact}/{len(ours)} bf16 outputs identical"


@pytest.mark.slow  # 53 s (a third server): make test-all
def test_stock_backend_unchanged_by_plugin(server_factory, stock_bf16, prompts):
    """Stock backend with the plugin disabled (VLLM_PLUGINS allowlist) == with it loaded."""
    server = server_factory(None, env={"VLLM_PLUGINS": "no-such-plugin"})
    try:
        assert not server.casakv_metrics(), "plugin loaded although VLLM_PLUGINS excluded it"
        assert _tokens(_greedy_outputs(server, prompts)) == _tokens(stock_bf16)
    finally:
        server.stop()
