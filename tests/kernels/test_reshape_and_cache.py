"""Triton reshape_and_cache vs. the plain-torch reference."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from casakv_kernels.reference import reshape_and_cache_ref  # noqa: E402
from casakv_kernels.reshape_and_cache import reshape_and_cache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Triton's CPU interpreter truncates fp32 -> bf16 casts (GPUs round to
# nearest even like torch), so that one cast may differ by 1 bf16 ulp there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cast_tol(src_dtype, cache_dtype):
    if INTERPRET and src_dtype == torch.float32 and cache_dtype == torch.bfloat16:
        return dict(atol=0.0, rtol=2.0 ** -7)
    return dict(atol=0.0, rtol=0.0)


def _make_cache(num_blocks, num_kv_heads, block_size, head_size, dtype,
                layout, gen):
    two_hs = 2 * head_size
    if layout == "contiguous":
        cache = torch.randn(num_blocks, num_kv_heads, block_size, two_hs,
                            generator=gen)
    elif layout == "block_major":  # [nb, bs, kvh, 2hs] physically
        cache = torch.randn(num_blocks, block_size, num_kv_heads, two_hs,
                            generator=gen).permute(0, 2, 1, 3)
    elif layout == "dim_major":  # stride of the last dim != 1
        cache = torch.randn(two_hs, num_blocks, block_size, num_kv_heads,
                            generator=gen).permute(1, 3, 2, 0)
    else:
        raise ValueError(layout)
    return cache.to(DEVICE, dtype)


def _check(num_tokens, n, num_kv_heads, head_size, block_size, num_blocks,
           src_dtype, cache_dtype, layout, pad_frac, strided_kv, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = _make_cache(num_blocks, num_kv_heads, block_size, head_size,
                        cache_dtype, layout, gen)
    if strided_kv:  # views into a packed qkv-like buffer
        buf = torch.randn(num_tokens, 2 * num_kv_heads + 1, head_size,
                          generator=gen).to(DEVICE, src_dtype)
        key = buf[:, 1:num_kv_heads + 1]
        value = buf[:, num_kv_heads + 1:]
    else:
        key = torch.randn(num_tokens, num_kv_heads, head_size,
                          generator=gen).to(DEVICE, src_dtype)
        value = torch.randn(num_tokens, num_kv_heads, head_size,
                            generator=gen).to(DEVICE, src_dtype)
    # Distinct slots, some replaced by -1 padding.
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    pad = torch.rand(n, generator=gen) < pad_frac
    slots = torch.where(pad, torch.full_like(slots, -1), slots)
    # Poison the tokens past n: they must never be read / written.
    if num_tokens > n:
        key[n:] = float("nan")
        value[n:] = float("nan")
    slot_mapping = slots.to(DEVICE, torch.int64)

    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected, slot_mapping)
    before = cache.clone()
    reshape_and_cache(key, value, cache, slot_mapping)

    tol = _cast_tol(src_dtype, cache_dtype)
    torch.testing.assert_close(cache, expected, **tol)
    # Explicit checks: written slots hold key/value, everything else is
    # exactly as before.
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool,
                          device=DEVICE)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        blk, off = divmod(s, block_size)
        written[blk, off] = True
        torch.testing.assert_close(cache[blk, :, off, :head_size],
                                   key[t].to(cache_dtype), **tol)
        torch.testing.assert_close(cache[blk, :, off, head_size:],
                                   value[t].to(cache_dtype), **tol)
    untouched = ~written[:, None, :, None].expand_as(cache)
    assert torch.equal(cache[untouched], before[untouched])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    num_tokens=st.integers(1, 40),
    n_pad=st.integers(0, 4),
    num_kv_heads=st.integers(1, 3),
    head_size=st.sampled_from([16, 32, 64, 24]),
    block_size=st.sampled_from([4, 5, 16, 32]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "block_major", "dim_major"]),
    pad_frac=st.sampled_from([0.0, 0.3]),
    strided_kv=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_reshape_and_cache_matches_reference(num_tokens, n_pad, num_kv_heads,
                                             head_size, block_size, dtype,
                                             layout, pad_frac, strided_kv,
                                             seed):
    n = max(num_tokens - n_pad, 1)
    num_blocks = (num_tokens + block_size - 1) // block_size + 3
    _check(num_tokens, n, num_kv_heads, head_size, block_size, num_blocks,
           dtype, dtype, layout, pad_frac, strided_kv, seed)


@pytest.mark.parametrize("src_dtype,cache_dtype", [
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.float32),
])
def test_reshape_and_cache_casts(src_dtype, cache_dtype):
    _check(13, 11, 2, 32, 5, 6, src_dtype, cache_dtype, "block_major", 0.3,
           False, 3)


def test_reshape_and_cache_all_padding_and_empty():
    gen = torch.Generator().manual_seed(0)
    cache = _make_cache(4, 2, 16, 16, torch.float32, "contiguous", gen)
    before = cache.clone()
    key = torch.randn(5, 2, 16, generator=gen).to(DEVICE)
    value = torch.randn(5, 2, 16, generator=gen).to(DEVICE)
    reshape_and_cache(key, value, cache,
                      torch.full((5,), -1, dtype=torch.int64, device=DEVICE))
    reshape_and_cache(key, value, cache,
                      torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert torch.equal(cache, before)
