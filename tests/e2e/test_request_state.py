"""Per-request state in the worker is released when a request finishes, is aborted or is preempted."""

import concurrent.futures as cf
import json
import socket
import time

import pytest

from casakv_vllm.tools.greedy import completion_steps, divergence

pytestmark = pytest.mark.e2e

SERIES = ["casakv_requests_live", "casakv_requests_released_total", "casakv_request_restarts_total"]


def _settled(server, want_live=0, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        values = server.metric_values(SERIES)
        if values["casakv_requests_live"] == want_live or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def _abort_midway(server, prompt: str, events: int = 4) -> None:
    """Start a long streamed completion, read ``events`` events (0: none, still prefilling), then drop
    the connection (vLLM aborts it)."""
    body = json.dumps({"model": "demo", "prompt": prompt, "max_tokens": 400, "temperature": 0.0, "stream": True,
                       "ignore_eos": True, "vllm_xargs": {"casakv_policy": "snapkv", "casakv_kv_budget": 64}})
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        if events == 0:
            time.sleep(0.5)  # scheduled and prefilling, no token yet
        seen = b""
        while seen.count(b"data:") < events:
            chunk = sock.recv(4096)
            assert chunk, "server closed the stream early"
            seen += chunk


def test_state_released_on_finish_and_abort(casakv_server, prompts):
    _, long_doc = prompts
    before = _settled(casakv_server)
    for i in range(3):
        casakv_server.post("/v1/completions", {"model": "demo", "prompt": f"{i} {long_doc}", "max_tokens": 4,
                                               "temperature": 0.0,
                                               "vllm_xargs": {"casakv_policy": "snapkv", "casakv_kv_budget": 64}})
    finished = _settled(casakv_server)
    assert finished["casakv_requests_live"] == 0
    assert finished["casakv_requests_released_total"] - before["casakv_requests_released_total"] >= 3
    _abort_midway(casakv_server, "Abort me. " + long_doc)  # mid-decode, after compaction
    aborted = _settled(casakv_server)
    assert aborted["casakv_requests_live"] == 0, aborted
    assert aborted["casakv_requests_released_total"] > finished["casakv_requests_released_total"]
    _abort_midway(casakv_server, "Abort me early. " + long_doc, events=0)  # mid-prefill (8 chunks of 256)
    early = _settled(casakv_server)
    assert early["casakv_requests_live"] == 0, early
    deadline = time.monotonic() + 30
    while (usage := casakv_server.metric_values(["vllm:kv_cache_usage_perc"])["vllm:kv_cache_usage_perc"]) > 0:
        assert time.monotonic() < deadline, f"blocks left over after every request ended: usage {usage}"
        time.sleep(0.5)


def test_preempted_requests_restart_and_answer_as_alone(server_factory, prompts):
    """A KV pool (64 blocks of 16) that holds one of these requests (~34 prompt + 9 generated blocks, 8 of
    them freed by compaction) but not two: vLLM preempts and recomputes some of them; each still gives
    the answer it gives alone (up to near-ties), its keep-sets rebuilt from scratch (and not compacted
    again: it recomputes without the prefix cache)."""
    _, long_doc = prompts
    server = server_factory("casakv", ["--block-size", "16", "--num-gpu-blocks-override", "64",
                                        "--max-model-len", "1000"])
    try:
        docs = [f"Copy {i}. " + long_doc[-1200:] for i in range(4)]

        def ask(doc):
            payload = {"model": "demo", "prompt": doc, "max_tokens": 140, "temperature": 0.0, "ignore_eos": True,
                       "logprobs": 3, "vllm_xargs": {"casakv_policy": "snapkv", "casakv_kv_budget": 400}}
            return completion_steps(server.post("/v1/completions", payload))

        alone = [ask(d) for d in docs]
        with cf.ThreadPoolExecutor(len(docs)) as pool:
            together = list(pool.map(ask, docs))
        values = _settled(server)
        assert values["casakv_request_restarts_total"] > 0, "the pool was meant to force a preemption"
        assert values["casakv_requests_live"] == 0
        for i, (a, b) in enumerate(zip(together, alone)):
            d = divergence(a, b)
            assert d is None or d.is_near_tie(0.5), f"request {i} parts at token {d.index}: {d}"
    finally:
        server.stop()
