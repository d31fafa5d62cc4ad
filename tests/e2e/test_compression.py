"""Real freeing on the CPU build: a compacting request gives its blocks back to vLLM's pool, and a
request sharing its prompt prefix is not served the moved tokens."""

import uuid

import pytest

from casakv_vllm.compress.rule import CompactionTerms, cdiv
from casakv_vllm.config import CasakvConfig
from casakv_vllm.policies import build_policy
from casakv_vllm.tools.greedy import completion_steps, divergence

pytestmark = pytest.mark.e2e

SERIES = ["casakv_kv_blocks_freed_total", "casakv_compression_ratio_count", "casakv_compression_ratio_sum",
          "casakv_compaction_seconds_count"]


def _ask(server, prompt, xargs=None, salt=None, max_tokens=24):
    payload = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 3,
               "ignore_eos": True}
    if xargs:
        payload["vllm_xargs"] = xargs
    if salt:
        payload["cache_salt"] = salt
    reply = server.post("/v1/completions", payload)
    return completion_steps(reply), reply["usage"]["prompt_tokens"]


def test_snapkv_returns_the_blocks_its_rule_names(casakv_server, prompts):
    _, long_doc = prompts
    before = casakv_server.metric_values(SERIES)
    _, prompt_len = _ask(casakv_server, "Compress me. " + long_doc,
                         {"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25}, salt=uuid.uuid4().hex)
    after = casakv_server.metric_values(SERIES)
    terms = CompactionTerms(16, prompt_len, 0, cdiv(prompt_len, 4))
    assert after["casakv_kv_blocks_freed_total"] - before["casakv_kv_blocks_freed_total"] == len(terms.freed_blocks)
    assert after["casakv_compression_ratio_count"] - before["casakv_compression_ratio_count"] == 1
    held = (after["casakv_compression_ratio_sum"] - before["casakv_compression_ratio_sum"])
    assert held < 0.35, f"blocks held over dense: {held:.2f}"  # a quarter of the prompt, plus the tail
    assert after["casakv_compaction_seconds_count"] - before["casakv_compaction_seconds_count"] == 30  # layers


def test_a_request_sharing_the_prefix_gets_its_own_tokens(casakv_server, prompts):
    """The compacting request's blocks never enter the prefix cache: a dense request with the same
    prompt prefix, sent after it, answers as it does in a cache namespace of its own."""
    _, long_doc = prompts
    doc = "Shared prefix. " + long_doc
    alone, _ = _ask(casakv_server, doc + " Again:", salt=uuid.uuid4().hex)
    _ask(casakv_server, doc, {"casakv_policy": "snapkv", "casakv_kv_budget": 128})
    after, _ = _ask(casakv_server, doc + " Again:")
    d = divergence(after, alone)
    assert d is None or d.is_near_tie(0.5), d


@pytest.mark.parametrize("xargs", [{"casakv_policy": "h2o", "casakv_kv_budget": 64},
                                   {"casakv_policy": "streaming", "casakv_kv_budget": 64,
                                    "casakv_policy_params": '{"scope": "decode"}'},
                                   {"casakv_policy": "snapkv", "casakv_kv_budget": 64}])
def test_long_generations_free_a_chunk_at_each_event(casakv_server, prompts, xargs):
    """Re-compaction every ``chunk_size`` generated tokens: the blocks freed are the rule's (the first
    event's plus one chunk's per later event); a policy that evicts as it goes (H2O, decode-scope
    streaming) answers as it does when compacted only once; a select-once policy keeps its budget."""
    _, long_doc = prompts
    prompt, tokens, chunk = "Keep generating. " + long_doc[:3000], 120, 32
    before = casakv_server.metric_values(SERIES)
    ours, prompt_len = _ask(casakv_server, prompt, {**xargs, "casakv_chunk_size": chunk}, salt=uuid.uuid4().hex,
                            max_tokens=tokens)
    freed = casakv_server.metric_values(SERIES)["casakv_kv_blocks_freed_total"] - before["casakv_kv_blocks_freed_total"]
    terms = CompactionTerms(16, prompt_len, 0, 64, chunk)
    # the last scheduling of the request computes position prompt_len + tokens - 2
    want = terms.settled_tail(prompt_len + tokens - 2) // 16 - terms.head_end // 16
    assert want > len(terms.freed_blocks) and freed == want, (freed, want)
    if xargs["casakv_policy"] != "snapkv":
        once, _ = _ask(casakv_server, prompt, {**xargs, "casakv_chunk_size": 4096}, salt=uuid.uuid4().hex,
                       max_tokens=tokens)
        d = divergence(ours, once)
        assert d is None or d.is_near_tie(0.5), d


@pytest.mark.parametrize("policy", ["snapkv", "casakv"])
def test_prefill_compression_frees_blocks_while_the_prompt_is_prefilled(casakv_server, prompts, policy):
    """``prefill_compression``: the ~2k-token prompt, prefilled in 256-token chunks, is compacted every
    ``chunk_size`` tokens past its region and at its last token: the blocks freed are the rule's, all of
    them before the first decode step, and the request still answers.  Under ``casakv`` the last chunk's
    event estimates each head's pattern from what the cache holds (30 x 3 heads on ``/metrics``)."""
    _, long_doc = prompts
    xargs = {"casakv_policy": policy, "casakv_kv_ratio": 0.25, "casakv_prefill_compression": True,
             "casakv_chunk_size": 256}
    series = SERIES + ["casakv_heads"]
    before = casakv_server.metric_values(series)
    steps, prompt_len = _ask(casakv_server, "Compress me early. " + long_doc, xargs, salt=uuid.uuid4().hex,
                             max_tokens=8)
    after = casakv_server.metric_values(series)
    cfg = CasakvConfig(policy=policy, kv_ratio=0.25, prefill_compression=True, chunk_size=256)
    slots = build_policy(cfg, num_layers=30).slot_budget(prompt_len, 3)
    terms = CompactionTerms(16, prompt_len, 0, slots, 256, prefill=True)
    events = sorted({terms.event_in(c, min(c + 256, prompt_len)) for c in range(0, prompt_len, 256)} - {None})
    assert len(events) >= 3 and events[-1] == prompt_len - 1  # several chunks compacted, the last at P - 1
    freed = after["casakv_kv_blocks_freed_total"] - before["casakv_kv_blocks_freed_total"]
    assert freed == (terms.tail_at(prompt_len - 1) - terms.head_end) // 16
    assert after["casakv_compaction_seconds_count"] - before["casakv_compaction_seconds_count"] == 30 * len(events)
    assert after["casakv_heads"] - before["casakv_heads"] == (30 * 3 if policy == "casakv" else 0)
    assert len(steps) == 8 and "".join(t for t, _ in steps).strip()


def test_casakv_policy_frees_blocks_and_reports_its_patterns(casakv_server, prompts):
    """The ``casakv`` policy served per request: its keep-sets come from each head's estimated pattern, its
    compacted region is as wide as its widest head (``(1 + spread)`` x the budget), later events re-profile
    heads, and ``/metrics`` shows the heads per pattern (one per layer and KV head: 30 x 3) and re-profiles."""
    _, long_doc = prompts
    prompt, tokens, chunk = "Profile me. " + long_doc[:3000], 100, 32
    series = SERIES + ["casakv_heads", "casakv_reprofile_total", "casakv_reprofile_checks_total"]
    before = casakv_server.metric_values(series)
    xargs = {"casakv_policy": "casakv", "casakv_kv_budget": 64, "casakv_chunk_size": chunk,
             "casakv_policy_params": '{"reprofile_interval": 32}'}
    steps, prompt_len = _ask(casakv_server, prompt, xargs, salt=uuid.uuid4().hex, max_tokens=tokens)
    after = casakv_server.metric_values(series)
    terms = CompactionTerms(16, prompt_len, 0, int(1.25 * 64), chunk)
    want = terms.settled_tail(prompt_len + tokens - 2) // 16 - terms.head_end // 16
    freed = after["casakv_kv_blocks_freed_total"] - before["casakv_kv_blocks_freed_total"]
    assert want > len(terms.freed_blocks) and freed == want, (freed, want)
    assert after["casakv_heads"] - before["casakv_heads"] == 30 * 3
    reprofiled = after["casakv_reprofile_total"] - before["casakv_reprofile_total"]
    checks = after["casakv_reprofile_checks_total"] - before["casakv_reprofile_checks_total"]
    # three events (generated tokens 32, 64, 96) check every head not yet full: 30 x 3 at most each
    assert 0 < checks <= 3 * 30 * 3 and 0 <= reprofiled <= min(checks, 30 * 3), (checks, reprofiled)
    assert len(steps) == tokens and "".join(t for t, _ in steps).strip()


def test_casakv_sparse_prefill_reads_less_than_causal_attention(casakv_server, prompts):
    """``sparse_prefill``: the prompt's chunks are computed under the patterns the estimator picks from
    their own queries, so its prefill reads a fraction of the causal KV (``casakv_kv_tokens_*``), and the
    request answers."""
    _, long_doc = prompts
    series = ["casakv_kv_tokens_attended_total", "casakv_kv_tokens_causal_total"]
    xargs = {"casakv_policy": "casakv", "casakv_kv_budget": 64,
             "casakv_policy_params": '{"sparse_prefill": true, "sparse_min_len": 128}'}
    before = casakv_server.metric_values(series)
    steps, prompt_len = _ask(casakv_server, "Read this. " + long_doc[:3000], xargs, salt=uuid.uuid4().hex,
                             max_tokens=1)
    after = casakv_server.metric_values(series)
    attended, causal = (after[s] - before[s] for s in series)
    assert prompt_len > 512 and causal >= 30 * 3 * prompt_len * (prompt_len + 1) // 2
    assert attended < 0.8 * causal, (attended, causal)
    assert len(steps) == 1
