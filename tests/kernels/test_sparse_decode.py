"""Triton split-KV sparse paged decode vs. the plain-torch fp32 reference,
plus the on-device selection builders."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from casakv_kernels.paged_attention import paged_attention  # noqa: E402
from casakv_kernels.patterns import PatternBatch  # noqa: E402
from casakv_kernels.sparse_decode import (  # noqa: E402
    SparseDecodeWorkspace,
    choose_num_splits,
    dense_physical_selection,
    dense_selection,
    physical_selection,
    selection_from_patterns,
    selection_mask_from_patterns,
    sparse_paged_decode,
)
from casakv_kernels.sparse_decode_reference import (  # noqa: E402
    selected_positions,
    selection_mask_from_patterns_ref,
    sparse_paged_decode_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "block_major", "padded"]
SEL_KINDS = ["all", "single", "last", "random", "first_last"]


def _cache(num_blocks, hkv, bs, d, dtype, layout, gen):
    """Random cache, logical [nb, hkv, bs, 2d], physical layout kept (the
    dtype/device conversion happens before the view is taken)."""
    def phys(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    if layout == "contiguous":
        c = phys(num_blocks, hkv, bs, 2 * d)
    elif layout == "block_major":
        c = phys(num_blocks, bs, hkv, 2 * d).permute(0, 2, 1, 3)
    elif layout == "padded":
        c = phys(num_blocks, hkv, bs, 2 * d + 8)[..., :2 * d]
    else:
        raise ValueError(layout)
    return c


def _make_case(seq_lens, hkv, group, d, bs, dtype, layout, sel_kinds, seed,
               strided_query=False, poison_unselected=True):
    """Random paged decode batch plus a selection per (request, kv head).

    Cache slots no request owns are NaN; with ``poison_unselected`` so are
    the slots of a head's blocks it did not select (a stray read -> NaN)."""
    gen = torch.Generator().manual_seed(seed)
    R = len(seq_lens)
    nblk = [math.ceil(s / bs) for s in seq_lens]
    num_blocks = sum(nblk) + 2  # block 0 unused
    cache = _cache(num_blocks, hkv, bs, d, dtype, layout, gen)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(nblk) + 2
    block_table = torch.randint(0, num_blocks, (R, width), generator=gen, dtype=torch.int32)
    maxsel = max(nblk) + 1
    sel = torch.randint(0, max(nblk), (R, hkv, maxsel), generator=gen, dtype=torch.int32)
    cnt = torch.zeros(R, hkv, dtype=torch.int32)
    keep_slot = torch.zeros(num_blocks, hkv, bs, dtype=torch.bool)
    for r in range(R):
        ids = perm[:nblk[r]]
        perm = perm[nblk[r]:]
        block_table[r, :nblk[r]] = torch.tensor(ids, dtype=torch.int32)
        for h in range(hkv):
            kind = sel_kinds[(r * hkv + h) % len(sel_kinds)]
            n = nblk[r]
            if kind == "all":
                blocks = list(range(n))
            elif kind == "single":
                blocks = [int(torch.randint(0, n, (1,), generator=gen))]
            elif kind == "last":
                blocks = [n - 1]
            elif kind == "first_last":
                blocks = sorted({0, n - 1})
            elif kind == "random":
                m = torch.rand(n, generator=gen) < 0.5
                m[n - 1] = True
                blocks = torch.nonzero(m).flatten().tolist()
            elif kind == "empty":
                blocks = []
            else:
                raise ValueError(kind)
            cnt[r, h] = len(blocks)
            sel[r, h, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            for b in (blocks if poison_unselected else range(n)):
                valid = min(bs, seq_lens[r] - b * bs)
                keep_slot[ids[b], h, :valid] = True
    cache.masked_fill_(~keep_slot.to(DEVICE)[..., None], float("nan"))
    num_heads = hkv * group
    if strided_query:
        buf = torch.randn(R, num_heads + 2, d + 8, generator=gen)
        query = buf.to(DEVICE, dtype)[:, 1:num_heads + 1, 4:d + 4]
    else:
        query = torch.randn(R, num_heads, d, generator=gen).to(DEVICE, dtype)
    return dict(
        query=query, kv_cache=cache, block_table=block_table.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        sel_blocks=sel.to(DEVICE), sel_count=cnt.to(DEVICE), scale=d ** -0.5,
    )


def _check(got, want, dtype, got_lse=None, want_lse=None):
    got = got.float()
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        rel = (got - want).norm() / want.norm().clamp(min=1e-6)
        assert rel <= 1e-2, f"relative error {rel:.3e}"
    if got_lse is not None:
        torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-4)


def _run(case, num_splits=None, with_lse=True, workspace=None, out_rows_pad=0,
         physical=False):
    q = case["query"]
    R, H, D = q.shape
    out = torch.full((R + out_rows_pad, H, D), float("nan"), dtype=q.dtype, device=DEVICE)
    lse = (torch.full((R + out_rows_pad, H), float("nan"), device=DEVICE)
           if with_lse else None)
    if physical:  # the same selection, as physical block ids
        case = dict(case, sel_blocks=physical_selection(case["sel_blocks"], case["block_table"]))
    res = sparse_paged_decode(**case, out=out, lse=lse, workspace=workspace,
                              num_splits=num_splits, sel_physical=physical)
    assert res is out
    if out_rows_pad:
        assert torch.isnan(out[R:]).all()
        assert lse is None or torch.isnan(lse[R:]).all()
    return out[:R], (lse[:R] if lse is not None else None)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    hkv=st.integers(1, 2),
    group=st.integers(1, 4),
    d=st.sampled_from([16, 32, 64]),
    bs=st.sampled_from([4, 5, 16]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    kinds=st.lists(st.sampled_from(SEL_KINDS), min_size=1, max_size=4),
    num_splits=st.sampled_from([None, 1, 2, 3, 5]),
    strided_query=st.booleans(),
    physical=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_decode_matches_reference(seq_lens, hkv, group, d, bs, dtype, layout,
                                         kinds, num_splits, strided_query, physical, seed):
    case = _make_case(seq_lens, hkv, group, d, bs, dtype, layout, kinds, seed,
                      strided_query=strided_query)
    out, lse = _run(case, num_splits=num_splits, with_lse=bool(seed % 4 != 0),
                    out_rows_pad=1, physical=physical)
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    _check(out, ref, dtype, lse, ref_lse if lse is not None else None)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_sparse_decode_physical_ids(num_splits):
    """Physical block ids (one gather per batch) give the logical-id result,
    including the masked tail of each request's partial last block (the
    poisoned slots past seq_len would turn a stray read into NaN)."""
    case = _make_case([37, 9, 16], 2, 2, 16, 4, torch.bfloat16, "padded",
                      ["last", "random", "first_last"], seed=11)
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    out, lse = _run(case, num_splits=num_splits, physical=True)
    _check(out, ref, torch.bfloat16, lse, ref_lse)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_sparse_decode_empty_selection(num_splits):
    """A row with sel_count == 0 yields out = 0 and lse = -inf; others normal."""
    case = _make_case([9, 30], 2, 2, 16, 4, torch.float32, "contiguous",
                      ["empty", "random", "all", "empty"], seed=3)
    out, lse = _run(case, num_splits=num_splits)
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    assert (out[0, :2] == 0).all() and torch.isneginf(lse[0, :2]).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_sparse_decode_workspace_reuse():
    """A larger-than-needed, NaN-filled workspace (as captured in a CUDA
    graph) gives the same result; num_splits is clamped to its size."""
    case = _make_case([40, 17, 63], 2, 3, 32, 5, torch.float16, "block_major",
                      ["random", "all", "single"], seed=5)
    ws = SparseDecodeWorkspace.allocate(8, 6, 32, max_splits=3, device=DEVICE)
    for t in (ws.acc, ws.m, ws.l):
        t.fill_(float("nan"))
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    for ns in (2, 3, 7):
        out, lse = _run(case, num_splits=ns, workspace=ws)
        _check(out, ref, torch.float16, lse, ref_lse)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    hkv=st.integers(1, 2),
    group=st.integers(1, 4),
    d=st.sampled_from([16, 32, 64]),
    bs=st.sampled_from([4, 5, 16]),
    dtype=st.sampled_from(DTYPES),
    num_splits=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dense_selection_equals_paged_attention(seq_lens, hkv, group, d, bs, dtype,
                                                num_splits, seed):
    case = _make_case(seq_lens, hkv, group, d, bs, dtype, "contiguous", ["all"], seed,
                      poison_unselected=False)
    R = len(seq_lens)
    max_blocks = case["block_table"].shape[1]
    sel, cnt = dense_selection(case["seq_lens"], bs, max_blocks, hkv)
    assert sel.dtype == torch.int32 and cnt.dtype == torch.int32
    assert sel.shape == (R, hkv, max_blocks)
    want_cnt = [[math.ceil(s / bs)] * hkv for s in seq_lens]
    assert cnt.tolist() == want_cnt
    case.update(sel_blocks=sel, sel_count=cnt)
    out, lse = _run(case, num_splits=num_splits)

    q = case["query"]
    dense = torch.full_like(q, float("nan"))
    dense_lse = torch.full(q.shape[:2], float("nan"), device=DEVICE)
    qsl = torch.arange(R + 1, dtype=torch.int32, device=DEVICE)
    paged_attention(q, case["kv_cache"], case["block_table"], qsl, case["seq_lens"],
                    case["scale"], dense, max_query_len=1, max_seq_len=max(seq_lens),
                    lse=dense_lse)
    _check(out, dense.float(), dtype, lse, dense_lse)
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    _check(out, ref, dtype, lse, ref_lse)


@pytest.mark.parametrize("num_splits", [None, 2])
def test_dense_physical_selection_is_the_block_table(num_splits):
    """The backend's dense decode: block-table rows as physical ids (a
    stride-0 view over heads, no copy) give the logical-id result."""
    case = _make_case([37, 9, 64], 2, 2, 16, 4, torch.bfloat16, "contiguous", ["all"], seed=4,
                      poison_unselected=False)
    sel, cnt = dense_physical_selection(case["block_table"], case["seq_lens"], 4, 2)
    assert sel.stride(1) == 0 and sel.data_ptr() == case["block_table"].data_ptr()
    assert cnt.tolist() == [[10, 10], [3, 3], [16, 16]]
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    q = case["query"]
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=DEVICE)
    sparse_paged_decode(**dict(case, sel_blocks=sel, sel_count=cnt), out=out, lse=lse,
                        num_splits=num_splits, sel_physical=True)
    _check(out, ref, torch.bfloat16, lse, ref_lse)


def test_choose_num_splits():
    # small batch, long selection: fills the GPU
    assert choose_num_splits(1, 8, 8192, 16, 132) >= 32
    # big batch: few splits
    assert choose_num_splits(256, 8, 8192, 16, 132) == 1
    # one wave of 4 programs per SM, never a second, nearly empty one (16 x 8 pairs: 4 splits, not 5)
    assert choose_num_splits(16, 8, 2049, 16, 132) == 4
    assert all(b * 8 * choose_num_splits(b, 8, 8192, 16, 132) <= 4 * 132 for b in (1, 2, 3, 5, 16, 33, 66))
    # short selections never get more splits than useful
    assert choose_num_splits(1, 1, 4, 16, 132) == 1
    assert choose_num_splits(1, 1, 8192, 16, 132, max_splits=5) == 5


# ---------------------------------------------------------------------------
# selection_from_patterns
# ---------------------------------------------------------------------------


@st.composite
def _patterns(draw, R, H, max_len):
    p = PatternBatch.empty(R, H, num_slash=2, num_vertical=3)
    for r in range(R):
        for h in range(H):
            p.full[r, h] = draw(st.integers(0, 9)) == 0
            p.sink[r, h] = draw(st.sampled_from([0, 0, 1, 4, 9]))
            p.window[r, h] = draw(st.sampled_from([0, 1, 3, 8, 20]))
            for s in range(2):
                p.slash[r, h, s] = draw(st.sampled_from([-1, 0, 5, 17, max_len + 5]))
            for v in range(3):
                p.vertical[r, h, v] = draw(st.sampled_from([-1, 2, 13, 40, max_len + 3]))
    if draw(st.booleans()):
        blk = draw(st.sampled_from([8, 16]))
        nb = draw(st.integers(1, max_len // blk + 2))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        p.blocks = torch.rand(R, H, nb, nb, generator=g) < 0.3
        p.block = blk
    return p


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), R=st.integers(1, 3), H=st.integers(1, 2),
       bs=st.sampled_from([4, 5, 16]))
def test_selection_from_patterns(data, R, H, bs):
    seq_lens = data.draw(st.lists(st.integers(1, 90), min_size=R, max_size=R))
    p = data.draw(_patterns(R, H, 90))
    max_blocks = max(math.ceil(s / bs) for s in seq_lens) + data.draw(st.integers(0, 2))
    p = p.to(DEVICE)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    want = selection_mask_from_patterns_ref(p, sl, bs, max_blocks)
    got = selection_mask_from_patterns(p, sl, bs, max_blocks).cpu()
    assert torch.equal(got, want)
    sel, cnt = selection_from_patterns(p, sl, bs, max_blocks)
    assert sel.dtype == torch.int32 and cnt.dtype == torch.int32
    assert sel.shape == (R, H, max_blocks) and cnt.shape == (R, H)
    for r in range(R):
        for h in range(H):
            n = int(cnt[r, h])
            blocks = sel[r, h, :n].tolist()
            assert blocks == torch.nonzero(want[r, h]).flatten().tolist()
            # the diagonal block is always there
            assert (seq_lens[r] - 1) // bs in blocks


def test_selection_from_patterns_drives_kernel():
    """Sink + window pattern -> selection -> kernel == reference over the
    selected positions (which include every allowed position)."""
    bs, hkv, group, d = 4, 2, 2, 16
    seq_lens = [37, 9]
    case = _make_case(seq_lens, hkv, group, d, bs, torch.float32, "contiguous",
                      ["all"], seed=9, poison_unselected=False)
    p = PatternBatch.local(2, hkv, sink=3, window=6, device=DEVICE)
    p.vertical[0, 1, 0] = 17
    sel, cnt = selection_from_patterns(p, case["seq_lens"], bs, case["block_table"].shape[1])
    # q = 36: sink -> block 0, window (31..36) -> blocks 7, 8, 9; column 17 -> 4
    assert cnt[0].tolist() == [4, 5]
    assert sel[0, 1, :5].tolist() == [0, 4, 7, 8, 9]
    pos = selected_positions(sel[0, 1], int(cnt[0, 1]), bs, 37).tolist()
    assert 17 in pos and 0 in pos and 36 in pos
    case.update(sel_blocks=sel, sel_count=cnt)
    out, lse = _run(case, num_splits=2)
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    _check(out, ref, torch.float32, lse, ref_lse)


# ---------------------------------------------------------------------------
# GPU only: CUDA-graph capture / replay
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,num_splits", [(torch.bfloat16, None),
                                              (torch.float16, 7),
                                              (torch.bfloat16, 1)])
def test_sparse_decode_cuda_graph(dtype, num_splits):
    R, hkv, group, d, bs = 3, 2, 4, 64, 16
    max_len = 600
    case = _make_case([max_len] * R, hkv, group, d, bs, dtype, "contiguous", ["all"],
                      seed=1, poison_unselected=False)
    maxsel = case["sel_blocks"].shape[2]
    q = case["query"]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device=DEVICE)
    ws = SparseDecodeWorkspace.allocate(R, hkv * group, d, max_splits=16, device=DEVICE)
    static = dict(case)

    def step():
        sparse_paged_decode(**static, out=out, lse=lse, workspace=ws,
                            num_splits=num_splits)

    step()  # compile / warm up outside capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    gen = torch.Generator().manual_seed(2)
    for it in range(3):
        # change contents in place: query, seq_lens, selection
        static["query"].copy_(torch.randn(q.shape, generator=gen).to(DEVICE, dtype))
        new_lens = torch.randint(1, max_len + 1, (R,), generator=gen, dtype=torch.int32)
        static["seq_lens"].copy_(new_lens.to(DEVICE))
        sel = torch.zeros(R, hkv, maxsel, dtype=torch.int32)
        cnt = torch.zeros(R, hkv, dtype=torch.int32)
        for r in range(R):
            n = math.ceil(int(new_lens[r]) / bs)
            for h in range(hkv):
                m = torch.rand(n, generator=gen) < (0.3 + 0.3 * it)
                m[n - 1] = True
                b = torch.nonzero(m).flatten()
                sel[r, h, :b.numel()] = b.int()
                cnt[r, h] = b.numel()
        static["sel_blocks"].copy_(sel.to(DEVICE))
        static["sel_count"].copy_(cnt.to(DEVICE))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_lse = sparse_paged_decode_ref(**static, return_lse=True)
        _check(out, ref, dtype, lse, ref_lse)


@pytest.mark.parametrize("physical,num_splits", [(False, 1), (True, 1), (True, 3), (False, 4)])
def test_sparse_decode_skips_each_heads_hole(physical, num_splits):
    """A compacted request's empty slots: a per-(row, KV head) range of the selected token stream is
    not attended, nor the tokens right after it whose skip bit is set (its tail block's evicted
    tokens).  Skipped slots hold NaN, so a stray read shows; holes may be empty, span blocks and split
    boundaries, or start at 0."""
    seq_lens, hkv, bs = [45, 70, 9], 2, 4
    case = _make_case(seq_lens, hkv, 2, 16, bs, torch.bfloat16, "contiguous", ["random", "all", "first_last"],
                      seed=5)
    gen = torch.Generator().manual_seed(7)
    hole = torch.zeros(len(seq_lens), hkv, 3, dtype=torch.int32)
    cache = case["kv_cache"]
    for r, s in enumerate(seq_lens):
        for h in range(hkv):
            pos = selected_positions(case["sel_blocks"][r, h], int(case["sel_count"][r, h]), bs, s)
            n = pos.numel()
            lo = int(torch.randint(0, n, (1,), generator=gen)) if (r + h) % 3 else 0
            hi = max(lo, min(n - 1, lo + int(torch.randint(0, 2 * bs + 3, (1,), generator=gen))))
            bits = int(torch.randint(0, 1 << bs, (1,), generator=gen))
            idx = torch.arange(n)
            after = idx - hi
            gone = ((idx >= lo) & (idx < hi)) | ((after >= 0) & (after < bs) & ((bits >> after.clamp(0, 31)) & 1 == 1))
            if gone.all():  # keep a token
                bits = 0
                gone = (idx >= lo) & (idx < hi)
            hole[r, h] = torch.tensor([lo, hi, bits])
            p = pos[gone].to(DEVICE)
            phys = case["block_table"][r].long()[p // bs]
            cache[phys, h, p % bs] = float("nan")
    case["hole"] = hole.to(DEVICE)
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    out, lse = _run(case, num_splits=num_splits, physical=physical)
    _check(out, ref, torch.bfloat16, lse, ref_lse)
    assert (hole[..., 1] > hole[..., 0]).any() and (hole[..., 2] != 0).any()
