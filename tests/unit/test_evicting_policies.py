"""Evicting policies (keep-sets) and the per-request plumbing, on random tensors."""

import json

import pytest
import torch

from casakv_vllm.config import CasakvConfig
from casakv_vllm.observations import ObservationStore, PromptObservations, attention_probs, group_sum, record_chunk
from casakv_vllm.policies import get_policy_class
from casakv_vllm.policies.static_heads import HEAD_TYPES, keep_for_type, load_assignment
from casakv_vllm.requests import RequestTracker, merged_config, request_overrides

H, HKV, D = 6, 2, 16
SCALE = D ** -0.5


def policy(name, **cfg):
    config = CasakvConfig(policy=name, **cfg)
    p = get_policy_class(name).from_config(config)
    p.num_layers = 8
    return p


def observed_prompt(plen, seed=0, chunks=(1.0,), col_sums=False, planted=None):
    """Random q/k of a prompt recorded chunk by chunk; ``planted`` keys get the window's attention."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, plen, D, generator=g)
    k = torch.randn(HKV, plen, D, generator=g)
    if planted is not None:  # every query points at the planted keys
        u = torch.randn(D, generator=g)
        u = u / u.norm()
        q += 4 * u
        k[:, planted] = 5 * u
    obs = PromptObservations(plen)
    start = 0
    for frac in chunks:
        end = round(frac * plen)
        record_chunk(obs, 0, q[:, start:end], k[:, :end], start, SCALE, col_sums)
        start = end
    return q, k, obs


def test_overrides_parse_and_merge():
    ov = request_overrides({"casakv_policy": "snapkv", "casakv_kv_budget": 64, "casakv_policy_params": '{"window": 8}',
                            "other": 1})
    assert dict(ov) == {"policy": "snapkv", "kv_budget": 64, "policy_params": '{"window": 8}'}
    base = CasakvConfig(policy="streaming", kv_ratio=0.5, policy_params={"sink": 2})
    cfg = merged_config(base, ov)
    assert (cfg.policy, cfg.kv_budget, cfg.kv_ratio, cfg.policy_params) == ("snapkv", 64, None, {"window": 8})
    with pytest.raises(ValueError, match="unknown request parameter 'casakv_budget'"):
        request_overrides({"casakv_budget": 3})
    with pytest.raises(ValueError, match="not valid JSON"):
        request_overrides({"casakv_policy_params": "{window"})
    with pytest.raises(Exception):
        merged_config(base, request_overrides({"casakv_policy": "snapkv", "casakv_policy_params": '{"nope": 1}'}))


def test_tracker_follows_adds_removes_moves():
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    tr = RequestTracker(None, torch.device("cpu"), False)
    sp = SamplingParams(extra_args={"casakv_policy": "h2o", "casakv_kv_budget": 9})
    tr.update_state(BatchUpdate(3, [], [(0, SamplingParams(), [1, 2, 3], []), (1, sp, [4, 5], []),
                                        (2, SamplingParams(), [6], [])], []))
    a, b, c = tr.slots(3)
    assert (a.prompt_len, b.prompt_len, c.prompt_len) == (3, 2, 1)
    assert dict(b.overrides) == {"policy": "h2o", "kv_budget": 9} and a.overrides == ()
    assert a.key != b.key
    tr.update_state(BatchUpdate(3, [], [], [(0, 2, MoveDirectionality.SWAP)]))
    assert tr.slots(3) == [c, b, a]
    tr.update_state(BatchUpdate(2, [1], [], [(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert tr.slots(2) == [c, a]
    tr.update_state(None)
    assert tr.slots(3) == [c, a, None]


def test_chunked_observations_match_one_shot():
    q, k, whole = observed_prompt(150, col_sums=True)
    _, _, parts = observed_prompt(150, chunks=(0.3, 0.5, 0.97, 1.0), col_sums=True)
    a, b = whole.layers[0], parts.layers[0]
    assert a.window_complete and b.window_complete
    torch.testing.assert_close(a.window_q, b.window_q)
    direct = group_sum(attention_probs(q, k, 0, SCALE), HKV).sum(1)
    torch.testing.assert_close(b.col_sums, direct, rtol=1e-4, atol=1e-4)
    assert b.col_rows == 150
    torch.testing.assert_close(direct.sum(1), torch.full((HKV,), 150.0 * H / HKV), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "h2o", "streaming"])
def test_selection_sizes_and_planted_keys(name):
    plen, budget, planted = 300, 80, [17, 90, 151]
    params = {"policy_params": {"scope": "decode"}} if name == "streaming" else {}
    p = policy(name, kv_budget=budget, **params)
    q, k, obs = observed_prompt(plen, col_sums=True, planted=planted)
    keep = p.select(3, plen, k, obs.layers[0], SCALE)
    assert keep.shape == (HKV, plen) and keep.dtype == torch.bool
    per_head = keep.sum(1)
    if name == "adakv":
        assert int(keep.sum()) == HKV * budget and int(per_head.min()) >= 32 + int(0.2 * (budget - 32))
    elif name == "pyramidkv":
        assert per_head.tolist() == [p.prompt_budget(3, plen)] * HKV
    else:
        assert per_head.tolist() == [budget] * HKV
    if name in ("snapkv", "pyramidkv", "adakv", "h2o"):
        assert bool(keep[:, planted].all()), "keys the queries attend to must be kept"
        assert bool(keep[:, -1].all())
    if name == "streaming":
        assert bool(keep[:, :4].all()) and bool(keep[:, -(budget - 4):].all())


def test_pyramid_budgets_shrink_and_average():
    p = policy("pyramidkv", kv_budget=64)
    budgets = [p.prompt_budget(layer, 10_000) for layer in range(8)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 64 > budgets[-1]
    assert abs(sum(budgets) / 8 - 64) <= 1


@pytest.mark.parametrize("name", ["h2o", "streaming"])
def test_fixed_budget_policies_never_exceed_budget_while_decoding(name):
    plen, budget = 120, 24
    params = {"policy_params": {"scope": "decode"}} if name == "streaming" else {}
    p = policy(name, kv_budget=budget, **params)
    g = torch.Generator().manual_seed(1)
    q, k, obs = observed_prompt(plen, col_sums=True)
    state = {}
    for step in range(40):
        seq_len = plen + step + 1
        kk = torch.cat([k, torch.randn(HKV, step + 1, D, generator=g)], 1)
        vis = p.visible(0, state, plen, seq_len, kk, obs.layers[0], SCALE)
        assert vis.shape == (HKV, seq_len)
        assert vis.sum(1).tolist() == [budget] * HKV
        assert bool(vis[:, -1].all()), "the newest token is always read"
        probs = attention_probs(torch.randn(H, 1, D, generator=g), kk, seq_len - 1, SCALE, vis.unsqueeze(1))
        hidden = ~vis.repeat_interleave(H // HKV, 0).unsqueeze(1)
        assert float(probs[hidden].abs().sum()) == 0.0, "evicted tokens get no attention"
        p.on_decode(0, state, state[0], probs)


def test_snapkv_keeps_every_generated_token():
    plen, budget = 100, 16
    p = policy("snapkv", kv_budget=budget)
    q, k, obs = observed_prompt(plen)
    state = {}
    for step in range(1, 80):  # past the initial spare capacity
        vis = p.visible(0, state, plen, plen + step, torch.randn(HKV, plen + step, D), obs.layers[0], SCALE)
        assert vis.sum(1).tolist() == [budget + step] * HKV


def test_static_heads_types_fill_the_budget(tmp_path):
    scores = torch.rand(500)
    for kind in HEAD_TYPES:
        keep = keep_for_type(kind, scores, 500, 100)
        assert int(keep.sum()) == 100, kind
    f = tmp_path / "heads.json"
    f.write_text(json.dumps({"heads": [["a-shape", "block"], ["vertical", "bogus"]]}))
    with pytest.raises(ValueError, match="unknown head types"):
        load_assignment(str(f))
    with pytest.raises(ValueError, match="no such file"):
        load_assignment(str(tmp_path / "missing.json"))


def test_observation_store_is_bounded():
    store = ObservationStore(max_prompts=3)
    for i in range(5):
        store.get(f"p{i}", 10)
    assert len(store) == 3
    assert store.get("p4", 10) is store.get("p4", 10)
    assert store.get("p4", 11).prompt_len == 11  # same key, other length: a new record


def test_batch_plan_resolves_rows_and_builds_shared_patterns_once():
    from casakv_vllm.attention.plan import PolicyResolver, plan_batch
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    resolver = PolicyResolver(CasakvConfig(policy="streaming", kv_budget=64), num_layers=4)
    RequestTracker.current = None
    plan = plan_batch(resolver, 2)  # no tracker: every row gets the server policy
    assert plan.uniform is resolver.default and [r.slot for r in plan.rows] == [None, None]
    first = plan.patterns(0, [100, 200], 3, torch.device("cpu"))
    assert plan.patterns(3, [100, 200], 3, torch.device("cpu")) is first  # layer-independent: built once
    tr = RequestTracker(None, torch.device("cpu"), False)
    sp = SamplingParams(extra_args={"casakv_policy": "snapkv", "casakv_kv_budget": 32})
    tr.update_state(BatchUpdate(2, [], [(0, SamplingParams(), [1, 2, 3], []), (1, sp, [4, 5, 6], [])], []))
    try:
        plan = plan_batch(resolver, 2)
        assert plan.uniform is None
        assert plan.rows[0].policy is resolver.default and plan.rows[1].policy.name == "snapkv"
        assert plan.rows[1].label == "snapkv/kv_budget=32" and plan.rows[1].obs is not None
        assert plan_batch(resolver, 2).rows[1].policy is plan.rows[1].policy  # cached per override
    finally:
        RequestTracker.current = None


def test_head_search_prefers_what_future_queries_read():
    from casakv_vllm.quality.search_heads import EVAL_QUERIES, GAP, head_recalls

    g = torch.Generator().manual_seed(3)
    length = 600
    q = torch.randn(H, length, D, generator=g)
    k = torch.randn(HKV, length, D, generator=g)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    q += 4 * u
    k[:, [40, 41, 42, 120, 121, 122]] = 6 * u  # columns every query reads, far from the end
    rec = head_recalls(q, k, 0.1, SCALE)
    assert rec.shape == (len(HEAD_TYPES), HKV) and bool((rec >= 0).all()) and bool((rec <= 1 + 1e-5).all())
    a_shape, vertical = HEAD_TYPES.index("a-shape"), HEAD_TYPES.index("vertical")
    assert bool((rec[vertical] > rec[a_shape] + 0.2).all()), rec
    assert length - GAP - EVAL_QUERIES > 64


def test_composite_is_the_union_of_its_members_within_the_budget():
    members = [{"policy": "streaming", "share": 0.25, "policy_params": {"scope": "decode"}},
               {"policy": "snapkv", "share": 0.75}]
    p = policy("composite", kv_budget=80, policy_params={"members": members})
    q, k, obs = observed_prompt(300, planted=[17, 90, 151])
    keep = p.select(2, 300, k, obs.layers[0], SCALE)
    parts = [m.select(2, 300, k, obs.layers[0], SCALE) for m in p.members]
    assert torch.equal(keep, parts[0] | parts[1])
    assert bool((keep.sum(1) <= 80).all()) and bool(keep[:, :4].all()) and bool(keep[:, [17, 90, 151]].all())
    with pytest.raises(ValueError, match="cannot be composed"):
        CasakvConfig(policy="composite", kv_budget=80,
                     policy_params={"members": [{"policy": "h2o", "share": 0.5}, {"policy": "snapkv", "share": 0.5}]})
    with pytest.raises(ValueError, match="sum to at most 1"):
        CasakvConfig(policy="composite", kv_budget=80,
                     policy_params={"members": [{"policy": "snapkv", "share": 0.7}, {"policy": "adakv", "share": 0.7}]})
