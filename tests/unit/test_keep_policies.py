"""Evicting policies: scorers x budgets x one selection, and their decode-time eviction."""

import json

import pytest
import torch

from casakv_vllm.config import CasakvConfig, CasakvConfigError, load_config
from casakv_vllm.ops.probs import attention_probs
from casakv_vllm.policies import build_policy
from casakv_vllm.policies.budgets import HeadAdaptive, Pyramid
from casakv_vllm.policies.selection import select_top
from casakv_vllm.policies.static_heads import HEAD_TYPES, load_assignment, type_scores

H, HKV, D = 6, 2, 16
SCALE = D ** -0.5


def policy(name, num_layers=8, **cfg):
    return build_policy(CasakvConfig(policy=name, **cfg), num_layers)


@pytest.mark.parametrize("name,params", [("snapkv", {}), ("pyramidkv", {}), ("adakv", {}), ("h2o", {}),
                                         ("streaming", {"scope": "decode"}), ("pyramidkv", {"scorer": "h2o"}),
                                         ("adakv", {"scorer": "h2o"})])
def test_selection_sizes_and_planted_keys(observed, name, params):
    plen, budget, planted = 300, 80, [17, 90, 151]
    p = policy(name, kv_budget=budget, policy_params=params)
    q, k, obs = observed(plen, col_sums=True, planted=planted)
    keep = p.select(3, plen, k, obs.layer(0), SCALE)
    assert keep.shape == (HKV, plen) and keep.dtype == torch.bool
    per_head = keep.sum(1)
    if name == "adakv":
        assert int(keep.sum()) == HKV * budget
        if "scorer" not in params:  # the window (32) plus the floor of the rest
            assert int(per_head.min()) >= 32 + int(0.2 * (budget - 32))
    elif name == "pyramidkv":
        assert per_head.tolist() == [p.prompt_budget(3, plen)] * HKV
    else:
        assert per_head.tolist() == [budget] * HKV
    if name != "streaming":
        assert bool(keep[:, planted].all()), "keys the queries attend to must be kept"
    if name in ("snapkv", "pyramidkv", "adakv", "h2o") and "scorer" not in params:
        assert bool(keep[:, -1].all()), "the observation window / recent tokens stay"
    if name == "streaming":
        assert bool(keep[:, :4].all()) and bool(keep[:, -(budget - 4):].all())


@pytest.mark.parametrize("name", ["snapkv", "adakv", "h2o", "casakv"])
def test_a_ratio_keeps_at_least_kv_min_and_a_short_prompt_whole(name):
    p = policy(name, kv_ratio=0.25)  # kv_min defaults to 128
    assert [p.base_budget(n) for n in (42, 128, 400, 2048)] == [42, 128, 128, 512]
    assert p.slot_budget(42, HKV) == 42  # nothing of a short chat prompt is evicted, no block freed
    assert [policy(name, kv_ratio=0.25, kv_min=0).base_budget(n) for n in (42, 400)] == [11, 100]
    assert policy(name, kv_budget=64, kv_min=256).base_budget(400) == 64  # an absolute budget is what it says


def test_composite_members_share_kv_min():
    members = [{"policy": "streaming", "share": 0.25, "policy_params": {"scope": "decode"}},
               {"policy": "snapkv", "share": 0.75}]
    p = policy("composite", kv_ratio=0.25, policy_params={"members": members})
    assert [m.config.kv_min for m in p.members] == [32, 96]
    assert p.slot_budget(100, HKV) == 100


def test_pyramid_budgets_shrink_average_and_never_drop_below_the_window():
    """At 4x of a 2048-token prompt over 30 layers every layer keeps at least SnapKV's 32-token window."""
    p = policy("pyramidkv", num_layers=30, kv_ratio=0.25)
    budgets = [p.prompt_budget(layer, 2048) for layer in range(30)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 512 > budgets[-1]
    assert min(budgets) >= 32, budgets
    assert abs(sum(budgets) / 30 - 512) <= 1
    wide = [p.prompt_budget(layer, 10_000) for layer in range(30)]
    assert abs(sum(wide) / 30 - 2500) <= 1


def test_pyramid_falls_back_to_uniform_when_nothing_is_left_above_the_floor():
    alloc = Pyramid(beta=20.0, floor=32)
    assert [alloc.layer_budget(layer, 8, 1000, 32) for layer in range(8)] == [32] * 8
    assert [alloc.layer_budget(layer, 8, 1000, 20) for layer in range(8)] == [20] * 8
    capped = [alloc.layer_budget(layer, 8, 1000, 900) for layer in range(8)]  # the top would exceed the prompt
    assert max(capped) <= 1000 and min(capped) >= 32 and abs(sum(capped) / 8 - 900) <= 1


def test_head_adaptive_shares_the_layer_budget():
    scores = torch.rand(3, 200)
    scores[0, :50] += 10.0  # head 0 concentrates its mass: it needs fewer tokens
    scores[:, -8:] = float("inf")
    counts = HeadAdaptive(floor=0.2).head_budgets(scores, 40, pinned=8)
    assert int(counts.sum()) == 3 * 40 and int(counts.min()) >= 8 + int(0.2 * 32)
    keep = select_top(scores, counts, max_budget=8 + 3 * 32)
    assert keep.sum(1).tolist() == counts.tolist() and bool(keep[:, -8:].all())


@pytest.mark.parametrize("name", ["h2o", "streaming"])
def test_fixed_budget_policies_never_exceed_budget_while_decoding(observed, name):
    plen, budget = 120, 24
    params = {"policy_params": {"scope": "decode"}} if name == "streaming" else {}
    p = policy(name, kv_budget=budget, **params)
    g = torch.Generator().manual_seed(1)
    q, k, obs = observed(plen, col_sums=True)
    keep = None
    for step in range(40):
        seq_len = plen + step + 1
        kk = torch.cat([k, torch.randn(HKV, step + 1, D, generator=g)], 1)
        if keep is None:
            keep = p.start(0, plen, kk, obs.layer(0), SCALE, seq_len)
        p.prepare_step(keep, 0, plen, seq_len)
        vis = keep.visible(seq_len)
        assert vis.shape == (HKV, seq_len)
        assert vis.sum(1).tolist() == [budget] * HKV
        assert bool(vis[:, -1].all()), "the newest token is always read"
        probs = attention_probs(torch.randn(H, 1, D, generator=g), kk, seq_len - 1, SCALE, vis.unsqueeze(1))
        hidden = ~vis.repeat_interleave(H // HKV, 0).unsqueeze(1)
        assert float(probs[hidden].abs().sum()) == 0.0, "evicted tokens get no attention"
        if p.caps.observes_decode:
            p.observe(keep, probs)


def test_snapkv_keeps_every_generated_token(observed):
    plen, budget = 100, 16
    p = policy("snapkv", kv_budget=budget)
    q, k, obs = observed(plen)
    keep = p.start(0, plen, k, obs.layer(0), SCALE, plen + 1)
    for step in range(1, 80):  # past the initial spare capacity
        p.prepare_step(keep, 0, plen, plen + step)
        assert keep.visible(plen + step).sum(1).tolist() == [budget + step] * HKV


def test_no_observations_falls_back_to_sinks_and_recent(observed):
    _, k, _ = observed(200)
    keep = policy("snapkv", kv_budget=40).select(0, 200, k, None, SCALE)
    assert bool(keep[:, :4].all()) and bool(keep[:, -36:].all()) and keep.sum(1).tolist() == [40, 40]


def test_static_head_types_fill_the_budget(tmp_path):
    votes = torch.rand(500)
    for kind in HEAD_TYPES:
        keep = select_top(type_scores(kind, votes, 500, 100).unsqueeze(0), 100)[0]
        assert int(keep.sum()) == 100, kind
        assert bool(keep[-32:].all()) or kind == "a-shape"
    block = select_top(type_scores("block", votes, 500, 100).unsqueeze(0), 100)[0]
    starts = [i for i in range(0, 464, 16) if block[i:i + 16].any()]  # blocks clear of the recent 32
    assert sum(not block[i:i + 16].all() for i in starts) <= 1, "block heads take whole blocks, but the last"
    f = tmp_path / "heads.json"
    f.write_text(json.dumps({"heads": [["a-shape", "block"], ["vertical", "bogus"]]}))
    with pytest.raises(ValueError, match="unknown head types"):
        load_assignment(str(f))
    with pytest.raises(ValueError, match="no such file"):
        load_assignment(str(tmp_path / "missing.json"))


def test_static_heads_policy_uses_each_heads_type(observed, tmp_path):
    f = tmp_path / "heads.json"
    f.write_text(json.dumps({"heads": [["a-shape", "vertical"]]}))
    p = policy("static-heads", kv_budget=64, policy_params={"assignment": str(f)})
    _, k, obs = observed(400, planted=[50, 200])
    keep = p.select(0, 400, k, obs.layer(0), SCALE)
    assert keep.sum(1).tolist() == [64, 64]
    assert bool(keep[0, :4].all()) and bool(keep[0, -60:].all())  # a-shape: sinks + recent
    assert bool(keep[1, [50, 200]].all())  # vertical: the columns the window reads


def test_composite_is_the_union_of_its_members_within_the_budget(observed):
    members = [{"policy": "streaming", "share": 0.25, "policy_params": {"scope": "decode"}},
               {"policy": "snapkv", "share": 0.75}]
    p = policy("composite", kv_budget=80, policy_params={"members": members})
    q, k, obs = observed(300, planted=[17, 90, 151])
    keep = p.select(2, 300, k, obs.layer(0), SCALE)
    parts = [m.select(2, 300, k, obs.layer(0), SCALE) for m in p.members]
    assert torch.equal(keep, parts[0] | parts[1])
    assert bool((keep.sum(1) <= 80).all()) and bool(keep[:, :4].all()) and bool(keep[:, [17, 90, 151]].all())
    with pytest.raises(CasakvConfigError, match="cannot be composed"):
        load_config({"casakv": {"policy": "composite", "kv_budget": 80, "policy_params": {
            "members": [{"policy": "h2o", "share": 0.5}, {"policy": "snapkv", "share": 0.5}]}}}, environ={})
    with pytest.raises(CasakvConfigError, match="sum to at most 1"):
        load_config({"casakv": {"policy": "composite", "kv_budget": 80, "policy_params": {
            "members": [{"policy": "snapkv", "share": 0.7}, {"policy": "adakv", "share": 0.7}]}}}, environ={})


def test_capabilities_live_on_instances():
    """``streaming`` is a pattern policy with scope 'all' and evicts with scope 'decode'."""
    a = policy("streaming", kv_budget=64)
    d = policy("streaming", kv_budget=64, policy_params={"scope": "decode"})
    assert (a.caps.evicts, a.caps.changes_prefill) == (False, True)
    assert (d.caps.evicts, d.caps.changes_prefill) == (True, False)
    assert policy("h2o", kv_budget=8).caps.needs_col_sums and policy("h2o", kv_budget=8).caps.observes_decode
    assert not policy("snapkv", kv_budget=8).caps.observes_decode
    assert policy("dense").caps.attends_all
