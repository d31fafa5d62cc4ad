"""Causal paged attention (prefill, chunked prefill and decode) in Triton.

Layout (vLLM V1 conventions):
  * ``query``/``out``: [num_tokens, num_heads, head_size], the tokens of all
    requests packed; request ``i`` owns rows
    ``query_start_loc[i]:query_start_loc[i + 1]``.
  * ``kv_cache``: logical [num_blocks, num_kv_heads, block_size,
    2 * head_size] with arbitrary strides; K is ``[..., :head_size]``,
    V is ``[..., head_size:]``.
  * ``seq_lens[i]``: total KV length of request ``i``; its query tokens are
    the last ``q_len_i`` positions, so query row ``j`` sits at absolute
    position ``seq_len_i - q_len_i + j`` and attends to positions
    ``0 .. seq_len_i - q_len_i + j`` inclusive.

Design: one program per (request, tile of BLOCK_Q query tokens, kv head).
The ``GROUP`` query heads that share the kv head are flattened with the
BLOCK_Q tokens into the M dimension (row ``m`` -> token ``m // GROUP``, head
``kv_head * GROUP + m % GROUP``), so every K/V tile is loaded once per group.
The program walks the KV sequence in tiles of BLOCK_N tokens, resolving each
token's physical block through the block table (any block_size), and keeps
an fp32 online softmax in base 2.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .online_softmax import online_softmax_update


@triton.jit
def _load_kv_tile(
    kv_cache_ptr,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table_row_ptr,  # [max_blocks_per_seq] int32, this request's row
    kv_head,
    n_start,
    kv_end,
    block_size,
    stride_bt_blk,
    stride_c_blk,
    stride_c_head,
    stride_c_tok,
    stride_c_d,
    HEAD_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Load K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] for KV positions
    n_start .. n_start + BLOCK_N - 1 (positions >= kv_end read as 0)."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < kv_end
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE
    phys = tl.load(block_table_row_ptr + (offs_n // block_size) * stride_bt_blk,
                   mask=n_mask, other=0).to(tl.int64)
    tok_off = (phys * stride_c_blk + kv_head * stride_c_head
               + (offs_n % block_size).to(tl.int64) * stride_c_tok)  # [BLOCK_N]
    k = tl.load(kv_cache_ptr + tok_off[None, :] + offs_d[:, None] * stride_c_d,
                mask=d_mask[:, None] & n_mask[None, :], other=0.0)
    v = tl.load(kv_cache_ptr + tok_off[:, None]
                + (HEAD_SIZE + offs_d[None, :]) * stride_c_d,
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(
    acc,  # [BLOCK_M, BLOCK_D] fp32 unnormalised output
    m_i,  # [BLOCK_M] fp32 running max (base-2 scaled scores)
    l_i,  # [BLOCK_M] fp32 running sum of exp2
    q,  # [BLOCK_M, BLOCK_D] query tile
    k,  # [BLOCK_D, BLOCK_N] K^T tile
    v,  # [BLOCK_N, BLOCK_D] V tile
    n_start,
    q_pos,  # [BLOCK_M] int32 absolute position of each row's token
    kv_end,
    qk_scale,  # softmax scale * log2(e)
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    # K/V are cast to the query dtype; P is rounded to it before P @ V.
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    if FP32_DOT:
        # fp32 inputs (no tf32), or bf16 under the CPU interpreter whose bf16
        # tl.dot is broken: same roundings, exact fp32 products.
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale  # [BLOCK_M, BLOCK_N]
    if CAUSAL_MASK:
        offs_n = n_start + tl.arange(0, BLOCK_N)
        allowed = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < kv_end)
        s = tl.where(allowed, s, float("-inf"))
    return online_softmax_update(acc, m_i, l_i, s, v, FP32_DOT)


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    lse_ptr,  # [num_tokens, num_heads] fp32 (unused unless WRITE_LSE)
    query_ptr,  # [num_tokens, num_heads, head_size]
    kv_cache_ptr,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    qk_scale,  # float: softmax scale * log2(e)
    block_size,  # int: tokens per KV block
    stride_q_tok, stride_q_head, stride_q_d,
    stride_o_tok, stride_o_head, stride_o_d,
    stride_lse_tok, stride_lse_head,
    stride_bt_seq, stride_bt_blk,
    stride_c_blk, stride_c_head, stride_c_tok, stride_c_d,
    HEAD_SIZE: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program (>= BLOCK_Q * GROUP, pow2)
    BLOCK_N: tl.constexpr,  # KV tokens per inner iteration
    BLOCK_D: tl.constexpr,  # next_power_of_2(HEAD_SIZE)
    WRITE_LSE: tl.constexpr,
    FP32_DOT: tl.constexpr,  # fp32 operands, IEEE products
):
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile_start = q_block * BLOCK_Q
    if q_tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_tile_start + offs_m // GROUP  # token index within the request
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m // GROUP < BLOCK_Q) & (q_idx < q_len)
    q_pos = ctx_len + q_idx
    tok = (q_start + q_idx).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE
    io_mask = row_mask[:, None] & d_mask[None, :]

    q = tl.load(query_ptr + tok[:, None] * stride_q_tok
                + head[:, None] * stride_q_head + offs_d[None, :] * stride_q_d,
                mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # KV positions visible to the first / last row of this tile.
    last_q = tl.minimum(q_tile_start + BLOCK_Q, q_len) - 1
    kv_end = ctx_len + last_q + 1
    first_visible = ctx_len + q_tile_start + 1
    # Full tiles (every row sees every position) need no causal mask.
    num_full = first_visible // BLOCK_N
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq

    for t in range(0, num_full):
        n_start = t * BLOCK_N
        k, v = _load_kv_tile(kv_cache_ptr, bt_row, kv_head, n_start, kv_end,
                             block_size, stride_bt_blk, stride_c_blk,
                             stride_c_head, stride_c_tok, stride_c_d,
                             HEAD_SIZE, BLOCK_N, BLOCK_D)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, n_start,
                                             q_pos, kv_end, qk_scale, BLOCK_N,
                                             False, FP32_DOT)
    for n_start in range(num_full * BLOCK_N, kv_end, BLOCK_N):
        k, v = _load_kv_tile(kv_cache_ptr, bt_row, kv_head, n_start, kv_end,
                             block_size, stride_bt_blk, stride_c_blk,
                             stride_c_head, stride_c_tok, stride_c_d,
                             HEAD_SIZE, BLOCK_N, BLOCK_D)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, n_start,
                                             q_pos, kv_end, qk_scale, BLOCK_N,
                                             True, FP32_DOT)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    tl.store(out_ptr + tok[:, None] * stride_o_tok
             + head[:, None] * stride_o_head + offs_d[None, :] * stride_o_d,
             acc.to(out_ptr.dtype.element_ty), mask=io_mask)
    if WRITE_LSE:
        # m_i and log2(l_i) are in base 2; convert to natural log.
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        tl.store(lse_ptr + tok * stride_lse_tok + head * stride_lse_head,
                 lse, mask=row_mask)


def _interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pick_blocks(group: int, head_size: int, max_query_len: int):
    """(BLOCK_Q, BLOCK_M, BLOCK_N, BLOCK_D): 16 rows for decode-like batches,
    64 for prefill; tl.dot needs every dim >= 16."""
    block_d = max(triton.next_power_of_2(head_size), 16)
    min_m = max(16, triton.next_power_of_2(group))
    block_m = min_m if max_query_len * group <= min_m else max(64, min_m)
    block_q = block_m // group
    block_n = 64 if block_d <= 64 else 32
    return block_q, block_m, block_n, block_d


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_size], written in place
    max_query_len: int,
    max_seq_len: int,
    lse: torch.Tensor | None = None,  # [num_tokens, num_heads] fp32
) -> torch.Tensor:
    """Causal paged attention; writes rows 0..query_start_loc[-1]-1 of ``out``
    (and of ``lse``, natural-log log-sum-exp of the scaled scores, if given)
    and returns ``out``.  ``max_query_len`` / ``max_seq_len`` must be upper
    bounds of the per-request values (host ints, no device sync here)."""
    num_tokens, num_heads, head_size = query.shape
    num_blocks, num_kv_heads, block_size, two_hs = kv_cache.shape
    assert two_hs == 2 * head_size, "kv_cache last dim must be 2*head_size"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of kv heads"
    assert out.shape[1:] == query.shape[1:] and out.shape[0] >= num_tokens
    assert block_table.dim() == 2 and block_table.shape[0] >= seq_lens.shape[0]
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.shape[0] == num_seqs + 1
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape[1] == num_heads
    if num_seqs == 0 or max_query_len <= 0 or max_seq_len <= 0:
        return out
    group = num_heads // num_kv_heads
    block_q, block_m, block_n, block_d = _pick_blocks(group, head_size,
                                                      max_query_len)
    fp32_dot = query.dtype == torch.float32 or (
        query.dtype == torch.bfloat16 and _interpreting())
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    lse_arg = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    _paged_attention_kernel[grid](
        out, lse_arg, query, kv_cache, block_table, query_start_loc, seq_lens,
        scale * math.log2(math.e), block_size,
        query.stride(0), query.stride(1), query.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse_strides[0], lse_strides[1],
        block_table.stride(0), block_table.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3),
        HEAD_SIZE=head_size, GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, WRITE_LSE=lse is not None,
        FP32_DOT=fp32_dot,
        num_warps=4, num_stages=2,
    )
    return out
