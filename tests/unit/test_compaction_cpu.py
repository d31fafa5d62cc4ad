"""Compaction on the CPU path: the rule's arithmetic, and attention over a compacted layer equals
attention over the masked original, with the freed blocks' memory poisoned."""

import pytest
import torch

from casakv_vllm.compress.compact import compact_cpu, live_blocks, live_columns, plan_layer
from casakv_vllm.compress.rule import CompactionTerms, compaction_terms
from casakv_vllm.config import CasakvConfig
from casakv_vllm.ops.paged import gather_kv, write_kv
from casakv_vllm.ops.torch_attention import decode_attention
from casakv_vllm.policies import build_policy


def test_terms_free_the_blocks_between_the_compacted_head_and_the_tail():
    t = CompactionTerms(block_size=16, prompt_len=1000, shared=32, slots=250)
    assert t.tail_start == 992 and t.head_end == 288  # 32 + 250 -> 282, rounded up to a block
    assert t.freed_blocks == range(18, 62) and t.compacts
    assert not t.settled(1000) and t.settled(1001)  # after the first decode step's forward
    assert not CompactionTerms(16, 100, 0, 90).compacts  # 90 slots round up past the tail block


def test_terms_follow_the_policy_budget_and_the_prefix_hit():
    snap = build_policy(CasakvConfig(policy="snapkv", kv_ratio=0.25), 30)
    t = compaction_terms(snap, 4000, first_context=40, block_size=16, num_kv_heads=3)
    assert (t.shared, t.slots) == (48, 1000)  # the hit rounds up to a block; a quarter of the prompt
    ada = build_policy(CasakvConfig(policy="adakv", kv_ratio=0.25), 30)
    assert compaction_terms(ada, 4000, 0, 16, 3).slots > 1000  # one head may take others' shares
    h2o = build_policy(CasakvConfig(policy="h2o", kv_budget=64), 30)
    assert compaction_terms(h2o, 4000, 0, 16, 3) is None  # evicts while decoding: masks only, for now
    assert compaction_terms(build_policy(CasakvConfig(), 30), 4000, 0, 16, 3) is None  # dense


def _cache(num_blocks, num_kv, bs, d, g, layout):
    cache = torch.zeros(num_blocks, num_kv, bs, 2 * d)
    slots = torch.arange(num_blocks * bs)
    write_kv(torch.randn(len(slots), num_kv, d, generator=g), torch.randn(len(slots), num_kv, d, generator=g),
             cache, slots, layout)
    return cache


@pytest.mark.parametrize("layout", ["vec", "amx"])
def test_attention_over_compacted_layer_equals_masked_attention(layout):
    g = torch.Generator().manual_seed(3)
    num_kv, group, d, bs, prompt, seq = 3, 2, 32, 16, 300, 305
    for shared in (0, 64):
        terms = CompactionTerms(bs, prompt, shared, slots=70)
        nb = -(-seq // bs)
        cache = _cache(nb + 8, num_kv, bs, d, g, layout)
        table = (torch.randperm(nb + 7, generator=g) + 1)[:nb]
        mask = torch.zeros(num_kv, seq + 20, dtype=torch.bool)
        for h in range(num_kv):  # up to 70 kept from [shared, tail), any subset of the tail block
            pick = shared + torch.randperm(terms.tail_start - shared, generator=g)[: 40 + 15 * h]
            mask[h, pick] = True
        mask[:, :shared] = torch.rand(num_kv, shared, generator=g) < 0.5  # the shared prefix stays anyway
        mask[:, terms.tail_start:] = torch.rand(num_kv, seq + 20 - terms.tail_start, generator=g) < 0.7
        mask[:, prompt:] = True
        q = torch.randn(num_kv * group, 1, d, generator=g)
        k, v = gather_kv(cache, table, seq, layout)
        want_mask = mask[:, :seq].clone()
        want_mask[:, :shared] = True
        want, _ = decode_attention(q, k.float(), v.float(), 0.2, want_mask.unsqueeze(1))

        step = plan_layer(mask, terms)
        compact_cpu(cache, table, step, layout)
        for blk in table[terms.freed_blocks.start:terms.freed_blocks.stop]:
            cache[blk] = float("nan")  # another request's now
        lk, lv = gather_kv(cache, live_blocks(table, terms, seq), terms.head_end + seq - terms.tail_start, layout)
        got, _ = decode_attention(q, lk.float(), lv.float(), 0.2,
                                  live_columns(step.slot_mask, terms, seq).unsqueeze(1))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert step.slot_mask[:, :shared].all() and (step.count - shared).max() <= terms.slots
