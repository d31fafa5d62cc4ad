"""Sparse (pattern-restricted) paged prefill vs. the fp32 dense-mask reference."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from casakv_kernels.paged_attention import paged_attention  # noqa: E402
from casakv_kernels.patterns import PatternBatch  # noqa: E402
from casakv_kernels.sparse_index import build_prefill_index  # noqa: E402
from casakv_kernels.sparse_prefill import (  # noqa: E402
    plan_blocks,
    sparse_paged_attention,
)
from casakv_kernels.sparse_reference import (  # noqa: E402
    random_patterns,
    sparse_paged_attention_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _make_case(q_lens, ctx_lens, num_kv_heads, group, head_size, block_size,
               dtype, seed, block_major=False, pad_tokens=2):
    """Random packed batch with a random paged cache; unowned cache slots are
    NaN, block 0 is never used."""
    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(per_seq) + 2
    if block_major:  # physically [nb, bs, kvh, 2hs]
        cache = torch.randn(num_blocks, block_size, num_kv_heads, 2 * head_size,
                            generator=gen).permute(0, 2, 1, 3)
    else:
        cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size,
                            generator=gen)
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_table = torch.zeros(len(q_lens), max(per_seq) + 1, dtype=torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for i, nb in enumerate(per_seq):
        mine, ids = ids[:nb], ids[nb:]
        block_table[i, :nb] = torch.tensor(mine, dtype=torch.int32)
        for j, b in enumerate(mine):
            owned[b, :min(block_size, seq_lens[i] - j * block_size)] = True
    cache.masked_fill_(~owned[:, None, :, None], float("nan"))
    rows = sum(q_lens) + pad_tokens
    query = torch.randn(rows, num_heads, head_size, generator=gen)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    return dict(
        query=query.to(DEVICE, dtype),
        kv_cache=cache.to(DEVICE, dtype),
        block_table=block_table.to(DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        scale=head_size ** -0.5,
    )


def _run(case, patterns, plan=None, with_lse=True):
    query = case["query"]
    rows, num_heads, head_size = query.shape
    num_kv_heads = case["kv_cache"].shape[1]
    q_lens = case["query_start_loc"][1:] - case["query_start_loc"][:-1]
    max_q = int(q_lens.max())
    max_s = int(case["seq_lens"].max())
    if plan is None:
        plan = plan_blocks(num_heads // num_kv_heads, head_size, max_q)
    patterns = patterns.to(DEVICE)
    index = build_prefill_index(patterns, case["query_start_loc"],
                                case["seq_lens"], max_q, max_s, *plan)
    out = torch.full_like(query, float("nan"))
    lse = (torch.full((rows, num_heads), float("nan"), dtype=torch.float32,
                      device=DEVICE) if with_lse else None)
    res = sparse_paged_attention(**case, out=out, patterns=patterns, index=index,
                                 max_query_len=max_q, max_seq_len=max_s, lse=lse)
    assert res is out
    return out, lse


def _check(case, patterns, plan=None, with_lse=True):
    out, lse = _run(case, patterns, plan, with_lse)
    ref, ref_lse = sparse_paged_attention_ref(**case, patterns=patterns.to(DEVICE))
    n = int(case["query_start_loc"][-1])
    got, want = out[:n].float(), ref[:n]
    assert torch.isfinite(got).all(), "written rows must be finite"
    assert torch.isnan(out[n:]).all(), "rows past the batch must stay NaN"
    if case["query"].dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        rel = (got - want).norm() / want.norm()
        assert rel <= 1e-2, f"relative error {rel:.3e}"
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    if with_lse:
        assert torch.isnan(lse[n:]).all()
        torch.testing.assert_close(lse[:n], ref_lse[:n], atol=1e-3, rtol=1e-3)


@st.composite
def _requests(draw, max_seq=72):
    """(q_lens, ctx_lens): decode, full prefill and chunked prefill mixed."""
    num_seqs = draw(st.integers(1, 3))
    q_lens, ctx_lens = [], []
    for _ in range(num_seqs):
        kind = draw(st.sampled_from(["decode", "prefill", "chunked"]))
        if kind == "decode":
            q, c = 1, draw(st.integers(0, max_seq - 1))
        elif kind == "prefill":
            q, c = draw(st.integers(1, max_seq)), 0
        else:
            q = draw(st.integers(2, max_seq // 2))
            c = draw(st.integers(1, max_seq - q))
        q_lens.append(q)
        ctx_lens.append(c)
    return q_lens, ctx_lens


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=_requests(),
    num_kv_heads=st.integers(1, 2),
    group=st.integers(1, 4),
    head_size=st.sampled_from([16, 32, 64]),
    block_size=st.sampled_from([5, 16, 32]),
    dtype=st.sampled_from(DTYPES),
    plan=st.sampled_from(["plan", (16, 16), (5, 16), (3, 32)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_prefill_matches_reference(reqs, num_kv_heads, group, head_size,
                                          block_size, dtype, plan, seed):
    q_lens, ctx_lens = reqs
    rng = random.Random(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    patterns = random_patterns(rng, seq_lens, num_kv_heads)
    case = _make_case(q_lens, ctx_lens, num_kv_heads, group, head_size,
                      block_size, dtype, seed, block_major=bool(seed % 2))
    _check(case, patterns, None if plan == "plan" else plan,
           with_lse=bool(seed % 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_pattern_equals_dense_kernel(dtype):
    """full=True everywhere: same result as the dense paged kernel."""
    q_lens, ctx_lens = [1, 37, 20], [50, 0, 30]
    case = _make_case(q_lens, ctx_lens, 2, 2, 32, 16, dtype, seed=5)
    patterns = PatternBatch.dense(3, 2)
    out, lse = _run(case, patterns)
    n = sum(q_lens)
    dense = torch.full_like(case["query"], float("nan"))
    dense_lse = torch.full_like(lse, float("nan"))
    paged_attention(**case, out=dense, max_query_len=max(q_lens),
                    max_seq_len=max(q + c for q, c in zip(q_lens, ctx_lens)),
                    lse=dense_lse)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out[:n], dense[:n], atol=tol, rtol=tol)
    torch.testing.assert_close(lse[:n], dense_lse[:n], atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[n:]).all() and torch.isnan(lse[n:]).all()


def test_gqa_diagonal_window_and_empty_lists():
    """Group of 4 (Llama-like packing), window 1 (diagonal only) on one head,
    all-unused lists and sinks on the other, chunked prefill."""
    p = PatternBatch.empty(2, 2, num_slash=3, num_vertical=2)
    p.window[:, 0] = 1
    p.sink[:, 1] = 3
    p.window[1, 1] = 9
    case = _make_case([24, 9], [10, 41], 2, 4, 64, 5, torch.bfloat16, seed=9)
    _check(case, p)


def test_patterns_beyond_tiles_and_clamped_blocks():
    """Slash/vertical entries past the sequence, a block grid one block short
    (clamped), pattern blocks of 8 on KV tiles of 16."""
    p = PatternBatch.empty(1, 1, num_slash=4, num_vertical=4)
    p.slash[0, 0] = torch.tensor([3, 500, -1, 17])
    p.vertical[0, 0] = torch.tensor([70, 2, 999, 33])
    nb = math.ceil(60 / 8) - 1
    p.blocks = torch.rand(1, 1, nb, nb, generator=torch.Generator().manual_seed(1)) < 0.3
    p.block = 8
    case = _make_case([44], [16], 1, 2, 16, 16, torch.float32, seed=2)
    _check(case, p, plan=(16, 16))


@pytest.mark.parametrize("block_size,plan", [(16, (8, 32)), (8, (5, 16)), (5, (4, 16))])
def test_page_loads_and_reversed_tiles(monkeypatch, block_size, plan):
    """The kernel variants (per-page K/V loads, longest query tiles first) give
    the reference's result; a block size that is not a power of two falls back
    to per-token loads."""
    from casakv_kernels import sparse_prefill

    monkeypatch.setattr(sparse_prefill, "PAGE_LOADS", True)
    monkeypatch.setattr(sparse_prefill, "REVERSE_Q", True)
    q_lens, ctx_lens = [1, 37, 20], [50, 0, 30]
    rng = random.Random(block_size)
    patterns = random_patterns(rng, [q + c for q, c in zip(q_lens, ctx_lens)], 2)
    case = _make_case(q_lens, ctx_lens, 2, 4, 32, block_size, torch.bfloat16, seed=block_size)
    _check(case, patterns, plan)
    _check(case, PatternBatch.dense(3, 2), plan)


@pytest.mark.parametrize("kinds,early,part_n,skip", [(False, False, None, False), (True, False, None, False),
                                                    (False, True, 16, False), (True, True, 16, True)])
def test_mask_variants(monkeypatch, kinds, early, part_n, skip):
    """Partial-tile variants (per-head kind flags, early vertical-word loads,
    partial tiles in 16-position steps, skipping steps past the query tile)
    give the reference's result on heads with and without slash / vertical
    entries."""
    from casakv_kernels import sparse_prefill

    monkeypatch.setattr(sparse_prefill, "MASK_KINDS", kinds)
    monkeypatch.setattr(sparse_prefill, "MASK_EARLY", early)
    monkeypatch.setattr(sparse_prefill, "PARTIAL_N", part_n)
    monkeypatch.setattr(sparse_prefill, "PARTIAL_SKIP", skip)
    q_lens, ctx_lens = [33, 9], [20, 61]
    rng = random.Random(7)
    patterns = random_patterns(rng, [q + c for q, c in zip(q_lens, ctx_lens)], 3,
                               kinds=("sink_window", "vertical_slash", "hybrid"))
    patterns.vertical[:, 0] = -1  # head 0: no vertical or slash entry
    patterns.slash[:, 0] = -1
    patterns.vertical[:, 1, 0] = 3  # head 1: at least one of each
    patterns.slash[:, 1, 0] = 5
    case = _make_case(q_lens, ctx_lens, 3, 2, 32, 16, torch.bfloat16, seed=7)
    _check(case, patterns, (16, 32))


def test_wide_plan_only_on_promise_and_in_range(monkeypatch):
    """plan_blocks gives WIDE_TILES only to sparse-only patterns of 16-bit GPU
    batches at head size 128 and GQA group 4 whose longest sequence lies in
    WIDE_SEQ, and never to short queries; PatternBatch keeps the promise
    across devices."""
    from casakv_kernels import sparse_prefill

    monkeypatch.setattr(sparse_prefill, "_interpreting", lambda: False)
    lo, hi = sparse_prefill.WIDE_SEQ
    wide = (sparse_prefill.WIDE_TILES[0] // 4, sparse_prefill.WIDE_TILES[1])
    table = plan_blocks(4, 128, 32768)
    assert wide != table
    assert plan_blocks(4, 128, 32768, hi, torch.bfloat16, True) == wide
    assert plan_blocks(4, 128, 32768, lo, torch.float16, True) == wide
    assert plan_blocks(4, 128, 32768, hi, torch.bfloat16, False) == table  # no promise
    assert plan_blocks(4, 128, 32768, lo - 1, torch.bfloat16, True) == table
    assert plan_blocks(4, 128, 32768, hi + 1, torch.bfloat16, True) == table
    assert plan_blocks(4, 128, 32768, hi, torch.float32, True) == table
    assert plan_blocks(4, 64, 32768, hi, torch.bfloat16, True) == plan_blocks(4, 64, 32768)
    assert plan_blocks(8, 128, 32768, hi, torch.bfloat16, True) == plan_blocks(8, 128, 32768)  # unmeasured group
    assert plan_blocks(4, 128, 16, hi, torch.bfloat16, True) == plan_blocks(4, 128, 16)
    assert PatternBatch.local(1, 2, 4, 64).to(DEVICE).sparse_only
    assert not PatternBatch.dense(1, 2).sparse_only and not PatternBatch.empty(1, 2).sparse_only


@pytest.mark.skipif(DEVICE != "cuda", reason="WIDE_TILES are a GPU plan (16 warps, head size 128)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_full", [False, True])
def test_wide_tiles_on_gpu(dtype, with_full):
    """A sparse-only batch in WIDE_SEQ at Llama shapes (group 4, head size
    128) is planned at WIDE_TILES and matches the reference, chunked request
    included; a broken promise (full heads present) is still exact."""
    from casakv_kernels import sparse_prefill

    q_lens, ctx_lens = [700, 64], [sparse_prefill.WIDE_SEQ[0] + 300, 2000]
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    patterns = random_patterns(random.Random(11), seq_lens, 4, kinds=("sink_window", "vertical_slash", "hybrid"))
    if with_full:
        patterns.full[0, 0] = True
        patterns.full[1, 3] = True
    patterns.sparse_only = True
    case = _make_case(q_lens, ctx_lens, 4, 4, 128, 16, dtype, seed=11)
    plan = plan_blocks(4, 128, max(q_lens), max(seq_lens), dtype, patterns.sparse_only)
    assert plan == (sparse_prefill.WIDE_TILES[0] // 4, sparse_prefill.WIDE_TILES[1])
    _check(case, patterns, plan)
