"""The CPU serving path (torch ops) against the plain reference, random inputs."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from casakv_vllm.attention.cpu_path import cpu_attention
from casakv_vllm.attention.torch_paged import write_kv
from casakv_vllm.triton_kernels.reference import paged_attention_ref, reshape_and_cache_ref


def _batch(seed, q_lens, ctx_lens, num_kv_heads, group, head_size, block_size, dtype, token_major):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 = null block
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    for i, nb in enumerate(blocks_per_seq):
        table[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)])
    shape = (num_blocks, block_size, num_kv_heads, 2 * head_size) if token_major else \
        (num_blocks, num_kv_heads, block_size, 2 * head_size)
    cache = torch.randn(shape, generator=g).to(dtype)
    if token_major:
        cache = cache.permute(0, 2, 1, 3)  # logical [B, H, N, 2D], NHD strides
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_size, generator=g).to(dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return q, cache, table, qsl, torch.tensor(seq_lens, dtype=torch.int32)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    reqs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 70)), min_size=1, max_size=4),
    num_kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 3, 4]),
    head_size=st.sampled_from([16, 64]),
    block_size=st.sampled_from([5, 16, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    token_major=st.booleans(),
)
def test_paged_attention_cpu_matches_reference(seed, reqs, num_kv_heads, group, head_size, block_size, dtype, token_major):
    q_lens = [q for q, _ in reqs]
    ctx = [c for _, c in reqs]
    q, cache, table, qsl, seq_lens = _batch(seed, q_lens, ctx, num_kv_heads, group, head_size, block_size, dtype, token_major)
    out = torch.full((q.shape[0] + 2, *q.shape[1:]), float("nan"), dtype=dtype)
    cpu_attention(q, cache, table, qsl.tolist(), seq_lens.tolist(), 0.125, out)
    ref = paged_attention_ref(q, cache, table, qsl, seq_lens, 0.125)
    n = q.shape[0]
    assert torch.isnan(out[n:]).all(), "rows past the batch were written"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = (out[:n].float() - ref).norm() / ref.norm()
    assert err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("token_major", [False, True])
def test_write_kv_matches_reference(token_major):
    g = torch.Generator().manual_seed(3)
    _, cache, *_ = _batch(1, [4], [0], 2, 1, 16, 8, torch.bfloat16, token_major)
    expected = cache.clone()
    key = torch.randn(10, 2, 16, generator=g)
    value = torch.randn(10, 2, 16, generator=g)
    slots = torch.tensor([3, -1, 17, 30, -1, 9, 0, 31], dtype=torch.int64)  # 2 padding tokens beyond n
    write_kv(key, value, cache, slots)
    reshape_and_cache_ref(key, value, expected, slots)
    assert torch.equal(cache, expected)
    assert not torch.equal(cache, _batch(1, [4], [0], 2, 1, 16, 8, torch.bfloat16, token_major)[1])
