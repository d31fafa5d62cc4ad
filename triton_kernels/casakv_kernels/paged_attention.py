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
def _load_pair(k_ptrs, v_ptrs, mask, MASKED: tl.constexpr):
    """K and V through their pointer tensors, masked (read as 0) or not."""
    if MASKED:
        return tl.load(k_ptrs, mask=mask, other=0.0), tl.load(v_ptrs, mask=mask, other=0.0)
    return tl.load(k_ptrs), tl.load(v_ptrs)


@triton.jit
def _load_kv_tile(
    kv_cache_ptr,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    bt_row,  # [max_blocks_per_seq] int32, this request's block-table row
    head_off,  # int64: kv_head * stride_c_head
    n_start,
    kv_end,
    stride_bt_blk, stride_c_blk, stride_c_tok, stride_c_d,
    HEAD_SIZE: tl.constexpr,
    PAGE: tl.constexpr,  # KV cache block size (tokens)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # mask positions >= kv_end (read as 0)
    PAGE_LOADS: tl.constexpr = False,  # one block-table lookup per page (see below)
):
    """K [BLOCK_N, BLOCK_D] and V [BLOCK_N, BLOCK_D] for KV positions
    ``n_start .. n_start + BLOCK_N - 1``, each token's physical block looked
    up in the block table (any block size).

    ``PAGE_LOADS`` (PAGE a power of two dividing BLOCK_N, ``n_start`` a
    multiple of PAGE): the tile is loaded as [BLOCK_N // PAGE, PAGE, BLOCK_D],
    one block-table entry per page, then reshaped to [BLOCK_N, BLOCK_D]."""
    offs_d = tl.arange(0, BLOCK_D)
    if PAGE_LOADS:
        NP: tl.constexpr = BLOCK_N // PAGE
        pg = n_start // PAGE + tl.arange(0, NP)
        offs_t = tl.arange(0, PAGE)
        if MASK_N:
            phys = tl.load(bt_row + pg * stride_bt_blk, mask=pg * PAGE < kv_end, other=0)
        else:
            phys = tl.load(bt_row + pg * stride_bt_blk)
        base = phys.to(tl.int64) * stride_c_blk + head_off  # [NP]
        k3 = (kv_cache_ptr + base[:, None, None]
              + (offs_t.to(tl.int64) * stride_c_tok)[None, :, None]
              + offs_d[None, None, :] * stride_c_d)  # [NP, PAGE, BLOCK_D]
        v3 = k3 + HEAD_SIZE * stride_c_d
        m3 = (offs_d < HEAD_SIZE)[None, None, :]
        if MASK_N:
            m3 = ((pg * PAGE)[:, None] + offs_t[None, :] < kv_end)[:, :, None] & m3
        k, v = _load_pair(k3, v3, m3, MASK_N or HEAD_SIZE != BLOCK_D)
        return tl.reshape(k, [BLOCK_N, BLOCK_D]), tl.reshape(v, [BLOCK_N, BLOCK_D])
    offs_n = n_start + tl.arange(0, BLOCK_N)
    if MASK_N:
        n_mask = offs_n < kv_end
        phys = tl.load(bt_row + (offs_n // PAGE) * stride_bt_blk, mask=n_mask, other=0)
    else:
        phys = tl.load(bt_row + (offs_n // PAGE) * stride_bt_blk)
    tok_off = (phys.to(tl.int64) * stride_c_blk + head_off
               + (offs_n % PAGE).to(tl.int64) * stride_c_tok)  # [BLOCK_N]
    k_ptrs = kv_cache_ptr + tok_off[:, None] + offs_d[None, :] * stride_c_d
    v_ptrs = k_ptrs + HEAD_SIZE * stride_c_d
    if MASK_N and HEAD_SIZE == BLOCK_D:
        m2 = n_mask[:, None]
    elif MASK_N:
        m2 = n_mask[:, None] & (offs_d < HEAD_SIZE)[None, :]
    else:
        m2 = (offs_d < HEAD_SIZE)[None, :]
    return _load_pair(k_ptrs, v_ptrs, m2, MASK_N or HEAD_SIZE != BLOCK_D)


@triton.jit
def _qk(q, k, FP32_DOT: tl.constexpr):
    """Raw scores q @ k^T, fp32 [BLOCK_M, BLOCK_N] (k: [BLOCK_N, BLOCK_D])."""
    k = k.to(q.dtype)
    if FP32_DOT:
        # fp32 inputs (no tf32), or bf16 under the CPU interpreter whose bf16
        # tl.dot is broken: same roundings, exact fp32 products.
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)),
                      input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def _load_q_tile(
    query_ptr, q_start, q_len, ctx_len, q_tile_start, kv_head,
    stride_q_tok, stride_q_head, stride_q_d,
    HEAD_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The GQA-packed query tile shared by the prefill kernels: row ``m`` is
    token ``q_tile_start + m // GROUP`` of head ``kv_head * GROUP + m % GROUP``.
    Returns (q, q_pos, tok, head, row_mask, io_mask)."""
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_tile_start + offs_m // GROUP  # token index within the request
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m // GROUP < BLOCK_Q) & (q_idx < q_len)
    q_pos = ctx_len + q_idx
    tok = (q_start + q_idx).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = row_mask[:, None] & (offs_d < HEAD_SIZE)[None, :]
    q = tl.load(query_ptr + tok[:, None] * stride_q_tok
                + head[:, None] * stride_q_head + offs_d[None, :] * stride_q_d,
                mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    return q, q_pos, tok, head, row_mask, io_mask


@triton.jit
def _store_out(
    out_ptr, lse_ptr, acc, m_i, l_i, tok, head, row_mask, io_mask,
    stride_o_tok, stride_o_head, stride_o_d, stride_lse_tok, stride_lse_head,
    BLOCK_D: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Normalise and store the output rows (and the natural-log LSE)."""
    offs_d = tl.arange(0, BLOCK_D)
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
    stride_q_tok, stride_q_head, stride_q_d,
    stride_o_tok, stride_o_head, stride_o_d,
    stride_lse_tok, stride_lse_head,
    stride_bt_seq, stride_bt_blk,
    stride_c_blk, stride_c_head, stride_c_tok, stride_c_d,
    HEAD_SIZE: tl.constexpr,
    PAGE: tl.constexpr,  # tokens per KV block
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
    ctx_len = tl.load(seq_lens_ptr + seq) - q_len
    q, q_pos, tok, head, row_mask, io_mask = _load_q_tile(
        query_ptr, q_start, q_len, ctx_len, q_tile_start, kv_head,
        stride_q_tok, stride_q_head, stride_q_d,
        HEAD_SIZE, GROUP, BLOCK_Q, BLOCK_M, BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # KV positions visible to the first / last row of this tile.
    last_q = tl.minimum(q_tile_start + BLOCK_Q, q_len) - 1
    kv_end = ctx_len + last_q + 1
    first_visible = ctx_len + q_tile_start + 1
    # Full tiles (every row sees every position) need no mask at all.
    num_full = first_visible // BLOCK_N
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    head_off = kv_head.to(tl.int64) * stride_c_head

    for t in range(0, num_full):
        k, v = _load_kv_tile(kv_cache_ptr, bt_row, head_off, t * BLOCK_N, kv_end,
                             stride_bt_blk, stride_c_blk, stride_c_tok, stride_c_d,
                             HEAD_SIZE, PAGE, BLOCK_N, BLOCK_D, False)
        s = _qk(q, k, FP32_DOT)
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, qk_scale,
                                              v.to(q.dtype), False, FP32_DOT)
    for n_start in range(num_full * BLOCK_N, kv_end, BLOCK_N):
        k, v = _load_kv_tile(kv_cache_ptr, bt_row, head_off, n_start, kv_end,
                             stride_bt_blk, stride_c_blk, stride_c_tok, stride_c_d,
                             HEAD_SIZE, PAGE, BLOCK_N, BLOCK_D, True)
        s = _qk(q, k, FP32_DOT)
        offs_n = n_start + tl.arange(0, BLOCK_N)
        allowed = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < kv_end)
        s = tl.where(allowed, s, float("-inf"))
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, qk_scale,
                                              v.to(q.dtype), True, FP32_DOT)

    _store_out(out_ptr, lse_ptr, acc, m_i, l_i, tok, head, row_mask, io_mask,
               stride_o_tok, stride_o_head, stride_o_d,
               stride_lse_tok, stride_lse_head, BLOCK_D, WRITE_LSE)


def _interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Prefill tile configs, (BLOCK_M rows, BLOCK_N KV tokens, num_warps,
# num_stages), keyed by the padded head size, for 16-bit dtypes.  Head size
# 128 comes from H100 sweeps at Llama-3-8B shapes (32 q / 8 kv heads, bf16,
# 32k/128k: scripts/kernel_sweep.py); the others are unswept guesses sized to
# the same registers / shared memory.  fp32 (and the CPU interpreter) uses
# the smaller fallback.  The sparse kernel uses the same table (3 stages
# measured 0.96-1.05x Flex against 2 stages' 1.04-1.13x in one sweep).
PREFILL_CONFIGS = {
    64: (128, 64, 4, 3),
    128: (128, 128, 8, 3),
    256: (64, 32, 4, 2),
}
_FP32_CONFIG = (64, 32, 4, 2)


def prefill_config(head_size: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a prefill-sized batch."""
    block_d = max(triton.next_power_of_2(head_size), 16)
    if dtype == torch.float32 or _interpreting():
        return _FP32_CONFIG
    return PREFILL_CONFIGS.get(block_d, _FP32_CONFIG if block_d > 128 else PREFILL_CONFIGS[64])


def _pick_blocks(group: int, head_size: int, max_query_len: int, dtype=torch.bfloat16):
    """(BLOCK_Q, BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages): 16 rows
    for decode-like batches, the prefill table otherwise; tl.dot needs every
    dim >= 16."""
    block_d = max(triton.next_power_of_2(head_size), 16)
    min_m = max(16, triton.next_power_of_2(group))
    bm, bn, warps, stages = prefill_config(head_size, dtype)
    if max_query_len * group <= min_m:
        block_m, warps = min_m, 4
    else:
        block_m = max(bm, min_m)
    block_q = block_m // group
    return block_q, block_m, bn, block_d, warps, stages


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
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Causal paged attention; writes rows 0..query_start_loc[-1]-1 of ``out``
    (and of ``lse``, natural-log log-sum-exp of the scaled scores, if given)
    and returns ``out``.  ``max_query_len`` / ``max_seq_len`` must be upper
    bounds of the per-request values (host ints, no device sync here).
    ``config``: (BLOCK_M, BLOCK_N, num_warps, num_stages) override (tuning)."""
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
    block_q, block_m, block_n, block_d, warps, stages = _pick_blocks(
        group, head_size, max_query_len, query.dtype)
    if config is not None:
        block_m, block_n, warps, stages = config
        block_q = max(block_m // group, 1)
    fp32_dot = query.dtype == torch.float32 or (
        query.dtype == torch.bfloat16 and _interpreting())
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    lse_arg = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    _paged_attention_kernel[grid](
        out, lse_arg, query, kv_cache, block_table, query_start_loc, seq_lens,
        scale * math.log2(math.e),
        query.stride(0), query.stride(1), query.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse_strides[0], lse_strides[1],
        block_table.stride(0), block_table.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3),
        HEAD_SIZE=head_size, PAGE=block_size, GROUP=group, BLOCK_Q=block_q,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        WRITE_LSE=lse is not None, FP32_DOT=fp32_dot,
        num_warps=warps, num_stages=stages,
    )
    return out
