"""Compaction on the CPU path: the rule's arithmetic, and attention over a compacted layer equals
attention over the masked original, with the freed blocks' memory poisoned."""

import pytest
import torch

from casakv_vllm.compress.compact import compact_cpu, live_blocks, plan_layer
from casakv_vllm.compress.rule import CompactionTerms, compaction_terms
from casakv_vllm.config import CasakvConfig
from casakv_vllm.ops.paged import gather_kv, write_kv
from casakv_vllm.ops.torch_attention import decode_attention
from casakv_vllm.policies import build_policy


def test_terms_free_the_blocks_between_the_compacted_head_and_the_tail():
    t = CompactionTerms(block_size=16, prompt_len=1000, shared=32, slots=250)
    assert t.tail_start == 992 and t.head_end == 288  # 32 + 250 -> 282, rounded up to a block
    assert t.freed_blocks == range(18, 62) and t.compacts
    assert t.settled_tail(1000) is None and t.settled_tail(1001) == 992  # after the first decode step's forward
    assert t.settled_tail(5000) == 992  # compact once (no chunk)
    assert t.event_in(1000, 1001) == 1000 and t.event_in(1001, 1002) is None and t.event_in(999, 1000) is None
    assert not CompactionTerms(16, 100, 0, 90).compacts  # 90 slots round up past the tail block


def test_terms_of_events_while_generating():
    t = CompactionTerms(block_size=16, prompt_len=1000, shared=0, slots=250, chunk=100)
    assert [t.event_position(j) for j in range(3)] == [1000, 1100, 1200]
    assert [t.event_tail(j) for j in range(3)] == [992, 1088, 1200]
    assert [t.event_in(c, c + 1) for c in (1000, 1050, 1099, 1100, 1101, 1200)] == [1000, None, None, 1100, None,
                                                                                  1200]
    assert t.event_in(1095, 1105) == 1100  # a step computing several positions, one of them e_1
    assert t.event_in(1095, 1205) == 1200  # ... two of them: the last one
    # the scheduler frees a block range only once the event's forward has settled
    assert [t.settled_tail(p) for p in (1000, 1001, 1100, 1101, 1200, 1201)] == [None, 992, 992, 1088, 1088, 1200]


def test_terms_of_prefill_events():
    """Prefill compression: events every chunk past the region while the prompt is prefilled, the last
    at the prompt's last token (instead of the first decode step), then every chunk while generating."""
    t = CompactionTerms(block_size=16, prompt_len=1000, shared=0, slots=250, chunk=100, prefill=True)
    assert t.head_end == 256
    assert [t.last_event_before(n) for n in (356, 357, 456, 457, 999, 1000, 1100, 1101)] == \
        [None, 356, 356, 456, 956, 999, 999, 1100]
    assert t.event_in(0, 256) is None and t.event_in(256, 512) == 456 and t.event_in(512, 768) == 756
    assert t.event_in(768, 1000) == 999 and t.event_in(1000, 1001) is None  # no event at P any more
    assert [t.settled_tail(p) for p in (357, 512, 999, 1000)] == [352, 448, 944, 992]
    assert t.peak_tokens(256) == 256 + 100 + 256 + 32
    plain = CompactionTerms(block_size=16, prompt_len=1000, shared=0, slots=250, chunk=100)
    assert plain.event_in(256, 512) is None and plain.event_in(1000, 1001) == 1000


def test_terms_follow_the_policy_budget_and_the_prefix_hit():
    snap = build_policy(CasakvConfig(policy="snapkv", kv_ratio=0.25), 30)
    t = compaction_terms(snap, 4000, first_context=40, block_size=16, num_kv_heads=3)
    assert (t.shared, t.slots, t.chunk) == (48, 1000, 256)  # the hit rounds up to a block; a quarter of the prompt
    ada = build_policy(CasakvConfig(policy="adakv", kv_ratio=0.25), 30)
    assert compaction_terms(ada, 4000, 0, 16, 3).slots > 1000  # one head may take others' shares
    h2o = build_policy(CasakvConfig(policy="h2o", kv_budget=64, chunk_size=128), 30)
    assert (compaction_terms(h2o, 4000, 0, 16, 3).slots, compaction_terms(h2o, 4000, 0, 16, 3).chunk) == (64, 128)
    stream = build_policy(CasakvConfig(policy="streaming", kv_budget=64, policy_params={"scope": "decode"}), 30)
    assert compaction_terms(stream, 4000, 0, 16, 3).slots == 64  # sinks + window
    assert compaction_terms(build_policy(CasakvConfig(policy="streaming", kv_budget=64), 30), 4000, 0, 16, 3) is None
    assert compaction_terms(build_policy(CasakvConfig(), 30), 4000, 0, 16, 3) is None  # dense


def _cache(num_blocks, num_kv, bs, d, g, layout):
    cache = torch.zeros(num_blocks, num_kv, bs, 2 * d)
    slots = torch.arange(num_blocks * bs)
    write_kv(torch.randn(len(slots), num_kv, d, generator=g), torch.randn(len(slots), num_kv, d, generator=g),
             cache, slots, layout)
    return cache


def _visible(mask, slots_of_cols, positions_of_slots):
    """Positions a keep mask over columns reads."""
    return {(h, positions_of_slots[h][int(s)]) for h in range(mask.shape[0])
            for s in slots_of_cols[mask[h].nonzero().flatten()].tolist()}


@pytest.mark.parametrize("layout", ["vec", "amx"])
def test_attention_over_compacted_layer_equals_masked_attention(layout):
    """A prompt compacted once, then twice more while generating (random keep-sets, more than the
    region holds at the later events): after each event, attention over the live blocks with the
    remapped mask equals attention over the original cache with the mask the events kept; freed
    blocks are poisoned."""
    g = torch.Generator().manual_seed(3)
    num_kv, group, d, bs, prompt = 3, 2, 32, 16, 300
    for shared in (0, 64):
        terms = CompactionTerms(bs, prompt, shared, slots=70, chunk=40)
        final = prompt + 2 * terms.chunk + 1
        nb = -(-final // bs)
        cache = _cache(nb + 8, num_kv, bs, d, g, layout)
        original = cache.clone()
        table = (torch.randperm(nb + 7, generator=g) + 1)[:nb]
        width = final + 20
        mask = torch.zeros(num_kv, width, dtype=torch.bool)  # over positions: the first event reads them
        for h in range(num_kv):  # up to 70 kept from [shared, tail), any subset of the tail block
            pick = shared + torch.randperm(terms.tail_start - shared, generator=g)[: 40 + 15 * h]
            mask[h, pick] = True
        mask[:, :shared] = torch.rand(num_kv, shared, generator=g) < 0.5  # the shared prefix: as masked
        mask[:, terms.tail_start:] = torch.rand(num_kv, width - terms.tail_start, generator=g) < 0.7
        scores = torch.rand(num_kv, width, generator=g)
        pos = {h: {s: s for s in range(width)} for h in range(num_kv)}  # slot -> position, per head
        read, freed = None, set()
        for j in range(3):
            seq = terms.event_position(j) + 1
            tail = terms.event_tail(j)
            assert terms.event_in(seq - 1, seq) == terms.event_position(j) and terms.tail_at(seq - 1) == tail
            step = plan_layer(mask, terms, read, tail, scores)
            kept_before = {(h, pos[h][s]) for h in range(num_kv)
                           for s in step.src_slot[h, : int(step.count[h])].tolist()}
            compact_cpu(cache, table, step, layout)
            new_pos = {h: {} for h in range(num_kv)}
            for h in range(num_kv):
                for i, s in enumerate(step.src_slot[h, : int(step.count[h])].tolist()):
                    new_pos[h][shared + i] = pos[h][s]
                for s in list(range(shared)) + list(range(tail, width + tail)):
                    new_pos[h][s] = s
            pos, read = new_pos, terms.layout(tail)
            mask, scores = step.remap(mask, False), step.remap(scores, 0.0)
            lo = terms.head_end // bs if j == 0 else terms.event_tail(j - 1) // bs
            freed |= set(range(lo, tail // bs))
            for blk in freed:
                cache[table[blk]] = float("nan")  # another request's now
            assert int(step.count.max()) <= terms.head_end - shared and {p for _, p in kept_before} <= set(range(tail))
            # attention: the live blocks with the remapped mask == the original cache masked the same way
            q = torch.randn(num_kv * group, 1, d, generator=g)
            lk, lv = gather_kv(cache, live_blocks(table, read, seq, bs), read.width(seq), layout)
            cols = mask[:, : read.width(seq)]
            got, _ = decode_attention(q, lk.float(), lv.float(), 0.2, cols.unsqueeze(1))
            slots_of_cols = torch.cat([torch.arange(read.head_end), torch.arange(read.tail, seq)])
            want_mask = torch.zeros(num_kv, seq, dtype=torch.bool)
            for h, p in _visible(cols, slots_of_cols, pos):
                want_mask[h, p] = True
            k, v = gather_kv(original, table, seq, layout)
            want, _ = decode_attention(q, k.float(), v.float(), 0.2, want_mask.unsqueeze(1))
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # the next event: the generated tokens start kept, so the region overflows and the scores decide
            mask[:, read.width(seq):] = True
