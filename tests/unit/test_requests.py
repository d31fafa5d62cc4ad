"""Per-request settings, state and the batch plan built from them."""

import gc

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from casakv_vllm.config import CasakvConfig, device_support_error
from casakv_vllm.integration.context import worker_context
from casakv_vllm.integration.tracker import RequestTracker
from casakv_vllm.observe.store import ObservationStore, prompt_key
from casakv_vllm.plan.batch import plan_batch
from casakv_vllm.requests.params import check_request, merged_config, request_overrides
from casakv_vllm.requests.resolve import PolicyResolver
from casakv_vllm.requests.state import RequestTable


def test_overrides_parse_and_merge():
    ov = request_overrides({"casakv_policy": "snapkv", "casakv_kv_budget": 64, "casakv_policy_params": '{"window": 8}',
                            "other": 1})
    assert dict(ov) == {"policy": "snapkv", "kv_budget": 64, "policy_params": '{"window": 8}'}
    base = CasakvConfig(policy="streaming", kv_ratio=0.5, policy_params={"sink": 2})
    cfg = merged_config(base, ov)
    assert (cfg.policy, cfg.kv_budget, cfg.kv_ratio, cfg.policy_params) == ("snapkv", 64, None, {"window": 8})
    short = merged_config(base, request_overrides({"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25,
                                                   "casakv_kv_min": 0}))
    assert (short.kv_ratio, short.kv_min) == (0.25, 0)
    with pytest.raises(ValueError, match="unknown request parameter 'casakv_budget'"):
        request_overrides({"casakv_budget": 3})
    with pytest.raises(ValueError, match="not valid JSON"):
        request_overrides({"casakv_policy_params": "{window"})


@pytest.mark.parametrize("xargs,msg", [
    ({"casakv_policy": "snapkv", "casakv_policy_params": '{"nope": 1}'}, "unknown parameter 'nope'"),
    ({"casakv_policy": "streaming", "casakv_kv_budget": 64}, "changes prefill attention"),
    ({"casakv_kv_budget": -3}, "kv_budget=-3"),
    ({"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25, "casakv_kv_min": -1}, "kv_min=-1"),
])
def test_check_request_one_line(xargs, msg):
    with pytest.raises(ValueError, match=msg) as info:
        check_request(CasakvConfig(), xargs, "cpu")
    assert str(info.value).startswith("casakv request parameters: ") and "\n" not in str(info.value)


def test_a_request_cannot_leave_a_server_whose_policy_changes_prefill():
    base = CasakvConfig(policy="streaming", kv_budget=64)
    with pytest.raises(ValueError, match="server's policy 'streaming'"):
        check_request(base, {"casakv_policy": "dense"}, "cpu")
    assert check_request(base, {"casakv_kv_budget": 64}, "cuda") == base  # the server's own settings


def test_streaming_is_served_on_cuda():
    """Bug: the device check read class attributes, and StreamingPolicy's class says it evicts."""
    assert device_support_error(CasakvConfig(policy="streaming", kv_budget=64), "cuda") is None
    assert device_support_error(CasakvConfig(policy="dense"), "cuda") is None


def test_evicting_policies_are_served_on_cpu_and_cuda_only():
    for cfg in (CasakvConfig(policy="streaming", kv_budget=64, policy_params={"scope": "decode"}),
                CasakvConfig(policy="snapkv", kv_budget=64), CasakvConfig(policy="h2o", kv_ratio=0.25)):
        assert device_support_error(cfg, "cuda") is None and device_support_error(cfg, "cpu") is None
        assert "evicts" in device_support_error(cfg, "xpu")
    assert device_support_error(CasakvConfig(policy="streaming", kv_budget=64), "xpu") is None


def test_a_request_naming_the_server_policy_gets_the_server_policy_object():
    """Bug: ``{"casakv_policy": "dense"}`` on a dense server made a second policy object, the
    batch stopped being uniform and the CUDA forward raised."""
    resolver = PolicyResolver(CasakvConfig(), num_layers=4)
    assert resolver.resolve(request_overrides({"casakv_policy": "dense"}))[0] is resolver.default
    assert check_request(CasakvConfig(), {"casakv_policy": "dense"}, "cuda") == CasakvConfig()
    snap = resolver.resolve(request_overrides({"casakv_policy": "snapkv", "casakv_kv_budget": 32}))
    again = resolver.resolve(request_overrides({"casakv_kv_budget": 32, "casakv_policy": "snapkv",
                                                "casakv_policy_params": "{}"}))
    assert snap[0] is again[0] and snap[1] == "snapkv/kv_budget=32"


def test_tracker_follows_adds_removes_moves():
    tr = RequestTracker(None, torch.device("cpu"), False)
    assert worker_context().requests is tr.table
    params = [SamplingParams(), SamplingParams(extra_args={"casakv_policy": "h2o", "casakv_kv_budget": 9}),
              SamplingParams()]
    tr.update_state(BatchUpdate(3, [], [(0, params[0], [1, 2, 3], []), (1, params[1], [4, 5], []),
                                        (2, params[2], [6], [])], []))
    a, b, c = tr.table.slots(3)
    assert (a.prompt_len, b.prompt_len, c.prompt_len) == (3, 2, 1)
    assert dict(b.overrides) == {"policy": "h2o", "kv_budget": 9} and a.overrides == ()
    assert a.prompt_key == prompt_key([1, 2, 3]) != b.prompt_key
    tr.update_state(BatchUpdate(3, [], [], [(0, 2, MoveDirectionality.SWAP)]))
    assert tr.table.slots(3) == [c, b, a]
    tr.update_state(BatchUpdate(2, [1], [], [(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert tr.table.slots(2) == [c, a]
    tr.update_state(None)
    assert tr.table.slots(3) == [c, a, None]


def test_state_follows_its_request_out_of_and_back_into_the_batch_and_is_released_when_it_ends():
    table = RequestTable()
    params = SamplingParams()
    state = table.add(0, params, 10, (), "k")
    state.keep[0] = "kept"
    table.remove(0)  # not scheduled this step: the request lives on
    assert table.add(3, params, 10, (), "k") is state and len(table) == 1
    table.remove(3)
    del params
    gc.collect()  # the model runner dropped the request (finished or aborted)
    assert len(table) == 0 and table.released == 1


def test_a_recomputed_request_starts_afresh():
    table = RequestTable()
    params = SamplingParams()
    state = table.add(0, params, 100, (), "k")
    assert not state.advance(0, 64) and not state.advance(64, 100) and not state.advance(100, 101)
    state.keep[0] = "kept"
    assert state.advance(0, 64), "a step from position 0 again: preempted and resumed"
    table.restarted(state)
    assert state.keep == {} and state.kv_len == 64 and state.restarts == 1 and table.restarts == 1


def test_release_is_announced_without_a_batch():
    """Bug: the live-request gauge was refreshed only when a batch was planned, so the last request
    to finish stayed 'live' (vLLM drops it in a step that schedules no tokens)."""
    table, seen = RequestTable(), []
    table.on_change = lambda t: seen.append((len(t), t.released))
    params = SamplingParams()
    table.add(0, params, 10, (), "k")
    table.remove(0)
    del params
    gc.collect()
    assert seen == [(1, 0), (0, 1)]


def _plan(table, resolver, store, q_lens, seq_lens):
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    return plan_batch(table, resolver, store, qsl, seq_lens)


def test_plan_rows_dense_or_masked_and_every_prefill_row_records():
    """Bug: only evicting rows recorded observations, so a request that hit the prefix cache of a
    dense request saw at most one block of its observation window."""
    table, store = RequestTable(), ObservationStore()
    resolver = PolicyResolver(CasakvConfig(), num_layers=4)
    keep_alive = [SamplingParams(), SamplingParams(extra_args={"casakv_policy": "snapkv", "casakv_kv_budget": 32})]
    dense = table.add(0, keep_alive[0], 200, (), "prompt")
    plan = _plan(table, resolver, store, [200], [200])  # the dense request prefills the whole prompt
    assert plan.rows[0].dense and len(plan.records) == 1 and plan.records[0].win_n == 64
    assert store.peek("prompt", 200).window_seen == [True] * 64
    table.remove(0)
    snap = table.add(0, keep_alive[1], 200, request_overrides(keep_alive[1].extra_args), "prompt")
    plan = _plan(table, resolver, store, [8], [200])  # prefix-cache hit: only the last 8 tokens computed
    assert plan.rows[0].dense and plan.rows[0].policy.name == "snapkv"
    plan = _plan(table, resolver, store, [1], [201])  # its first decode step
    row = plan.rows[0]
    assert not row.dense and row.evicting and row.label == "snapkv/kv_budget=32"
    assert row.obs is store.peek("prompt", 200) and row.obs.window_seen == [True] * 64
    assert dense is not snap


def test_pattern_rows_are_masked_and_rows_without_a_request_use_the_server_policy():
    resolver = PolicyResolver(CasakvConfig(policy="streaming", kv_budget=64), num_layers=4)
    plan = _plan(None, resolver, ObservationStore(), [100, 1], [100, 300])
    assert [r.dense for r in plan.rows] == [False, False] and plan.rows[0].policy is resolver.default
    assert not plan.records  # no request, no prompt key: nothing to record
    assert plan.counts.prefill_tokens == 100 and plan.counts.decode_tokens == 1
