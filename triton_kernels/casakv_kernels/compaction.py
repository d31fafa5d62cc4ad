"""KV-cache compaction: keep a subset of tokens per (request, KV head) and
move them to the front of the request's logical sequence.

Inputs:
  * ``kv_cache``: logical [num_blocks, num_kv_heads, block_size,
    2 * head_size], any strides (K = ``[..., :D]``, V = ``[..., D:]``).
  * ``block_table``: [R, max_blocks_per_seq] int32 (logical -> physical).
  * ``keep``: int32 [R, num_kv_heads, MAXK]; row ``(r, h)`` lists the
    logical positions to retain, strictly ascending; only the first
    ``keep_count[r, h]`` entries are read.
  * ``keep_count``: int32 [R, num_kv_heads], each ``<= MAXK``.

Effect: retained token ``j`` (``j < keep_count[r, h]``) of row ``(r, h)``
lands at logical position ``j`` of request ``r``, KV head ``h`` (both K and
V).  Positions ``>= keep_count`` and all other heads / requests are left
untouched (the caller frees or overwrites them).  Requests must not share
physical blocks that they compact (e.g. prefix-cached blocks).

Sources and destinations overlap (``keep = [1, 2]`` moves 1 -> 0 and
2 -> 1), so an in-place parallel move races.  Two phases instead, each one
kernel launch (stream order is the barrier between them):
  1. gather every moving token (``keep[j] != j``) into ``scratch``
     [R, num_kv_heads, MAXK, 2 * head_size] (cache dtype);
  2. scatter ``scratch[r, h, j]`` to position ``j``.
Tokens already in place (``keep[j] == j``, e.g. attention sinks) are
skipped by both phases.  No host sync; capturable in a CUDA graph when
``scratch`` is given.

``compact_kv`` uses the CUDA op ``torch.ops.casakv.compact_kv``
(``csrc/compaction.cu``, 16-byte vectorised copies) when the extension
``casakv_vllm._C`` imports and the tensors are on CUDA, else the Triton
kernels below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compact_phase_kernel(
    kv_cache_ptr,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    scratch_ptr,  # [R, num_kv_heads, MAXK, 2*head_size] contiguous
    block_table_ptr,  # [R, max_blocks_per_seq] int32
    keep_ptr,  # [R, num_kv_heads, MAXK] int32
    keep_count_ptr,  # [R, num_kv_heads] int32
    num_kv_heads,
    max_keep,
    block_size,
    stride_bt_seq, stride_bt_blk,
    stride_c_blk, stride_c_head, stride_c_tok, stride_c_d,
    stride_k_seq, stride_k_head, stride_k_idx,
    stride_kc_seq, stride_kc_head,
    TWO_D: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_C: tl.constexpr,  # channels per inner step (pow2)
    GATHER: tl.constexpr,  # True: cache -> scratch; False: scratch -> cache
):
    rh = tl.program_id(0)
    seq = rh // num_kv_heads
    head = rh % num_kv_heads
    j0 = tl.program_id(1) * BLOCK_T
    count = tl.load(keep_count_ptr + seq * stride_kc_seq + head * stride_kc_head)
    if j0 >= count:
        return
    offs_j = j0 + tl.arange(0, BLOCK_T)
    in_range = offs_j < count
    src = tl.load(keep_ptr + seq.to(tl.int64) * stride_k_seq + head * stride_k_head
                  + offs_j * stride_k_idx, mask=in_range, other=0)
    move = in_range & (src != offs_j)
    if GATHER:
        cache_pos = src
    else:
        cache_pos = offs_j
    phys = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt_seq
                   + (cache_pos // block_size) * stride_bt_blk,
                   mask=move, other=0).to(tl.int64)
    cache_off = (phys * stride_c_blk + head.to(tl.int64) * stride_c_head
                 + (cache_pos % block_size).to(tl.int64) * stride_c_tok)
    scratch_off = (rh.to(tl.int64) * max_keep + offs_j) * TWO_D
    for c0 in tl.static_range(0, TWO_D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = move[:, None] & (cols[None, :] < TWO_D)
        cache_ptrs = kv_cache_ptr + cache_off[:, None] + cols[None, :] * stride_c_d
        scratch_ptrs = scratch_ptr + scratch_off[:, None] + cols[None, :]
        if GATHER:
            x = tl.load(cache_ptrs, mask=m)
            tl.store(scratch_ptrs, x, mask=m)
        else:
            x = tl.load(scratch_ptrs, mask=m)
            tl.store(cache_ptrs, x, mask=m)


def scratch_shape(kv_cache: torch.Tensor, keep: torch.Tensor) -> tuple[int, ...]:
    """Shape of the scratch buffer ``compact_kv`` needs (dtype = cache's)."""
    return (keep.shape[0], keep.shape[1], keep.shape[2], kv_cache.shape[3])


def allocate_scratch(kv_cache: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.empty(scratch_shape(kv_cache, keep), dtype=kv_cache.dtype,
                       device=kv_cache.device)


_CUDA_OP = None  # None: not probed yet; False: unavailable


def _cuda_op():
    global _CUDA_OP
    if _CUDA_OP is None:
        try:
            import casakv_vllm._C  # noqa: F401  (registers torch.ops.casakv.*)
        except ImportError:
            pass
        try:
            _CUDA_OP = torch.ops.casakv.compact_kv
        except (AttributeError, RuntimeError):
            _CUDA_OP = False
    return _CUDA_OP


def _check(kv_cache, block_table, keep, keep_count, scratch):
    num_seqs, num_kv_heads, max_keep = keep.shape
    assert kv_cache.dim() == 4 and kv_cache.shape[1] == num_kv_heads
    assert kv_cache.shape[3] % 2 == 0
    assert keep_count.shape == (num_seqs, num_kv_heads)
    assert block_table.dim() == 2 and block_table.shape[0] >= num_seqs
    assert scratch.dtype == kv_cache.dtype and scratch.is_contiguous()
    assert scratch.numel() >= num_seqs * num_kv_heads * max_keep * kv_cache.shape[3], \
        "scratch too small"


def compact_kv_triton(kv_cache, block_table, keep, keep_count, scratch=None):
    """Triton implementation of :func:`compact_kv` (any device Triton runs on)."""
    if scratch is None:
        scratch = allocate_scratch(kv_cache, keep)
    _check(kv_cache, block_table, keep, keep_count, scratch)
    num_seqs, num_kv_heads, max_keep = keep.shape
    if num_seqs == 0 or max_keep == 0:
        return kv_cache
    two_d = kv_cache.shape[3]
    block_c = min(triton.next_power_of_2(two_d), 256)
    block_t = max(1, min(32, 4096 // block_c))
    grid = (num_seqs * num_kv_heads, triton.cdiv(max_keep, block_t))
    for gather in (True, False):
        _compact_phase_kernel[grid](
            kv_cache, scratch, block_table, keep, keep_count,
            num_kv_heads, max_keep, kv_cache.shape[2],
            block_table.stride(0), block_table.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            keep.stride(0), keep.stride(1), keep.stride(2),
            keep_count.stride(0), keep_count.stride(1),
            TWO_D=two_d, BLOCK_T=block_t, BLOCK_C=block_c, GATHER=gather,
            num_warps=4,
        )
    return kv_cache


def compact_kv(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    keep: torch.Tensor,
    keep_count: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compact ``kv_cache`` in place (see module docstring) and return it.

    ``scratch``: optional preallocated buffer, contiguous, cache dtype, at
    least ``R * num_kv_heads * MAXK * 2 * head_size`` elements (see
    :func:`allocate_scratch`); pass it for CUDA-graph capture.
    """
    if scratch is None:
        scratch = allocate_scratch(kv_cache, keep)
    if kv_cache.is_cuda:
        op = _cuda_op()
        if op:
            _check(kv_cache, block_table, keep, keep_count, scratch)
            op(kv_cache, block_table, keep, keep_count, scratch)
            return kv_cache
    return compact_kv_triton(kv_cache, block_table, keep, keep_count, scratch)
