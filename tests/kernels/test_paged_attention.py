"""Triton paged attention vs. the plain-torch fp32 reference."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from casakv_kernels.paged_attention import paged_attention  # noqa: E402
from casakv_kernels.reference import (  # noqa: E402
    gather_kv,
    paged_attention_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "block_major", "dim_major", "padded"]


def _make_kv_cache(num_blocks, num_kv_heads, block_size, head_size, dtype,
                   layout, gen):
    """Random kv_cache with logical shape [nb, kvh, bs, 2*hs] and the given
    physical layout (possibly a non-contiguous view)."""
    two_hs = 2 * head_size
    if layout == "contiguous":
        phys = torch.randn(num_blocks, num_kv_heads, block_size, two_hs,
                           generator=gen)
        cache = phys
    elif layout == "block_major":  # [nb, bs, kvh, 2hs] physically
        phys = torch.randn(num_blocks, block_size, num_kv_heads, two_hs,
                           generator=gen)
        cache = phys.permute(0, 2, 1, 3)
    elif layout == "dim_major":  # [2hs, nb, bs, kvh] physically: stride_d != 1
        phys = torch.randn(two_hs, num_blocks, block_size, num_kv_heads,
                           generator=gen)
        cache = phys.permute(1, 3, 2, 0)
    elif layout == "padded":  # row padding on the last dim
        phys = torch.randn(num_blocks, num_kv_heads, block_size, two_hs + 8,
                           generator=gen)
        cache = phys[..., :two_hs]
    else:
        raise ValueError(layout)
    cache = cache.to(DEVICE, dtype)
    assert cache.shape == (num_blocks, num_kv_heads, block_size, two_hs)
    return cache


def _make_case(q_lens, ctx_lens, num_kv_heads, group, head_size, block_size,
               dtype, layout, pad_tokens, strided_query, seed):
    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    total_blocks = sum(blocks_per_seq)
    num_blocks = total_blocks + 3  # block 0 = null block, plus spares
    cache = _make_kv_cache(num_blocks, num_kv_heads, block_size, head_size,
                           dtype, layout, gen)
    # Random physical ids from 1..num_blocks-1; never block 0.
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(blocks_per_seq) + 2
    # Entries past the needed blocks are garbage (in range, possibly 0).
    block_table = torch.randint(0, num_blocks, (len(q_lens), width),
                                generator=gen, dtype=torch.int32)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for i, nb in enumerate(blocks_per_seq):
        ids = perm[:nb]
        perm = perm[nb:]
        block_table[i, :nb] = torch.tensor(ids, dtype=torch.int32)
        for j, b in enumerate(ids):
            used[b, : min(block_size, seq_lens[i] - j * block_size)] = True
    # Poison every cache slot no request owns: reading one yields NaN.
    used = used.to(DEVICE)
    cache.masked_fill_(~used[:, None, :, None], float("nan"))

    num_tokens = sum(q_lens)
    rows = num_tokens + pad_tokens
    if strided_query:  # a view into a packed qkv-like buffer
        buf = torch.randn(rows, num_heads + 2, head_size + 8, generator=gen)
        query = buf.to(DEVICE, dtype)[:, 1:num_heads + 1, 4:head_size + 4]
    else:
        query = torch.randn(rows, num_heads, head_size, generator=gen)
        query = query.to(DEVICE, dtype)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    return dict(
        query=query,
        kv_cache=cache,
        block_table=block_table.to(DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        scale=head_size ** -0.5,
    )


def _tolerances(dtype):
    if dtype == torch.float32:
        return 1e-4, 1e-4
    return 2e-2, 2e-2


def _run_and_check(case, max_query_len=None, max_seq_len=None, with_lse=True):
    query = case["query"]
    num_tokens = int(case["query_start_loc"][-1])
    rows, num_heads, _ = query.shape
    out = torch.full_like(query, float("nan")).contiguous()
    lse = None
    if with_lse:
        lse = torch.full((rows, num_heads), float("nan"), dtype=torch.float32,
                         device=DEVICE)
    q_lens = (case["query_start_loc"][1:] - case["query_start_loc"][:-1])
    if max_query_len is None:
        max_query_len = int(q_lens.max())
    if max_seq_len is None:
        max_seq_len = int(case["seq_lens"].max())
    res = paged_attention(**case, out=out, max_query_len=max_query_len,
                          max_seq_len=max_seq_len, lse=lse)
    assert res is out
    ref, ref_lse = paged_attention_ref(**case, return_lse=True)

    got = out[:num_tokens].float()
    want = ref[:num_tokens]
    assert torch.isfinite(got).all(), "written rows must be finite"
    assert torch.isnan(out[num_tokens:]).all(), "padding rows must be untouched"
    atol, rtol = _tolerances(query.dtype)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if query.dtype != torch.float32:
        rel = (got - want).norm() / want.norm()
        assert rel <= 1e-2, f"relative error {rel:.3e}"
    if with_lse:
        assert torch.isnan(lse[num_tokens:]).all()
        # Scores are exact products of the same (rounded) inputs in both, so
        # the LSE is tight for every dtype.
        torch.testing.assert_close(lse[:num_tokens], ref_lse[:num_tokens],
                                   atol=2e-5, rtol=2e-5)


@st.composite
def _requests(draw):
    """Per request (q_len, ctx_len): decode, full prefill or chunked prefill,
    with seq_len <= 80."""
    num_seqs = draw(st.integers(1, 3))
    q_lens, ctx_lens = [], []
    for _ in range(num_seqs):
        kind = draw(st.sampled_from(["decode", "prefill", "chunked"]))
        if kind == "decode":
            q, c = 1, draw(st.integers(0, 79))
        elif kind == "prefill":
            q, c = draw(st.integers(1, 70)), 0
        else:
            q = draw(st.integers(2, 40))
            c = draw(st.integers(1, 80 - q))
        q_lens.append(q)
        ctx_lens.append(c)
    return q_lens, ctx_lens


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=_requests(),
    num_kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_size=st.sampled_from([16, 32, 64, 24]),
    block_size=st.sampled_from([4, 5, 16, 32]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    pad_tokens=st.integers(0, 3),
    strided_query=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_paged_attention_matches_reference(reqs, num_kv_heads, group,
                                           head_size, block_size, dtype,
                                           layout, pad_tokens, strided_query,
                                           seed):
    q_lens, ctx_lens = reqs
    case = _make_case(q_lens, ctx_lens, num_kv_heads, group, head_size,
                      block_size, dtype, layout, pad_tokens, strided_query,
                      seed)
    _run_and_check(case, with_lse=bool(seed % 2))


@pytest.mark.parametrize(
    "q_lens,ctx_lens,num_kv_heads,group,head_size,block_size,dtype,layout",
    [
        # mixed batch: decode + chunked prefill + full prefill, odd block size
        ([1, 9, 33], [40, 17, 0], 2, 2, 32, 5, torch.float32, "block_major"),
        # large non-power-of-two group, head_size not a power of two
        ([3, 1], [20, 64], 1, 5, 24, 16, torch.bfloat16, "dim_major"),
        # group of 8 (BLOCK_M holds only 2 tokens), fp16
        ([7], [50], 1, 8, 16, 4, torch.float16, "padded"),
        # long prefill crossing several KV tiles, block_size 24
        ([80], [0], 1, 1, 64, 24, torch.float32, "contiguous"),
    ],
)
def test_paged_attention_cases(q_lens, ctx_lens, num_kv_heads, group,
                               head_size, block_size, dtype, layout):
    case = _make_case(q_lens, ctx_lens, num_kv_heads, group, head_size,
                      block_size, dtype, layout, pad_tokens=2,
                      strided_query=False, seed=1234)
    _run_and_check(case)


@pytest.mark.parametrize("group", [1, 3])
def test_paged_attention_tile_boundaries(group):
    """Contexts around KV-tile multiples: the first rows of a query tile see
    a partial tile that needs the causal mask, later rows a full one."""
    ctx_lens = [14, 15, 16, 30, 31, 32, 61, 62, 63, 64]
    case = _make_case([3] * len(ctx_lens), ctx_lens, 1, group, 16, 16,
                      torch.float32, "contiguous", pad_tokens=0,
                      strided_query=False, seed=11)
    _run_and_check(case)


def test_paged_attention_loose_upper_bounds():
    """max_query_len / max_seq_len are only upper bounds."""
    case = _make_case([4, 1], [10, 30], 2, 2, 16, 16, torch.float32,
                      "contiguous", pad_tokens=1, strided_query=False, seed=7)
    _run_and_check(case, max_query_len=40, max_seq_len=200)


def test_reference_matches_sdpa():
    """The reference itself: contiguous single-sequence full prefill."""
    gen = torch.Generator().manual_seed(0)
    num_kv_heads, group, head_size, block_size, seq_len = 2, 2, 32, 16, 45
    num_heads = num_kv_heads * group
    num_blocks = math.ceil(seq_len / block_size)
    cache = torch.randn(num_blocks + 1, num_kv_heads, block_size,
                        2 * head_size, generator=gen)
    block_table = torch.tensor([[3, 1, 2]], dtype=torch.int32)
    query = torch.randn(seq_len, num_heads, head_size, generator=gen)
    qsl = torch.tensor([0, seq_len], dtype=torch.int32)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    scale = 0.3
    out = paged_attention_ref(query, cache, block_table, qsl, seq_lens, scale)

    k, v = gather_kv(cache, block_table[0], seq_len)  # [seq, kvh, hs]
    assert torch.equal(k[block_size + 1, 1], cache[1, 1, 1, :head_size])
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [nh, seq, hs]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), k, v, is_causal=True, scale=scale)
    torch.testing.assert_close(out, want.transpose(0, 1), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.slow  # 27 s under TRITON_INTERPRET: make test-all (the GPU suite runs it on the GPU)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    q_len=st.integers(1, 300),
    ctx_len=st.integers(0, 300),
    num_kv_heads=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 6, 8]),
    head_size=st.sampled_from([64, 80, 128]),
    block_size=st.sampled_from([16, 24, 128]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
)
def test_paged_attention_larger_shapes(q_len, ctx_len, num_kv_heads, group,
                                       head_size, block_size, dtype, layout,
                                       seed):
    case = _make_case([q_len, 1], [ctx_len, ctx_len + q_len], num_kv_heads,
                      group, head_size, block_size, dtype, layout,
                      pad_tokens=1, strided_query=bool(seed % 3 == 0),
                      seed=seed)
    _run_and_check(case)
