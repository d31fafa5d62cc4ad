"""Fixtures that run a real `vllm serve` (CPU build) with the demo model."""

import pytest

from casakv_vllm.tools.serving import VllmServer, cpu_env

# dynamo + eager instead of inductor: the same engine, minutes less start-up.
FAST_START = {"VLLM_CPU_CI_ENV": "1"}

# Exercise chunked prefill (small token budget) and prefix caching everywhere.
COMMON_ARGS = ["--max-model-len", "4096", "--dtype", "bfloat16", "--max-num-batched-tokens", "256",
               "--enable-prefix-caching", "--max-num-seqs", "8"]


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 plus 30?",
]


def long_document(n_sentences: int = 120) -> str:
    """A ~2k-token prompt: longer than the 256-token prefill chunk, so it is chunked."""
    facts = [f"Fact {i}: the code word for box {i} is {chr(65 + i % 26)}{i * 7 % 97}." for i in range(n_sentences)]
    return " ".join(facts) + " Question: what is the code word for box 3? Answer:"


@pytest.fixture(scope="session")
def prompts():
    """(chat prompts, long document) used by several tests."""
    return CHAT_PROMPTS, long_document()


@pytest.fixture(scope="session")
def server_factory(demo_model, tmp_path_factory):
    """start(backend, extra_args=(), env=None) -> a started VllmServer."""
    return lambda backend, extra=(), env=None: start_server(demo_model, backend, extra, env, tmp_path_factory)


@pytest.fixture(scope="session")
def demo_model():
    from casakv_vllm.tools.demo_model import ensure_demo_model

    return str(ensure_demo_model())


def start_server(model, backend, extra=(), env=None, tmp_path_factory=None):
    log = tmp_path_factory.mktemp("logs") / f"{backend or 'stock'}.log" if tmp_path_factory else None
    server = VllmServer(model=model, attention_backend=backend, extra_args=COMMON_ARGS + list(extra),
                        env={**cpu_env(), **FAST_START, **(env or {})}, log_path=log)
    return server.start()


@pytest.fixture(scope="session")
def casakv_server(demo_model, tmp_path_factory):
    """casakv, dense policy, block size 16 (the CPU default is 128)."""
    server = start_server(demo_model, "casakv", ["--block-size", "16"], tmp_path_factory=tmp_path_factory)
    yield server
    server.stop()
