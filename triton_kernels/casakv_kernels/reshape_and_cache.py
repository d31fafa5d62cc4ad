"""Scatter new K/V tokens into the paged KV cache (Triton).

Layout (vLLM V1 conventions):
  * ``key``/``value``: [num_tokens_padded, num_kv_heads, head_size].
  * ``kv_cache``: logical [num_blocks, num_kv_heads, block_size,
    2 * head_size] with arbitrary strides; K goes to ``[..., :head_size]``,
    V to ``[..., head_size:]``.
  * ``slot_mapping``: int64 [n], n <= num_tokens_padded; token ``t`` goes to
    block ``s // block_size``, offset ``s % block_size`` with
    ``s = slot_mapping[t]``; ``s < 0`` marks padding and is skipped.

Design: one program per token ``t < n`` handling every kv head at once as a
[BLOCK_H, BLOCK_D] tile (loads once, casts to the cache dtype, two stores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_token_heads(
    src_ptr,  # [num_tokens_padded, num_kv_heads, head_size]
    token,
    stride_tok,
    stride_head,
    stride_d,
    offs_h,  # [BLOCK_H]
    offs_d,  # [BLOCK_D]
    mask,  # [BLOCK_H, BLOCK_D]
):
    return tl.load(src_ptr + token * stride_tok + offs_h[:, None] * stride_head
                   + offs_d[None, :] * stride_d, mask=mask)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens_padded, num_kv_heads, head_size]
    value_ptr,  # [num_tokens_padded, num_kv_heads, head_size]
    kv_cache_ptr,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    slot_mapping_ptr,  # [n] int64
    block_size,  # int: tokens per KV block
    stride_k_tok, stride_k_head, stride_k_d,
    stride_v_tok, stride_v_head, stride_v_d,
    stride_c_blk, stride_c_head, stride_c_tok, stride_c_d,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next_power_of_2(NUM_KV_HEADS)
    BLOCK_D: tl.constexpr,  # next_power_of_2(HEAD_SIZE)
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_SIZE)[None, :]

    k = _load_token_heads(key_ptr, token, stride_k_tok, stride_k_head,
                          stride_k_d, offs_h, offs_d, mask)
    v = _load_token_heads(value_ptr, token, stride_v_tok, stride_v_head,
                          stride_v_d, offs_h, offs_d, mask)
    dst = (kv_cache_ptr + blk * stride_c_blk + off * stride_c_tok
           + offs_h[:, None] * stride_c_head + offs_d[None, :] * stride_c_d)
    cache_ty = kv_cache_ptr.dtype.element_ty
    tl.store(dst, k.to(cache_ty), mask=mask)
    tl.store(dst + HEAD_SIZE * stride_c_d, v.to(cache_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens_padded, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens_padded, num_kv_heads, head_size]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    slot_mapping: torch.Tensor,  # [n] int64, n <= num_tokens_padded
) -> None:
    """Write key[t] / value[t] into cache slot slot_mapping[t] for every
    t < len(slot_mapping) with a non-negative slot (in place)."""
    num_tokens_padded, num_kv_heads, head_size = key.shape
    assert value.shape == key.shape, "key and value must have the same shape"
    assert kv_cache.dim() == 4 and kv_cache.shape[1] == num_kv_heads
    assert kv_cache.shape[3] == 2 * head_size
    assert slot_mapping.dim() == 1
    n = slot_mapping.shape[0]
    assert n <= num_tokens_padded, "more slots than tokens"
    if n == 0:
        return
    _reshape_and_cache_kernel[(n,)](
        key, value, kv_cache, slot_mapping, kv_cache.shape[2],
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads, HEAD_SIZE=head_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_size),
        num_warps=4 if num_kv_heads * head_size >= 1024 else 1,
    )
