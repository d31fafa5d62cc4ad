"""Tensor parallelism on the CPU build: a random-weight Llama with 4 KV heads served at TP=1 and TP=2.

The compaction rule is the same on every rank by construction (one slot count for every layer and head;
``compress.rule``); here both ranks compact in the same steps, the scheduler frees the same blocks as at
TP=1, and the greedy tokens are TP=1's, dense and under snapkv at 4x."""

import uuid

import pytest

from casakv_vllm.tools.demo_model import tiny_llama
from casakv_vllm.tools.greedy import completion_steps, divergence
from casakv_vllm.tools.serving import VllmServer, cpu_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # two servers, ~90 s: make test-all

LAYERS = 4
ARGS = ["--dtype", "float32", "--block-size", "16", "--max-model-len", "4096", "--max-num-batched-tokens", "256"]
SERIES = ["casakv_kv_blocks_freed_total", "casakv_compaction_seconds_count"]


def _serve(model, tp, tmp_path):
    env = {**cpu_env(2), "VLLM_CPU_CI_ENV": "1"}
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % 2) for i in range(tp))  # the box's 2 cores
    server = VllmServer(model=str(model), attention_backend="casakv", extra_args=ARGS + ["--tensor-parallel-size",
                        str(tp)], env=env, log_path=tmp_path / f"tp{tp}.log").start()
    doc = " ".join(f"Fact {i}: the code word for box {i} is {chr(65 + i % 26)}{i * 7 % 97}." for i in range(80))
    try:
        out = {}
        for name, xargs in (("dense", None), ("snapkv", {"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25})):
            payload = {"model": "demo", "prompt": doc, "max_tokens": 24, "temperature": 0.0, "logprobs": 3,
                       "ignore_eos": True, "cache_salt": uuid.uuid4().hex}
            if xargs:
                payload["vllm_xargs"] = xargs
            out[name] = completion_steps(server.post("/v1/completions", payload))
        return out, server.metric_values(SERIES)
    finally:
        server.stop()


def test_tp2_answers_and_frees_as_tp1(tmp_path):
    model = tiny_llama(tmp_path / "tiny-llama-4kv")
    one, m1 = _serve(model, 1, tmp_path)
    two, m2 = _serve(model, 2, tmp_path)
    for name in ("dense", "snapkv"):
        d = divergence(two[name], one[name])
        assert d is None or d.is_near_tie(0.5), (name, d)
    assert m1["casakv_kv_blocks_freed_total"] == m2["casakv_kv_blocks_freed_total"] > 0
    assert m1["casakv_compaction_seconds_count"] == LAYERS  # one compaction per layer ...
    assert m2["casakv_compaction_seconds_count"] == 2 * LAYERS  # ... on each of the two ranks
