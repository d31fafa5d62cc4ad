"""The question-agnostic protocol (``vllm_xargs`` ``casakv_question_at``): the request parameter, the
compaction rule with a question, the batch plan, and a question's attention through its context's keep-set
on the CPU path, against the same context served alone."""

import pytest
from vllm.sampling_params import SamplingParams

from casakv_vllm.compress.rule import CompactionTerms, compaction_terms
from casakv_vllm.config import CasakvConfig
from casakv_vllm.observe.store import ObservationStore
from casakv_vllm.plan.batch import plan_batch
from casakv_vllm.policies import build_policy
from casakv_vllm.requests.params import check_request, question_at, request_overrides
from casakv_vllm.requests.resolve import PolicyResolver
from casakv_vllm.requests.state import RequestTable
from casakv_vllm.tools.harness import check_question

SNAP = {"casakv_policy": "snapkv", "casakv_kv_budget": 48}


@pytest.mark.parametrize("value", [-3, 0, 121, "12", 12.0, True, None])
def test_a_bad_question_position_is_one_line(value):
    with pytest.raises(ValueError, match="casakv_question_at=") as info:
        question_at({"casakv_question_at": value}, 120)
    msg = str(info.value)
    assert "\n" not in msg and "from 1 to the prompt length (120)" in msg


def test_question_position_parses_and_is_not_a_setting():
    assert question_at({"casakv_question_at": 100}, 120) == 100
    assert question_at({"casakv_question_at": 120}, 120) is None  # the question starts at the end: none
    assert question_at({"casakv_question_at": 100}) == 100  # the API server's first check: no prompt yet
    assert question_at({"casakv_policy": "snapkv"}, 120) is None and question_at(None) is None
    assert request_overrides({**SNAP, "casakv_question_at": 100}) == request_overrides(SNAP)  # same policy
    assert check_request(CasakvConfig(), {**SNAP, "casakv_question_at": 7}, "cpu").policy == "snapkv"
    with pytest.raises(ValueError, match="casakv request parameters: casakv_question_at=-1"):
        check_request(CasakvConfig(), {**SNAP, "casakv_question_at": -1}, "cpu")
    with pytest.raises(ValueError, match="does not combine with prefill_compression"):
        check_request(CasakvConfig(), {**SNAP, "casakv_question_at": 7, "casakv_prefill_compression": True}, "cpu")


def test_terms_keep_the_question_in_the_tail_and_budget_from_the_context():
    t = CompactionTerms(block_size=16, prompt_len=1000, shared=0, slots=250, chunk=100, context=900)
    assert (t.context_end, t.tail_start, t.head_end) == (900, 896, 256)
    assert t.freed_blocks == range(16, 56)  # the question's blocks [896, 1000) stay
    assert t.tail_at(1000) == 896 and t.event_tail(0) == 896 and t.event_tail(1) == 1088
    assert [t.settled_tail(p) for p in (1000, 1001, 1100, 1101)] == [None, 896, 896, 1088]
    snap = build_policy(CasakvConfig(policy="snapkv", kv_ratio=0.25), 30)
    q = compaction_terms(snap, 4000, 0, 16, 3, question_at=2000)
    assert (q.slots, q.context, q.tail_start) == (500, 2000, 2000)  # a quarter of the context
    assert compaction_terms(snap, 4000, 0, 16, 3, question_at=4000).context is None
    pre = build_policy(CasakvConfig(policy="snapkv", kv_ratio=0.25, prefill_compression=True), 30)
    assert compaction_terms(pre, 4000, 0, 16, 3, question_at=2000).context is None  # refused by the API anyway


def test_plan_masks_the_question_and_records_the_context():
    """The chunk holding the context's end and the question: masked (the question reads the keep-set),
    recording the context's observations (all its rows) and the prompt's (context rows only)."""
    table, store = RequestTable(), ObservationStore()
    resolver = PolicyResolver(CasakvConfig(), num_layers=4)
    params = SamplingParams(extra_args={**SNAP, "casakv_question_at": 150})
    table.add(0, params, 200, request_overrides(params.extra_args), "prompt", 150, "context")
    first = plan_batch(table, resolver, store, [0, 100], [100])
    assert first.rows[0].dense and not first.rows[0].asks and len(first.records) == 1  # the context's window
    second = plan_batch(table, resolver, store, [0, 100], [200])
    row = second.rows[0]
    assert row.asks and row.evicting and not row.dense and row.select_len == 150
    assert store.peek("context", 150).window_seen == [True] * 64 and row.obs is store.peek("context", 150)
    assert store.peek("prompt", 200).window_seen == [True] * 14 + [False] * 50  # rows 136..149 only
    decode = plan_batch(table, resolver, store, [0, 1], [201]).rows[0]
    assert decode.evicting and decode.obs is store.peek("context", 150) and not decode.asks


def test_a_question_reads_the_keep_set_of_its_context_served_alone(harness):
    """A 120-token prompt whose question starts at 100: its keep-set is the one the 100-token context gets
    served alone; the question's prefill rows and its decode steps attend to exactly that keep-set plus every
    question and generated token, the freed blocks poisoned (``tools.harness.check_question``)."""
    assert check_question(harness, "cpu", harness.forward) == 4
