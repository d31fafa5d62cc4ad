"""Pattern-restricted (sparse) paged attention for prefill / chunked prefill.

Computes exactly causal attention restricted to ``allowed(q, k)`` of
:mod:`.patterns`, for vLLM V1 packed batches (same layout and conventions as
:mod:`.paged_attention`: ``query``/``out`` ``[num_tokens, num_heads, D]``,
``kv_cache`` logical ``[num_blocks, num_kv_heads, block_size, 2*D]`` with any
strides, GQA via ``num_heads // num_kv_heads`` query heads per KV head).

Design: one program per (request, tile of ``block_q`` query tokens, KV head);
the ``GROUP`` query heads of the KV head are packed with the tokens into the
M dimension (row ``m`` -> token ``m // GROUP``, head ``kv_head*GROUP +
m % GROUP``) so each K/V tile is loaded once per group.  Instead of walking
every causal KV tile, the program walks the partitioned
list ``index.tile_idx[r, h, qt]`` built on the GPU by
:func:`.sparse_index.build_prefill_index`: first the full tiles (no element
mask, unmasked loads, a plain online-softmax step), then the partial tiles
(in narrower steps, see ``PARTIAL_N``), which evaluate ``allowed``
element-wise in registers from the pattern fields:

* causal ``k <= q`` and the diagonal ``k == q``; ``full`` (scalar);
* sink ``k < sink`` and window ``q - k < window`` (scalars);
* vertical columns: a 1-D gather of the 64-bit words of ``index.vert_bits``
  covering the tile's ``block_n`` columns;
* slash offsets: the (at most ``NW_DIST``) words of ``index.slash_bits``
  covering the tile's ``q - k`` range are loaded as scalars and each element
  picks its bit (skipped when those words are all zero);
* block-sparse: per element the bit
  ``blocks[r, h, min(q // block, NQB-1), min(k // block, NKB-1)]``; the
  query tile's rows touch at most ``(block_q - 1) // block + 2`` pattern-block
  rows, so when that is <= 4 each is one 1-D gather of ``block_n`` bits,
  otherwise (tiny pattern blocks) a 2-D gather from the small, L1-resident
  block mask.  ``patterns.block`` may thus be any size, unrelated to
  ``block_n`` / ``block_q``.

No dense mask is ever materialised in memory.  Softmax is fp32 in base 2;
``out`` is written in its own dtype and ``lse`` (optional) as natural-log fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .online_softmax import online_softmax_update

from .paged_attention import (_FP32_CONFIG, PREFILL_CONFIGS, _interpreting,
                              _load_kv_tile, _load_q_tile, _qk, _store_out,
                              prefill_config)
from .patterns import PatternBatch
from .sparse_index import SparseIndex, head_params, words_for_range


# Kernel variants (module switches, read at launch; `scripts/kernel_sweep.py
# --only variants` times all four settings).  Per-page K/V loads (one
# block-table lookup per 16-token page instead of per token) measured on the
# H100 at 32k: causal 21.5 -> 19.7 ms, a-shape 5.90 -> 5.41, vertical-slash
# 3.62 -> 3.34; 128k causal 366.6 -> 332.5.  Launching the longest causal query
# tiles first did not help (32k causal 21.5 -> 22.0), so it stays off.
PAGE_LOADS = True
REVERSE_Q = False
# Partial-tile masks: skip the slash / vertical bitmap loads of heads that
# list none (per-head flags from ``sparse_index.head_params``), and issue the
# vertical bitmap load before the K/V load so its latency overlaps the q.k
# product instead of following it.
MASK_KINDS = True
MASK_EARLY = True
# Partial tiles in steps of PARTIAL_N positions (None: whole tiles), which
# lowers the register peak of the element-masked step (H100, 128 x 128 tiles:
# 255 registers with 12 spilled -> 250 with none), and PARTIAL_SKIP skips the
# steps that start past the query tile's last position (most of a diagonal
# tile).  Sweep at 32k / 128k, casakv / Flex: vertical-slash 1.043 -> 1.009 /
# 0.994 -> 0.973, a-shape 1.004 -> 0.983 / 0.986 -> 0.975.
PARTIAL_N = 32
PARTIAL_SKIP = True


# Tiles for batches whose patterns promise no full head
# (``PatternBatch.sparse_only``) and whose longest sequence lies in WIDE_SEQ:
# 256 rows (64 query tokens x 4 query heads) x 64 KV positions, 16 warps,
# 3 stages, at head size 128 in 16-bit dtypes.  A sparse head at moderate
# lengths visits few KV tiles per query tile (about 18 at 32k
# vertical-slash), so twice the queries per program halves the per-program
# cost; a full head visits hundreds, and these tiles cost it 5% (32k causal
# 0.93 -> 0.98x Flex), which is why one launch (every head of the batch)
# takes them only on the promise.  H100 sweep, casakv / Flex, table tiles ->
# these (docs/benchmarks/sweeps/prefill-wide-h100.log): vertical-slash
# 16k-64k 0.99-1.04 -> 0.96-0.97, a-shape 0.98-0.99 -> 0.98; at 8k mixed
# and at 128k unstable (0.96-1.09 from run to run), hence the range.  Only
# the measured GQA group (4 query heads per KV head, Llama-3-8B) takes them.
WIDE_TILES = (256, 64, 16, 3)  # (rows, KV positions, warps, stages)
WIDE_SEQ = (16384, 65536)  # lo <= max_seq_len <= hi
WIDE_GROUPS = (4,)


def _wide(group: int, head_size: int, max_query_len: int, max_seq_len: int | None,
          dtype: torch.dtype, sparse_only: bool) -> bool:
    """True when a batch gets WIDE_TILES."""
    lo, hi = WIDE_SEQ
    return (sparse_only and max_seq_len is not None and lo <= max_seq_len <= hi
            and dtype in (torch.bfloat16, torch.float16) and not _interpreting()
            and max(triton.next_power_of_2(head_size), 16) == 128 and group in WIDE_GROUPS
            and max_query_len * group >= WIDE_TILES[0])


def plan_blocks(group: int, head_size: int, max_query_len: int,
                max_seq_len: int | None = None, dtype: torch.dtype = torch.bfloat16,
                sparse_only: bool = False) -> tuple[int, int]:
    """(block_q, block_n) for :func:`build_prefill_index` and
    :func:`sparse_paged_attention`.

    Rows per program ``BLOCK_M = block_q * group`` (rounded up to a power of
    two) and ``block_n`` come from the prefill config table of
    :mod:`.paged_attention` (16-bit dtypes; 128 x 128 at head size 128),
    with fewer rows when the batch's longest query is short; or from
    ``WIDE_TILES`` for ``sparse_only`` patterns (``PatternBatch.sparse_only``)
    when ``max_seq_len`` lies in ``WIDE_SEQ``.
    """
    if _wide(group, head_size, max_query_len, max_seq_len, dtype, sparse_only):
        return max(WIDE_TILES[0] // group, 1), WIDE_TILES[1]
    block_d = max(triton.next_power_of_2(head_size), 16)
    min_m = max(16, triton.next_power_of_2(group))
    cap, block_n, _, _ = PREFILL_CONFIGS.get(block_d, _FP32_CONFIG)
    want = triton.next_power_of_2(max(max_query_len, 1) * group)
    block_m = max(min_m, min(cap, want))
    block_q = max(block_m // group, 1)
    return block_q, block_n


@triton.jit
def _vert_words(vbits_row, offs_n, n_words, has_vert):
    """[BLOCK_N] int64: the ``vert_bits`` word of every column of the tile
    (zeros without a vertical column in this head)."""
    cw = offs_n >> 6
    if has_vert:
        vw = tl.load(vbits_row + cw, mask=cw < n_words, other=0)
    else:
        vw = tl.zeros(offs_n.shape, dtype=tl.int64)
    return vw


@triton.jit
def _allowed_tile(
    q_pos,  # [BLOCK_M] int32 absolute query positions
    offs_n,  # [BLOCK_N] int32 absolute KV positions
    is_full, sink, window,  # scalars
    vw,  # [BLOCK_N] int64 vertical words (_vert_words)
    has_slash,  # scalar: any slash offset in this head
    sbits_row, n_words,
    blocks_row, pblock, nqb, nkb, stride_b_q, stride_b_k,
    dist_w0,  # first slash word that can matter for this tile
    q_first,  # absolute position of the tile's first query token
    NW_DIST: tl.constexpr,
    HAS_BLOCKS: tl.constexpr,
    QB_SPAN: tl.constexpr,  # pattern-block rows per query tile (0: gather)
):
    dist = q_pos[:, None] - offs_n[None, :]  # [BLOCK_M, BLOCK_N]
    # Diagonal (k == q) is the window of 1; a full head an unbounded window.
    w_eff = tl.where(is_full, 1 << 30, tl.maximum(window, 1))
    ok = (dist < w_eff) | (offs_n[None, :] < sink)
    # Vertical columns: one word per column.
    vhit = ((vw >> (offs_n & 63).to(tl.int64)) & 1) != 0
    ok = ok | vhit[None, :]
    # Slash offsets: the words covering this tile's q - k range.
    if has_slash:
        any_slash = 0
        for j in tl.static_range(NW_DIST):
            w = dist_w0 + j
            any_slash = any_slash | tl.load(sbits_row + w, mask=w < n_words, other=0)
        if any_slash != 0:
            dw = dist >> 6
            sh = (dist & 63).to(tl.int64)
            for j in tl.static_range(NW_DIST):
                w = dist_w0 + j
                sw = tl.load(sbits_row + w, mask=w < n_words, other=0)
                ok = ok | ((dw == w) & (((sw >> sh) & 1) != 0))
    if HAS_BLOCKS:
        qb = tl.minimum(q_pos // pblock, nqb - 1)
        kb = tl.minimum(offs_n // pblock, nkb - 1)
        if QB_SPAN > 0:
            # The tile's real rows touch at most QB_SPAN pattern-block rows:
            # one 1-D gather of BLOCK_N bits per block row.
            qb0 = q_first // pblock
            for i in tl.static_range(QB_SPAN):
                qi = tl.minimum(qb0 + i, nqb - 1)
                row_bits = tl.load(blocks_row + qi * stride_b_q + kb * stride_b_k)
                ok = ok | ((qb == qi)[:, None] & (row_bits != 0)[None, :])
        else:  # tiny pattern blocks: per-element gather
            bits = tl.load(blocks_row + qb[:, None] * stride_b_q
                           + kb[None, :] * stride_b_k)
            ok = ok | (bits != 0)
    return ok & (dist >= 0)


@triton.jit
def _sparse_paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    lse_ptr,  # [num_tokens, num_heads] fp32 (unused unless WRITE_LSE)
    query_ptr,  # [num_tokens, num_heads, head_size]
    kv_cache_ptr,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    tile_idx_ptr,  # [R, H, NQT, MAXT] int32
    tile_count_ptr,  # [R, H, NQT] int32
    tile_nfull_ptr,  # [R, H, NQT] int32
    params_ptr,  # [R, H, 5] int32: full, sink, window, has_slash, has_vert
    sbits_ptr, vbits_ptr,  # [R, H, NW] int64
    blocks_ptr,  # [R, H, NQB, NKB] uint8 (unused unless HAS_BLOCKS)
    qk_scale,  # softmax scale * log2(e)
    num_kv_heads, num_q_tiles, max_tiles, n_words,
    pblock, nqb, nkb,
    stride_b_r, stride_b_h, stride_b_q, stride_b_k,
    stride_q_tok, stride_q_head, stride_q_d,
    stride_o_tok, stride_o_head, stride_o_d,
    stride_lse_tok, stride_lse_head,
    stride_bt_seq, stride_bt_blk,
    stride_c_blk, stride_c_head, stride_c_tok, stride_c_d,
    HEAD_SIZE: tl.constexpr,
    PAGE: tl.constexpr,  # tokens per KV block
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per program (index.block_q)
    BLOCK_M: tl.constexpr,  # pow2 >= BLOCK_Q * GROUP
    BLOCK_N: tl.constexpr,  # KV positions per tile (index.block_n)
    BLOCK_D: tl.constexpr,
    NW_DIST: tl.constexpr,
    HAS_BLOCKS: tl.constexpr,
    QB_SPAN: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    PAGE_LOADS: tl.constexpr,  # per-page K/V loads (_load_kv_tile)
    REVERSE_Q: tl.constexpr,  # launch the last (longest causal) query tiles first
    MASK_EARLY: tl.constexpr,  # load the vertical words before K/V
    PART_N: tl.constexpr,  # KV positions per partial step (divides BLOCK_N)
    PART_SKIP: tl.constexpr,  # skip partial steps past kv_end
):
    seq = tl.program_id(0)
    if REVERSE_Q:
        q_block = num_q_tiles - 1 - tl.program_id(1)
    else:
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

    q_first = ctx_len + q_tile_start
    kv_end = ctx_len + tl.minimum(q_tile_start + BLOCK_Q, q_len)  # q_hi + 1
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    head_off = kv_head.to(tl.int64) * stride_c_head

    rh = seq * num_kv_heads + kv_head
    is_full = tl.load(params_ptr + rh * 5) != 0
    sink = tl.load(params_ptr + rh * 5 + 1)
    window = tl.load(params_ptr + rh * 5 + 2)
    has_slash = tl.load(params_ptr + rh * 5 + 3) != 0
    has_vert = tl.load(params_ptr + rh * 5 + 4) != 0
    sbits_row = sbits_ptr + rh.to(tl.int64) * n_words
    vbits_row = vbits_ptr + rh.to(tl.int64) * n_words
    blocks_row = blocks_ptr + seq.to(tl.int64) * stride_b_r + kv_head * stride_b_h
    list_row = rh.to(tl.int64) * num_q_tiles + q_block
    count = tl.load(tile_count_ptr + list_row)
    idx_row = tile_idx_ptr + list_row * max_tiles

    # Full tiles: no element mask, no load masks.
    n_full = tl.load(tile_nfull_ptr + list_row)
    for i in range(0, n_full):
        n_start = tl.load(idx_row + i) * BLOCK_N
        k, v = _load_kv_tile(kv_cache_ptr, bt_row, head_off, n_start, kv_end,
                             stride_bt_blk, stride_c_blk, stride_c_tok,
                             stride_c_d, HEAD_SIZE, PAGE, BLOCK_N, BLOCK_D, False, PAGE_LOADS)
        s = _qk(q, k, FP32_DOT)
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, qk_scale,
                                              v.to(q.dtype), False, FP32_DOT)
    # Partial tiles, stored at the end of the row.
    NPS: tl.constexpr = BLOCK_N // PART_N
    for j in range((max_tiles - (count - n_full)) * NPS, max_tiles * NPS):
        n_start = tl.load(idx_row + j // NPS) * BLOCK_N + (j % NPS) * PART_N
        if (n_start < kv_end) | (PART_SKIP == 0):
            offs_n = n_start + tl.arange(0, PART_N)
            if MASK_EARLY:
                vw = _vert_words(vbits_row, offs_n, n_words, has_vert)
            k, v = _load_kv_tile(kv_cache_ptr, bt_row, head_off, n_start, kv_end,
                                 stride_bt_blk, stride_c_blk, stride_c_tok, stride_c_d,
                                 HEAD_SIZE, PAGE, PART_N, BLOCK_D, True, PAGE_LOADS)
            s = _qk(q, k, FP32_DOT)
            if not MASK_EARLY:
                vw = _vert_words(vbits_row, offs_n, n_words, has_vert)
            dist_w0 = tl.maximum(q_first - (n_start + PART_N - 1), 0) >> 6
            allowed = _allowed_tile(q_pos, offs_n, is_full, sink, window,
                                    vw, has_slash, sbits_row, n_words,
                                    blocks_row, pblock, nqb, nkb,
                                    stride_b_q, stride_b_k, dist_w0,
                                    q_first, NW_DIST, HAS_BLOCKS, QB_SPAN)
            s = tl.where(allowed, s, float("-inf"))
            acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, qk_scale,
                                                  v.to(q.dtype), True, FP32_DOT)

    _store_out(out_ptr, lse_ptr, acc, m_i, l_i, tok, head, row_mask, io_mask,
               stride_o_tok, stride_o_head, stride_o_d,
               stride_lse_tok, stride_lse_head, BLOCK_D, WRITE_LSE)


def sparse_paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_size], written in place
    patterns: PatternBatch,
    index: SparseIndex,
    max_query_len: int,
    max_seq_len: int,
    lse: torch.Tensor | None = None,  # [num_tokens, num_heads] fp32
    launch: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Causal paged attention restricted to ``patterns``; writes rows
    ``0 .. query_start_loc[-1] - 1`` of ``out`` (and ``lse``) and returns
    ``out``.

    ``index`` must come from :func:`build_prefill_index` with the same
    patterns, batch metadata and upper bounds, and ``(block_q, block_n)``
    from :func:`plan_blocks` (or any ``block_n`` that is a power of two
    >= 16, any ``block_q >= 1``).  No host synchronisation.
    ``launch``: (num_warps, num_stages) override (tuning).
    """
    num_tokens, num_heads, head_size = query.shape
    num_blocks, num_kv_heads, block_size, two_hs = kv_cache.shape
    assert two_hs == 2 * head_size, "kv_cache last dim must be 2*head_size"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of kv heads"
    assert out.shape[1:] == query.shape[1:] and out.shape[0] >= num_tokens
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.shape[0] == num_seqs + 1
    assert block_table.dim() == 2 and block_table.shape[0] >= num_seqs
    assert patterns.num_heads == num_kv_heads, "patterns are per KV head"
    assert patterns.num_requests >= num_seqs
    block_q, block_n = index.block_q, index.block_n
    assert block_n >= 16 and block_n & (block_n - 1) == 0, \
        "block_n must be a power of two >= 16 (tl.dot)"
    nqt = triton.cdiv(max(max_query_len, 0), block_q)
    maxt = triton.cdiv(max(max_seq_len, 0), block_n)
    assert index.tile_idx.shape == (num_seqs, num_kv_heads, nqt, maxt), \
        "index was built for another batch / block plan"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape[1] == num_heads
    if num_seqs == 0 or nqt == 0 or maxt == 0:
        return out
    group = num_heads // num_kv_heads
    block_d = max(triton.next_power_of_2(head_size), 16)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    fp32_dot = query.dtype == torch.float32 or (
        query.dtype == torch.bfloat16 and _interpreting())
    params = index.params if index.params is not None else head_params(patterns, num_seqs)
    if not MASK_KINDS:  # every head loads both bitmaps (the earlier kernel)
        params = params.clone()
        params[..., 3:] = 1
    has_blocks = patterns.blocks is not None
    if has_blocks:
        blocks = patterns.blocks
        if blocks.dtype == torch.bool:
            blocks = blocks.view(torch.uint8)
        b_strides = blocks.stride()
        nqb, nkb = blocks.shape[2], blocks.shape[3]
    else:
        blocks, b_strides, nqb, nkb = index.tile_full, (0, 0, 0, 0), 1, 1
    # Pattern-block rows a query tile's real rows can touch.
    qb_span = (block_q - 1) // int(patterns.block) + 2
    qb_span = qb_span if qb_span <= 4 else 0
    lse_arg = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    _, _, warps, stages = prefill_config(head_size, query.dtype)
    if (block_m, block_n) == WIDE_TILES[:2] and query.dtype != torch.float32 and not _interpreting():
        warps, stages = WIDE_TILES[2:]
    elif query.dtype == torch.float32 and block_m * block_n > 64 * 64:
        warps, stages = 8, 1  # fp32 tiles of a 16-bit plan: fit shared memory
    part_n = block_n
    if (PARTIAL_N is not None and 16 <= PARTIAL_N < block_n and block_n % PARTIAL_N == 0
            and PARTIAL_N % block_size == 0):  # keeps the per-page loads of the full tiles
        part_n = int(PARTIAL_N)
    if launch is not None:
        warps, stages = launch
    grid = (num_seqs, nqt, num_kv_heads)
    _sparse_paged_attention_kernel[grid](
        out, lse_arg, query, kv_cache, block_table, query_start_loc, seq_lens,
        index.tile_idx, index.tile_count, index.tile_nfull, params,
        index.slash_bits, index.vert_bits, blocks,
        scale * math.log2(math.e),
        num_kv_heads, nqt, maxt, index.slash_bits.shape[-1],
        int(patterns.block), nqb, nkb,
        b_strides[0], b_strides[1], b_strides[2], b_strides[3],
        query.stride(0), query.stride(1), query.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse_strides[0], lse_strides[1],
        block_table.stride(0), block_table.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3),
        HEAD_SIZE=head_size, PAGE=block_size, GROUP=group, BLOCK_Q=block_q,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        NW_DIST=words_for_range(block_q + block_n - 1),
        HAS_BLOCKS=has_blocks, QB_SPAN=qb_span,
        WRITE_LSE=lse is not None, FP32_DOT=fp32_dot,
        PAGE_LOADS=bool(PAGE_LOADS and block_size & (block_size - 1) == 0 and part_n % block_size == 0),
        REVERSE_Q=bool(REVERSE_Q), MASK_EARLY=bool(MASK_EARLY),
        PART_N=part_n, PART_SKIP=int(bool(PARTIAL_SKIP)),
        num_warps=warps, num_stages=stages,
    )
    return out
