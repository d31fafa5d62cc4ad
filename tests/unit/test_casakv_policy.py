"""The ``casakv`` policy's parts: budgets by need, pattern columns, keep-sets from estimated patterns,
the evicted-token summaries behind re-profiling, and its config rules."""

import pytest
import torch

from casakv_kernels.patterns import PatternBatch
from casakv_vllm.config import CasakvConfig, CasakvConfigError, load_config
from casakv_vllm.observe.tally import TALLY
from casakv_vllm.observe.estimate import FULL, PROGRAMS
from casakv_vllm.observe.store import LayerObservation
from casakv_vllm.policies import build_policy
from casakv_vllm.policies.budgets import ByNeed, across_layers
from casakv_vllm.policies.casakv import SUMMARY_BLOCK, estimated_recall, evicted_summary, pattern_columns


@pytest.mark.parametrize("seed", range(5))
def test_budgets_follow_need_and_keep_the_total(seed):
    gen = torch.Generator().manual_seed(seed)
    alloc = ByNeed(floor=0.2, spread=0.5)
    budget, pinned, length = 100, 10, 1000
    need = torch.randint(0, 400, (8,), generator=gen)
    got = alloc.by_need(need, budget, pinned, length)
    floor = pinned + int(0.2 * (budget - pinned))
    assert int(got.sum()) <= 8 * budget
    assert bool((got >= floor).all()) and bool((got <= 150).all())
    if int(need.clamp(floor, 150).sum()) <= 8 * budget:  # room for every need: each head gets at least it
        assert bool((got >= need.clamp(floor, 150)).all())
        assert int(got.sum()) >= 8 * budget - 8 * 0  # the rest is shared out (caps aside)
    order = torch.argsort(need.clamp(floor, 150))
    assert bool((got[order].diff() >= -1).all())  # more need, no fewer tokens (up to rounding)


def test_pattern_columns_cover_sinks_windows_stripes_and_slashes():
    pb = PatternBatch.empty(1, 3, num_slash=2, num_vertical=2, device="cpu")
    pb.sink[0] = torch.tensor([4, 0, 0], dtype=torch.int32)
    pb.window[0] = torch.tensor([8, 0, 0], dtype=torch.int32)
    pb.vertical[0] = torch.tensor([[-1, -1], [5, 17], [-1, -1]], dtype=torch.int32)
    pb.slash[0] = torch.tensor([[-1, -1], [-1, -1], [0, 10]], dtype=torch.int32)
    cols = pattern_columns(pb, 40, "cpu")
    assert cols[0].nonzero().flatten().tolist() == [0, 1, 2, 3, *range(32, 40)]
    assert cols[1].nonzero().flatten().tolist() == [5, 17]
    assert cols[2].nonzero().flatten().tolist() == [29, 39]  # keys 39 - d for the last query


def _obs(q):
    return LayerObservation(window_q=q, window_seen=[True] * q.shape[1])


def test_keep_sets_follow_each_heads_estimated_pattern():
    """Head 0's queries attend their recent keys (a window head), head 1's a few fixed columns (stripes):
    each keeps its pattern's tokens, within a layer total of Hkv x budget."""
    torch.manual_seed(0)
    length, dim, w = 2048, 64, 64
    keys = torch.randn(2, length, dim) * 0.1
    q = torch.randn(2, w, dim) * 0.1  # one query head per KV head
    stripes = [100, 700, 1500]
    for i in range(w):
        pos = length - w + i
        keys[0, pos] = torch.randn(dim)
        q[0, i] = keys[0, pos - 3: pos + 1].sum(0) * 3  # recent keys only
    for c in stripes:
        keys[1, c] = torch.randn(dim) * 2
    q[1] = keys[1, stripes].sum(0) * 3
    cfg = CasakvConfig(policy="casakv", kv_ratio=0.25)
    policy = build_policy(cfg, num_layers=1)
    before, _, _ = TALLY.read()
    keep, _, program, summary = policy.start_keep(0, length, keys, _obs(q), dim ** -0.5)
    after, _, _ = TALLY.read()
    # head 0: a local program (its window, or the slash lines of its few recent offsets); head 1: stripes
    assert PROGRAMS[int(program[0])] in ("a-shape", "slash")
    assert PROGRAMS[int(program[1])] in ("vertical", "vertical-slash")
    assert sum(after.values()) - sum(before.values()) == 2
    assert all(bool(keep[1, c]) for c in stripes)
    assert bool(keep[0, length - 32:].all())  # its recent tokens
    budget = policy.prompt_budget(0, length)
    assert int(keep.sum()) <= 2 * budget
    assert summary[1].sum().item() == (~keep).sum().item()  # every evicted token is summarised once


def test_recall_estimate_is_exact_when_each_block_evicts_one_key():
    torch.manual_seed(1)
    num_kv, length, dim = 2, 4 * SUMMARY_BLOCK, 32
    keys = torch.randn(num_kv, length, dim)
    keep = torch.ones(num_kv, length, dtype=torch.bool)
    gone = torch.tensor([3, SUMMARY_BLOCK + 7, 3 * SUMMARY_BLOCK])
    keep[:, gone] = False
    q = torch.randn(4, 1, dim)  # 2 query heads per KV head
    est = estimated_recall(q, keys, keep.unsqueeze(1), evicted_summary(keys, keep), 0.3)
    logits = torch.einsum("hgd,hsd->hgs", q.view(num_kv, 2, dim), keys) * 0.3
    true = (torch.softmax(logits, -1) * keep.unsqueeze(1)).sum(-1).mean(1)
    torch.testing.assert_close(est, true, rtol=1e-4, atol=1e-5)
    assert bool((est < 1).all())


def test_reprofile_interval_must_fall_on_compaction_events():
    with pytest.raises(CasakvConfigError) as err:
        load_config({"casakv": {"policy": "casakv", "kv_ratio": 0.25, "chunk_size": 256,
                                "policy_params": {"reprofile_interval": 100}}})
    assert "\n" not in str(err.value) and "multiple of chunk_size" in str(err.value)
    ok = load_config({"casakv": {"policy": "casakv", "kv_ratio": 0.25, "policy_params": {"reprofile_interval": 512}}})
    assert build_policy(ok).selects_once()
    assert FULL == PROGRAMS.index("full")


def test_prompt_event_estimates_patterns_over_a_compressed_cache_and_ranks_their_tokens_first():
    """Chunk-wise prefill compression, the prompt's last chunk: the live columns are a compacted region
    (scattered positions, empty slots) then the recent tail.  Head 1's queries attend three stripe positions
    held in the region: those columns rank first; the last ``pin`` positions always stay; empty slots never
    rank; each head's program is recorded and tallied."""
    from casakv_vllm.policies.keepset import LayerKeep

    torch.manual_seed(0)
    seq_len, chunk, dim, w = 2048, 512, 64, 64
    region = torch.sort(torch.randperm(seq_len - chunk)[:300]).values
    stripes = region[[20, 150, 280]]
    pos = torch.cat([region, torch.full((12,), -1), torch.arange(seq_len - chunk, seq_len)]).expand(2, -1).clone()
    width = pos.shape[1]
    by_pos = torch.randn(2, seq_len, dim) * 0.1
    for i in range(w):  # head 0: local (each query matches its recent keys)
        p = seq_len - w + i
        by_pos[0, p] = torch.randn(dim)
    q = torch.zeros(2, w, dim)
    for i in range(w):
        p = seq_len - w + i
        q[0, i] = by_pos[0, p - 3:p + 1].sum(0) * 3
    by_pos[1, stripes] = torch.eye(dim)[:3] * 20  # three stripes, attended alike
    q[1] = by_pos[1, stripes].sum(0)
    k = by_pos.gather(1, pos.clamp_min(0).unsqueeze(-1).expand(2, width, dim)).clone()
    k[pos < 0] = 100.0  # an empty slot's garbage must not count
    policy = build_policy(CasakvConfig(policy="casakv", kv_ratio=0.25, prefill_compression=True, chunk_size=256),
                          num_layers=1)
    keep = LayerKeep.new(torch.ones(2, width, dtype=torch.bool), width)  # capacity past the live width
    keep.set_rank(torch.rand(2, width))
    before, _, _ = TALLY.read()
    policy.on_prompt_event(keep, 0, q, k, pos, dim ** -0.5, seq_len, chunk)
    after, _, _ = TALLY.read()
    assert sum(after.values()) - sum(before.values()) == 2 and keep.program is not None
    assert PROGRAMS[int(keep.program[1])] in ("vertical", "vertical-slash")
    cols = torch.nonzero(pos[1].unsqueeze(1) == stripes.unsqueeze(0))[:, 0]
    # the stripes rank ahead of every token but the top-voted share and the other pattern tokens
    ahead = keep.rank[1, :width] > keep.rank[1, cols].min()
    share = int(policy.params.vote_share * policy.prompt_budget(0, seq_len))
    assert int((ahead & (pos[1] >= 0) & (pos[1] < seq_len - 32)).sum()) <= share + 8
    assert bool((keep.rank[:, :width][:, pos[0] < 0] == float("-inf")).all())  # empty slots never rank
    pinned = pos[0] >= seq_len - 32
    assert bool(torch.isinf(keep.rank[:, :width][:, pinned]).all()) and int(pinned.sum()) == 32
    assert bool((keep.rank[1, :width][~pinned & (pos[1] >= 0)].isfinite()).all()) and keep.rank.shape[1] > width


def test_top_share_takes_each_heads_most_voted_share_of_its_budget():
    from casakv_vllm.policies.casakv import top_share

    votes = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.0, 0.7], [0.6, 0.0, 0.2, 0.8, 0.4, 0.1]])
    first = top_share(votes, torch.tensor([4, 2]), 0.5)
    assert first[0].nonzero().flatten().tolist() == [1, 5]  # 2 of head 0's 4
    assert first[1].nonzero().flatten().tolist() == [3]  # 1 of head 1's 2
    assert not top_share(votes, 6, 0.0).any() and bool(top_share(votes, 6, 1.0).all())


@pytest.mark.parametrize("share,kept", [(0.0, False), (1.0, True)])
def test_a_window_heads_voted_needle_stays_when_votes_come_first(share, kept):
    """A head whose queries put most of their mass on recent keys (a window head) but vote for one far key
    (a needle): with its pattern first the window fills the budget and the needle goes; with its votes
    first (``vote_share``) the needle stays."""
    gen = torch.Generator().manual_seed(1)
    length, dim, w = 1024, 64, 64
    u = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
    q = (8.0 * u + 0.5 * torch.randn(1, w, dim, generator=gen))  # logits q.k / 8 = the keys' weights on u
    keys = -2.0 * u + 0.05 * torch.randn(1, length, dim, generator=gen)
    keys[0, length - 256:] += 5.0 * u  # the recent 256: logit ~3, 95% of the mass with the sinks
    needle = 200
    keys[0, needle] += 6.2 * u  # logit ~4.2: each query's single heaviest key, ~1% of its mass
    cfg = CasakvConfig(policy="casakv", kv_budget=128, policy_params={"vote_share": share, "floor": 1.0})
    policy = build_policy(cfg, num_layers=1)
    keep, _, program, _ = policy.start_keep(0, length, keys, _obs(q), dim ** -0.5)
    assert PROGRAMS[int(program[0])] == "a-shape"
    assert bool(keep[0, needle]) is kept


def test_layers_share_the_requests_total_by_need():
    """``across_layers``: a layer's share follows its heads' summed needs, within ``Hkv`` floors and caps, and
    the shares add up to the request's ``layers x Hkv x budget`` (no more)."""
    alloc = ByNeed(floor=0.2, spread=0.25)
    budget, pinned, length = 100, 10, 1000
    needs = torch.tensor([[400, 400], [30, 20], [120, 90], [100, 100], [15, 15]])
    shares = across_layers(alloc, needs, budget, pinned, length)
    floor, cap = pinned + int(0.2 * (budget - pinned)), 125
    total = int(shares.sum())  # what is shared out evenly past a layer's cap stays unspent
    assert total <= 5 * 2 * budget and (total >= 5 * 2 * budget - 5 or bool((shares == 2 * 125).any()))
    assert bool((shares >= 2 * floor).all()) and bool((shares <= 2 * cap).all())
    assert int(shares[0]) == 2 * cap  # the layer that needs most gets its heads' caps
    assert int(shares[1]) < 2 * budget and int(shares[4]) < 2 * budget  # cheap layers give budget away
    assert int(shares[2]) > int(shares[1])


def _two_layer_prompt(length=1024, dim=32):
    """Layer 0: both heads attend the recent keys only (cheap windows); layer 1: every key alike (full)."""
    gen = torch.Generator().manual_seed(3)
    keys = [torch.randn(2, length, dim, generator=gen) * 0.05 for _ in range(2)]
    q = [torch.randn(2, 64, dim, generator=gen) * 0.05 for _ in range(2)]
    for i in range(64):
        pos = length - 64 + i
        keys[0][:, pos] = torch.randn(2, dim, generator=gen)
        q[0][:, i] = keys[0][:, pos - 2:pos + 1].sum(1) * 4
    return keys, [_obs(x) for x in q]


def test_every_layers_need_noted_at_the_prompts_end_moves_budget_between_layers():
    keys, obs = _two_layer_prompt()
    length, scale = keys[0].shape[1], keys[0].shape[2] ** -0.5
    shared = {}
    for o in obs:
        o.notes = shared  # one prompt: its layers share their notes
    on = build_policy(CasakvConfig(policy="casakv", kv_ratio=0.25), num_layers=2)
    off = build_policy(CasakvConfig(policy="casakv", kv_ratio=0.25, policy_params={"across_layers": False}), 2)
    assert on.observes_prompt_end() and not off.observes_prompt_end()
    budget = on.prompt_budget(0, length)
    # before the prompt's end was observed (or with it off): each layer keeps Hkv x budget
    alone = [on.start_keep(i, length, keys[i], obs[i], scale)[0].sum() for i in range(2)]
    assert [int(x) for x in alone] == [2 * budget, 2 * budget]
    for i in range(2):
        on.on_prompt_observed(i, obs[i], keys[i], scale)
    kept = [on.start_keep(i, length, keys[i], obs[i], scale) for i in range(2)]
    counts = [int(k[0].sum()) for k in kept]
    assert counts[0] < 2 * budget < counts[1] <= 2 * on.allocator.max_head_budget(budget, 32, 2, length)
    assert sum(counts) <= 4 * budget and bool((kept[1][0].sum(1) <= on.slot_budget(length, 2)).all())
    assert [int(x) for x in (off.start_keep(i, length, keys[i], obs[i], scale)[0].sum() for i in range(2))] == \
        [2 * budget, 2 * budget]


def test_the_chunk_that_ends_the_prompt_runs_the_policys_prompt_end_hook():
    from casakv_vllm.observe.record import plan_record, record_layer
    from casakv_vllm.observe.store import PromptObservations

    seen = []
    hook = lambda layer, o, k, s: seen.append((layer, o.window_complete, k.shape[1]))  # noqa: E731
    obs = PromptObservations(200)
    q, k = torch.randn(150, 4, 8), torch.randn(2, 260, 8)
    first = plan_record(obs, 0, 0, 0, 150, False, hook)  # rows 0..149: not the end
    assert first.at_end is None
    record_layer(first, 0, q, 1.0, lambda: k[:, :150])
    last = plan_record(obs, 0, 0, 150, 110, False, hook)  # rows 150..199 (and 60 question rows after it)
    record_layer(last, 0, q[:110], 1.0, lambda: k)
    assert seen == [(0, True, 200)]


def test_a_prompt_kept_whole_notes_nothing():
    keys, obs = _two_layer_prompt(length=100)
    policy = build_policy(CasakvConfig(policy="casakv", kv_ratio=0.25), num_layers=2)  # kv_min 128 > 100
    policy.on_prompt_observed(0, obs[0], keys[0], keys[0].shape[2] ** -0.5)
    assert obs[0].notes == {}


def test_tiered_ranks_by_tier_then_votes_exactly():
    """Tiers first, then votes within a tier, then the earlier token: votes a thousandth apart keep their
    order whatever the tier (a tier added as a large constant rounded them into ties, which each device
    broke its own way)."""
    from casakv_vllm.policies.casakv import tiered, top_share

    votes = torch.tensor([[1.0e-3, 3.0e-3, 2.0e-3, 2.0e-3, 5.0e-4, 4.0e-3]])
    tier = torch.tensor([[1, 1, 1, 1, 0, 2]])
    scores = tiered(votes, tier)
    order = scores[0].argsort(descending=True).tolist()
    assert order == [5, 1, 2, 3, 0, 4]
    assert sorted(scores[0].tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert top_share(votes, 6, 0.5)[0].tolist() == [False, True, True, False, False, True]  # ties: earlier first


def test_a_context_compressed_before_its_question_mixes_in_every_context_querys_attention():
    """``context_votes``: with the question still to come, the window's votes (the context's own last
    queries, attending near themselves) are mixed with the column sums of every context query, each
    normalised per head; the policy then records column sums, and without a later question (or without the
    sums) the votes are the window's alone."""
    torch.manual_seed(0)
    length, dim, w = 512, 32, 64
    keys = torch.randn(2, length, dim)
    q = torch.randn(2, w, dim)
    early = torch.tensor([10, 11, 12])  # attended by the whole context, not by its last queries
    col_sums = torch.full((2, length), 1.0)
    col_sums[:, early] = 400.0
    mixed = build_policy(CasakvConfig(policy="casakv", kv_budget=48, policy_params={"context_votes": 0.5}),
                         num_layers=1)
    plain = build_policy(CasakvConfig(policy="casakv", kv_budget=48), num_layers=1)
    assert mixed.caps.needs_col_sums and not plain.caps.needs_col_sums
    later = LayerObservation(window_q=q, window_seen=[True] * w, col_sums=col_sums, col_rows=length,
                             question_later=True)
    votes = torch.rand(2, length)
    out = mixed._context_votes(votes, later, length)
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    assert bool((out[:, early] > out.max(1, keepdim=True).values * 0.5).all())
    now = LayerObservation(window_q=q, window_seen=[True] * w, col_sums=col_sums, col_rows=length)
    assert mixed._context_votes(votes, now, length) is votes
    assert plain._context_votes(votes, later, length) is votes
    partial = LayerObservation(window_q=q, window_seen=[True] * w, col_sums=col_sums, col_rows=length - 1,
                               question_later=True)
    assert mixed._context_votes(votes, partial, length) is votes
    keep = mixed.start_keep(0, length, keys, later, dim ** -0.5)[0]
    assert bool(keep[:, early].all())
