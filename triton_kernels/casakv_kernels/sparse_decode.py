"""Block-sparse paged decode with split-KV ("flash-decoding") in Triton.

One query token per request attends to a per-(request, KV head) list of
selected cache blocks only.

Layout (vLLM V1 conventions, as in ``paged_attention.py``):
  * ``query``/``out``: [R, num_heads, head_size], one decode token per
    request; ``lse`` (optional): fp32 [R, num_heads], natural log.
  * ``kv_cache``: logical [num_blocks, num_kv_heads, block_size,
    2 * head_size], any strides; K is ``[..., :head_size]``, V the rest.
  * ``block_table[i, b]``: physical block of logical block ``b`` of request
    ``i``; ``seq_lens[i]``: KV length (the query sits at ``seq_len - 1``).
  * ``sel_blocks``: int32 [R, num_kv_heads, MAXSEL], LOGICAL block numbers
    (indices into the block-table row), ascending, each
    ``< cdiv(seq_len, block_size)``; only the first ``sel_count[i, h]``
    entries of a row are read.  Positions ``>= seq_len`` of the last
    (partial) block are masked.

Design:
  * Stage 1, grid ``(R, num_kv_heads, num_splits)``: program ``s`` owns the
    contiguous slice ``[s * per, min((s + 1) * per, count))`` of its row's
    selected list, ``per = cdiv(count, num_splits)`` (computed on device, so
    every row is balanced over the splits whatever its count).  The selected
    blocks of the slice are flattened into a stream of tokens that is walked
    in tiles of ``BLOCK_N`` tokens (a tile may span several blocks; any
    block_size works).  With physical block ids (``sel_physical``) the slice
    is the program's block table for ``_load_kv_tile``: one id per page
    (power-of-two block sizes), no block-table lookup.  The ``GROUP`` query
    heads of the KV head are the rows of one ``[BLOCK_M, D]`` query tile
    (``BLOCK_M = max(16, next_pow2(GROUP))``, the padding rows are zero and
    never stored), so each K/V tile is loaded once for the whole GQA group
    and both products are ``tl.dot`` calls.  Online softmax in base 2, fp32.
    The unnormalised accumulator, running max and sum of exponentials go to fp32 workspaces
    ``[max_batch, num_heads, max_splits, (D)]``.  With one split stage 1
    normalises and writes ``out``/``lse`` itself and stage 2 is skipped.
  * Stage 2, grid ``(R, num_heads)``: merges the splits (log-sum-exp
    rescaling) and writes ``out`` in the query dtype and ``lse``.
  * ``num_splits`` is a host-side decision from shapes only (R, KV heads,
    MAXSEL, block_size, SM count): enough programs to fill the GPU, but at
    least ``_MIN_TOKENS_PER_SPLIT`` tokens of the longest possible selection
    per split.  No ``.item()``, no allocation when a workspace is given, so
    the call can be captured in a CUDA graph.

A row with ``sel_count == 0`` attends to nothing: its output is 0 and its
lse ``-inf``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .online_softmax import online_softmax_update

from .paged_attention import _interpreting, _load_kv_tile
from .patterns import PatternBatch

_LN2 = 0.6931471805599453
# Tunables (host side).  Programs per SM to aim for, and the smallest slice of
# the longest selection worth a split of its own (H100 sweeps, graph-timed:
# a 10% selection of a 32k context, 204 blocks, is fastest in 66 splits of
# ~3 blocks, 11.6 us, vs 12.6 us in 51; fewer, longer splits leave SMs idle).
_PROGRAMS_PER_SM = 4
_MIN_TOKENS_PER_SPLIT = 48
_MAX_SPLITS = 128
# Launch the merge kernel as a programmatic dependent launch (Hopper and
# newer) when the split grid fits in one wave of _PROGRAMS_PER_SM per SM: the
# merge's launch then overlaps the split kernel instead of following it (H100,
# graph-timed, 10% of 32k at B=1: 11.3 -> 10.7 us).  With several waves the
# early merge programs take slots from the split programs (32k B=16: +3%),
# and triggering at the end of the split programs gained nothing.
MERGE_PDL = True


@triton.jit
def _outside_hole(t, lo, hi, skip_bits, BLOCK_SIZE: tl.constexpr):
    """Stream tokens ``t`` that are read: outside ``[lo, hi)``, and not the tokens ``hi + i``
    (``i < min(BLOCK_SIZE, 32)``) whose bit ``i`` of ``skip_bits`` is set (a compacted request's tail
    block, partly evicted)."""
    after = t - hi
    in_bits = (after >= 0) & (after < BLOCK_SIZE) & (after < 32)
    skipped = in_bits & (((skip_bits >> tl.minimum(tl.maximum(after, 0), 31)) & 1) != 0)
    return ((t < lo) | (t >= hi)) & ~skipped


@triton.jit
def _sparse_decode_split_kernel(
    out_ptr,  # [R, num_heads, head_size] (written only if SINGLE_SPLIT)
    lse_ptr,  # [R, num_heads] fp32 (written only if SINGLE_SPLIT and WRITE_LSE)
    ws_acc_ptr,  # [max_batch, num_heads, max_splits, head_size] fp32
    ws_m_ptr,  # [max_batch, num_heads, max_splits] fp32, base-2 max
    ws_l_ptr,  # [max_batch, num_heads, max_splits] fp32, sum of exp2
    query_ptr,  # [R, num_heads, head_size]
    kv_cache_ptr,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table_ptr,  # [R, max_blocks_per_seq] int32
    seq_lens_ptr,  # [R] int32
    sel_blocks_ptr,  # [R, num_kv_heads, MAXSEL] int32 logical block ids
    sel_count_ptr,  # [R, num_kv_heads] int32
    hole_ptr,  # [R, num_kv_heads, 3] int32 (read only if HAS_HOLE): lo, hi, skip bits after hi
    qk_scale,  # softmax scale * log2(e)
    num_splits,  # int (runtime: one compile serves every split count)
    stride_q_tok, stride_q_head, stride_q_d,
    stride_o_tok, stride_o_head, stride_o_d,
    stride_lse_tok, stride_lse_head,
    stride_bt_seq, stride_bt_blk,
    stride_c_blk, stride_c_head, stride_c_tok, stride_c_d,
    stride_sb_seq, stride_sb_head, stride_sb_idx,
    stride_sc_seq, stride_sc_head,
    stride_h_seq, stride_h_head,
    stride_wa_seq, stride_wa_head, stride_wa_split,
    stride_wm_seq, stride_wm_head,
    HEAD_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size (tokens)
    BLOCK_M: tl.constexpr,  # >= GROUP, >= 16, pow2
    BLOCK_N: tl.constexpr,  # tokens per tile
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_SIZE)
    SINGLE_SPLIT: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    PHYS_SEL: tl.constexpr,  # sel_blocks hold physical block ids
    PAGE_LOADS: tl.constexpr,  # PHYS_SEL: one id per page (see _load_kv_tile)
    PDL: tl.constexpr,  # the merge kernel is a programmatic dependent launch
    HAS_HOLE: tl.constexpr,  # skip the stream tokens [hole[0], hole[1]) of each (row, KV head), and
    # the token hole[1] + i where bit i of hole[2] is set (i < min(BLOCK_SIZE, 32))
):
    if PDL:  # the merge grid may launch now; it waits for this grid's end
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    count = tl.load(sel_count_ptr + seq * stride_sc_seq + kv_head * stride_sc_head)
    per = tl.cdiv(count, num_splits)
    sel_start = split * per
    sel_end = tl.minimum(sel_start + per, count)
    n_tok = tl.maximum(sel_end - sel_start, 0) * BLOCK_SIZE

    offs_m = tl.arange(0, BLOCK_M)
    row_mask = offs_m < GROUP
    head = kv_head * GROUP + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE
    q = tl.load(query_ptr + seq.to(tl.int64) * stride_q_tok
                + head[:, None] * stride_q_head + offs_d[None, :] * stride_q_d,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if FP32_DOT:
        q_dot = q.to(tl.float32)
    else:
        q_dot = q

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    sel_row = (sel_blocks_ptr + seq.to(tl.int64) * stride_sb_seq
               + kv_head * stride_sb_head)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    head_off = kv_head.to(tl.int64) * stride_c_head
    if PHYS_SEL:
        # Selections are ascending, so the sequence's partial last block can
        # only be a row's last entry: the slice holding it ends ``pad`` tokens
        # early.  Whole pages are loaded (in bounds) and the tail is masked
        # out of the scores and V afterwards, so no load waits for ``pad``.
        last_blk = (seq_len - 1) // BLOCK_SIZE
        last_phys = tl.load(bt_row + last_blk * stride_bt_blk)
        tail = tl.load(sel_row + (count - 1) * stride_sb_idx, mask=count > 0, other=-1)
        pad = tl.where((sel_end == count) & (tail == last_phys),
                       (last_blk + 1) * BLOCK_SIZE - seq_len, 0)
        kv_end = n_tok - pad
        slice_row = sel_row + sel_start.to(tl.int64) * stride_sb_idx
    if HAS_HOLE:
        hole_row = hole_ptr + seq.to(tl.int64) * stride_h_seq + kv_head * stride_h_head
        hole_lo = tl.load(hole_row) - sel_start * BLOCK_SIZE  # in this slice's token coordinates
        hole_hi = tl.load(hole_row + 1) - sel_start * BLOCK_SIZE
        hole_bits = tl.load(hole_row + 2)  # tokens skipped right after the hole

    for t0 in range(0, n_tok, BLOCK_N):
        if PHYS_SEL:  # the slice is this program's block table
            k, v = _load_kv_tile(kv_cache_ptr, slice_row, head_off, t0, n_tok,
                                 stride_sb_idx, stride_c_blk, stride_c_tok, stride_c_d,
                                 HEAD_SIZE, BLOCK_SIZE, BLOCK_N, BLOCK_D, True, PAGE_LOADS)
            valid = t0 + tl.arange(0, BLOCK_N) < kv_end
            if HAS_HOLE:
                valid = valid & _outside_hole(t0 + tl.arange(0, BLOCK_N), hole_lo, hole_hi, hole_bits, BLOCK_SIZE)
            v = tl.where(valid[:, None], v, 0.0)
        else:
            offs_t = t0 + tl.arange(0, BLOCK_N)
            t_mask = offs_t < n_tok
            lblk = tl.load(sel_row + (sel_start + offs_t // BLOCK_SIZE) * stride_sb_idx,
                           mask=t_mask, other=0)
            in_blk = offs_t % BLOCK_SIZE
            valid = t_mask & (lblk * BLOCK_SIZE + in_blk < seq_len)
            if HAS_HOLE:
                valid = valid & _outside_hole(offs_t, hole_lo, hole_hi, hole_bits, BLOCK_SIZE)
            phys = tl.load(bt_row + lblk * stride_bt_blk, mask=valid, other=0).to(tl.int64)
            tok_off = phys * stride_c_blk + head_off + in_blk.to(tl.int64) * stride_c_tok
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(kv_cache_ptr + tok_off[:, None] + offs_d[None, :] * stride_c_d,
                        mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(kv_cache_ptr + tok_off[:, None]
                        + (HEAD_SIZE + offs_d[None, :]) * stride_c_d,
                        mask=kv_mask, other=0.0)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        if FP32_DOT:
            s = tl.dot(q_dot, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q_dot, tl.trans(k))
        s = tl.where(valid[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, qk_scale, v,
                                              True, FP32_DOT)

    if SINGLE_SPLIT:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_o_tok
                 + head[:, None] * stride_o_head + offs_d[None, :] * stride_o_d,
                 o.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])
        if WRITE_LSE:
            lse = tl.where(l_i == 0.0, float("-inf"),
                           (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
            tl.store(lse_ptr + seq.to(tl.int64) * stride_lse_tok
                     + head * stride_lse_head, lse, mask=row_mask)
    else:
        ws_row = seq.to(tl.int64) * stride_wa_seq + split * stride_wa_split
        tl.store(ws_acc_ptr + ws_row + head[:, None] * stride_wa_head + offs_d[None, :],
                 acc, mask=row_mask[:, None] & d_mask[None, :])
        wm = seq.to(tl.int64) * stride_wm_seq + head * stride_wm_head + split
        tl.store(ws_m_ptr + wm, m_i, mask=row_mask)
        tl.store(ws_l_ptr + wm, l_i, mask=row_mask)


@triton.jit
def _sparse_decode_merge_kernel(
    out_ptr,  # [R, num_heads, head_size]
    lse_ptr,  # [R, num_heads] fp32 (unused unless WRITE_LSE)
    ws_acc_ptr, ws_m_ptr, ws_l_ptr,
    num_splits,
    stride_o_tok, stride_o_head, stride_o_d,
    stride_lse_tok, stride_lse_head,
    stride_wa_seq, stride_wa_head, stride_wa_split,
    stride_wm_seq, stride_wm_head,
    HEAD_SIZE: tl.constexpr,
    BLOCK_S: tl.constexpr,  # >= num_splits, pow2
    BLOCK_D: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    PDL: tl.constexpr,  # launched early (programmatic dependent launch)
):
    if PDL:  # wait for the split grid to finish and its stores to land
        tl.extra.cuda.gdc_wait()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE
    wm = seq * stride_wm_seq + head * stride_wm_head + offs_s
    m = tl.load(ws_m_ptr + wm, mask=s_mask, other=float("-inf"))
    l = tl.load(ws_l_ptr + wm, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_safe)  # 0 for empty splits (m = -inf)
    w = tl.where(s_mask, w, 0.0)
    l_tot = tl.sum(l * w, axis=0)
    acc = tl.load(ws_acc_ptr + seq * stride_wa_seq + head * stride_wa_head
                  + offs_s[:, None] * stride_wa_split + offs_d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0)
    l_safe = tl.where(l_tot == 0.0, 1.0, l_tot)
    o = o / l_safe
    tl.store(out_ptr + seq * stride_o_tok + head * stride_o_head + offs_d * stride_o_d,
             o.to(out_ptr.dtype.element_ty), mask=d_mask)
    if WRITE_LSE:
        lse = tl.where(l_tot == 0.0, float("-inf"),
                       (m_safe + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(lse_ptr + seq * stride_lse_tok + head * stride_lse_head, lse)


@dataclass
class SparseDecodeWorkspace:
    """Preallocated fp32 split workspaces (so a CUDA graph captures no
    allocation).  ``acc``: [max_batch, num_heads, max_splits, head_size];
    ``m``/``l``: [max_batch, num_heads, max_splits]."""

    acc: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor  # noqa: E741

    @classmethod
    def allocate(cls, max_batch: int, num_heads: int, head_size: int,
                 max_splits: int = _MAX_SPLITS, device="cuda") -> "SparseDecodeWorkspace":
        max_splits = max(1, int(max_splits))
        return cls(
            acc=torch.empty(max_batch, num_heads, max_splits, head_size,
                            dtype=torch.float32, device=device),
            m=torch.empty(max_batch, num_heads, max_splits, dtype=torch.float32,
                          device=device),
            l=torch.empty(max_batch, num_heads, max_splits, dtype=torch.float32,
                          device=device),
        )

    @property
    def max_batch(self) -> int:
        return self.acc.shape[0]

    @property
    def max_splits(self) -> int:
        return self.acc.shape[2]


@functools.lru_cache(maxsize=None)
def _pdl_supported(device_index: int | None) -> bool:
    if _interpreting() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(
        device_index if device_index is not None else torch.cuda.current_device()
    ).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """SMs of ``device`` (132, an H100's count, off CUDA: the interpreter's stand-in)."""
    return _num_sms(device.index) if device.type == "cuda" else 132


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_sel: int,
                      block_size: int, num_sms: int = 132,
                      max_splits: int = _MAX_SPLITS) -> int:
    """Splits per (request, KV head): as many programs as fit in one wave of
    ``_PROGRAMS_PER_SM * num_sms``, but keep at least
    ``_MIN_TOKENS_PER_SPLIT`` tokens of the longest possible selection
    (``max_sel`` blocks) per split.  Host ints only.

    One wave, not the fewest splits that fill it: a grid a little past it runs
    a second, nearly empty wave (H100, graph-timed, 4x-compacted 128k at
    B=16, 128 (request, head) pairs: 4 splits 0.723 ms, 5 splits 0.914 ms, 6
    0.824 ms; ``scripts/compacted_split_sweep.py``)."""
    base = max(1, num_seqs * num_kv_heads)
    want = max(1, (_PROGRAMS_PER_SM * num_sms) // base)
    useful = max(1, (max_sel * block_size) // _MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, useful, max_splits, _MAX_SPLITS))


def _pick_tiles(group: int, head_size: int, block_size: int):
    block_d = max(triton.next_power_of_2(head_size), 16)
    block_m = max(16, triton.next_power_of_2(group))
    block_n = 64 if block_d <= 64 else 32
    block_n = max(block_n, 16)
    return block_m, block_n, block_d


def sparse_paged_decode(
    query: torch.Tensor,  # [R, num_heads, head_size]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table: torch.Tensor,  # [R, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [R] int32
    sel_blocks: torch.Tensor,  # [R, num_kv_heads, MAXSEL] int32
    sel_count: torch.Tensor,  # [R, num_kv_heads] int32
    scale: float,
    out: torch.Tensor,  # [R, num_heads, head_size], written in place
    lse: torch.Tensor | None = None,  # [R, num_heads] fp32
    workspace: SparseDecodeWorkspace | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    sel_physical: bool = False,
    pdl: bool | None = None,
    hole: torch.Tensor | None = None,  # [R, num_kv_heads, 3] int32
) -> torch.Tensor:
    """Decode attention of ``query`` over the selected blocks only; writes
    ``out`` (and ``lse``, natural log) rows ``0 .. R-1`` and returns ``out``.

    ``num_splits`` overrides the shape-based heuristic (tests, tuning); it
    is clamped to ``workspace.max_splits`` when a workspace is given.
    ``block_n`` / ``num_warps`` / ``num_stages``: tuning knobs (defaults from
    an H100 sweep at D=128 bf16: BLOCK_N 32, 4 warps, 3 stages).
    ``sel_physical``: ``sel_blocks`` already holds physical block ids
    (:func:`physical_selection`), which saves the kernel one dependent load
    per tile.  ``pdl``: launch the merge as a programmatic dependent launch
    (default: ``MERGE_PDL`` on Hopper and newer, for one-wave split grids).
    ``hole``: per (row, KV head) ``(lo, hi, skip_bits)``: the range ``[lo, hi)``
    of the row's selected token stream (the tokens of its selected blocks, in
    order, counted from 0) is not attended, nor the token ``hi + i`` where bit
    ``i`` of ``skip_bits`` is set (``i < min(block_size, 32)``): a compacted
    request's empty slots and the evicted tokens of its first tail block
    (``casakv_vllm.compress``).  CUDA-graph capturable when ``workspace`` is
    given.
    """
    num_seqs, num_heads, head_size = query.shape
    num_blocks, num_kv_heads, block_size, two_hs = kv_cache.shape
    assert two_hs == 2 * head_size, "kv_cache last dim must be 2*head_size"
    assert num_heads % num_kv_heads == 0
    assert seq_lens.shape[0] == num_seqs and block_table.shape[0] >= num_seqs
    assert sel_blocks.dim() == 3 and sel_blocks.shape[:2] == (num_seqs, num_kv_heads)
    assert sel_count.shape == (num_seqs, num_kv_heads)
    assert out.shape[1:] == query.shape[1:] and out.shape[0] >= num_seqs
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape[1] == num_heads
    if hole is not None:
        assert hole.dtype == torch.int32 and hole.shape == (num_seqs, num_kv_heads, 3) and hole.stride(2) == 1
    if num_seqs == 0:
        return out
    max_sel = sel_blocks.shape[2]
    group = num_heads // num_kv_heads
    block_m, bn, block_d = _pick_tiles(group, head_size, block_size)
    if block_n is not None:
        bn = block_n

    dev = query.device
    sms = _num_sms(dev.index) if dev.type == "cuda" else 132
    if num_splits is None:
        cap = workspace.max_splits if workspace is not None else _MAX_SPLITS
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_sel,
                                       block_size, sms, cap)
    num_splits = max(1, int(num_splits))
    if workspace is not None:
        num_splits = min(num_splits, workspace.max_splits)
    single = num_splits == 1
    if workspace is None and not single:
        workspace = SparseDecodeWorkspace.allocate(num_seqs, num_heads, head_size,
                                                   num_splits, query.device)
    if workspace is not None:
        assert workspace.max_batch >= num_seqs, "workspace too small (batch)"
        assert workspace.acc.shape[1] == num_heads and workspace.acc.shape[3] == head_size
        ws_acc, ws_m, ws_l = workspace.acc, workspace.m, workspace.l
        assert ws_acc.stride(3) == 1 and ws_m.stride(2) == 1 and ws_l.stride() == ws_m.stride()
        wa_strides = (ws_acc.stride(0), ws_acc.stride(1), ws_acc.stride(2))
        wm_strides = (ws_m.stride(0), ws_m.stride(1))
    else:  # single split: workspaces unused
        ws_acc = ws_m = ws_l = out
        wa_strides, wm_strides = (0, 0, 0), (0, 0)

    fp32_dot = query.dtype == torch.float32 or (
        query.dtype == torch.bfloat16 and _interpreting())
    lse_arg = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    o_strides = (out.stride(0), out.stride(1), out.stride(2))
    if pdl is None:
        pdl = MERGE_PDL and num_seqs * num_kv_heads * num_splits <= _PROGRAMS_PER_SM * sms
    pdl = bool(pdl) and not single and query.is_cuda and _pdl_supported(query.device.index)

    _sparse_decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, lse_arg, ws_acc, ws_m, ws_l,
        query, kv_cache, block_table, seq_lens, sel_blocks, sel_count,
        hole if hole is not None else sel_count,
        scale * math.log2(math.e), num_splits,
        query.stride(0), query.stride(1), query.stride(2),
        *o_strides, *lse_strides,
        block_table.stride(0), block_table.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        sel_blocks.stride(0), sel_blocks.stride(1), sel_blocks.stride(2),
        sel_count.stride(0), sel_count.stride(1),
        *((hole.stride(0), hole.stride(1)) if hole is not None else (0, 0)),
        *wa_strides, *wm_strides,
        HEAD_SIZE=head_size, GROUP=group, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_D=block_d,
        SINGLE_SPLIT=single, WRITE_LSE=lse is not None, FP32_DOT=fp32_dot,
        PHYS_SEL=bool(sel_physical), PDL=pdl, HAS_HOLE=hole is not None,
        PAGE_LOADS=bool(block_size & (block_size - 1) == 0 and bn % block_size == 0),
        num_warps=num_warps, num_stages=num_stages,
    )
    pdl_kw = {"launch_pdl": True} if pdl else {}
    if not single:
        _sparse_decode_merge_kernel[(num_seqs, num_heads)](
            out, lse_arg, ws_acc, ws_m, ws_l, num_splits,
            *o_strides, *lse_strides, *wa_strides, *wm_strides,
            HEAD_SIZE=head_size,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
            WRITE_LSE=lse is not None, PDL=pdl,
            num_warps=4 if block_d >= 128 else 2, **pdl_kw,
        )
    return out


# --------------------------------------------------------------------------
# Selection builders (torch, on device, no host sync)
# --------------------------------------------------------------------------


def _sel_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, H, NB] bool -> (sel_blocks int32 [R, H, NB] ascending selected
    block ids first, entries past the count are 0; sel_count int32 [R, H])."""
    nb = mask.shape[-1]
    count = mask.sum(dim=-1, dtype=torch.int32)
    # Stable sort of "not selected" flags puts the selected ids first, in order.
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)
    idx = torch.arange(nb, device=mask.device)
    sel = torch.where(idx < count[..., None], order, 0).to(torch.int32)
    return sel, count


def physical_selection(sel_blocks: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Logical block ids ``sel_blocks`` [R, Hkv, MAXSEL] -> physical ids
    through ``block_table`` rows ``0 .. R-1`` (int32, same shape; entries
    past a row's count map to that row's block 0 and are never read).  For
    ``sparse_paged_decode(..., sel_physical=True)``; one gather per batch
    serves every layer.  On device, no host sync."""
    R, H, S = sel_blocks.shape
    idx = sel_blocks.reshape(R, H * S).long().clamp(min=0, max=block_table.shape[1] - 1)
    return torch.gather(block_table[:R].long(), 1, idx).view(R, H, S).to(torch.int32)


def _block_counts(seq_lens: torch.Tensor, block_size: int, max_blocks: int,
                  num_kv_heads: int) -> torch.Tensor:
    """sel_count int32 [R, Hkv]: every block of each request (no host sync)."""
    nblk = torch.div(seq_lens.to(torch.int32) + (block_size - 1), block_size,
                     rounding_mode="floor").clamp(max=max_blocks)
    return nblk.view(-1, 1).expand(seq_lens.shape[0], num_kv_heads).contiguous().to(torch.int32)


def dense_selection(seq_lens: torch.Tensor, block_size: int, max_blocks: int,
                    num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All blocks of every request: (sel_blocks [R, Hkv, max_blocks],
    sel_count [R, Hkv]), int32 on ``seq_lens``' device, no host sync."""
    num_seqs = seq_lens.shape[0]
    sel = torch.arange(max_blocks, dtype=torch.int32, device=seq_lens.device)
    sel = sel.view(1, 1, max_blocks).expand(num_seqs, num_kv_heads, max_blocks).contiguous()
    return sel, _block_counts(seq_lens, block_size, max_blocks, num_kv_heads)


def dense_physical_selection(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                             num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All blocks of every request as physical ids, for
    ``sparse_paged_decode(..., sel_physical=True)``: (the block-table rows
    viewed as [R, Hkv, max_blocks] with a stride-0 head dim, no copy;
    sel_count int32 [R, Hkv]).  No host sync."""
    num_seqs, max_blocks = seq_lens.shape[0], block_table.shape[1]
    sel = block_table[:num_seqs].unsqueeze(1).expand(num_seqs, num_kv_heads, max_blocks)
    return sel, _block_counts(seq_lens, block_size, max_blocks, num_kv_heads)


def selection_mask_from_patterns(patterns: PatternBatch, seq_lens: torch.Tensor,
                                 block_size: int, max_blocks: int) -> torch.Tensor:
    """[R, Hkv, max_blocks] bool: block ``b`` holds a position allowed for the
    query at ``seq_len - 1`` (``patterns.py`` semantics).  Torch, no sync."""
    dev = patterns.full.device
    R, H = patterns.num_requests, patterns.num_heads
    seq = seq_lens.to(dev).long().view(R, 1, 1)
    q = seq - 1  # [R, 1, 1]
    b = torch.arange(max_blocks, device=dev).view(1, 1, max_blocks)
    start = b * block_size  # first position of block b
    last = torch.minimum(start + block_size, seq) - 1  # last position <= q
    exists = start < seq  # [R, 1, NB]

    mask = (start <= q) & (q <= last)  # the diagonal
    mask = mask | patterns.full.view(R, H, 1)
    mask = mask | (start < patterns.sink.long().view(R, H, 1))
    # window: some k in [start, last] with q - k < w  <=>  last > q - w
    mask = mask | (last > q - patterns.window.long().view(R, H, 1))

    # slash / vertical: one position each -> scatter its block (dump column NB).
    pts = []
    off = patterns.slash.long()
    k = q - off
    pts.append(torch.where((off >= 0) & (k >= 0), k, -1))
    col = patterns.vertical.long()
    pts.append(torch.where((col >= 0) & (col <= q), col, -1))
    pos = torch.cat(pts, dim=-1)  # [R, H, S + V]
    blk = torch.where(pos >= 0, torch.div(pos, block_size, rounding_mode="floor"),
                      max_blocks).clamp(max=max_blocks)
    hit = torch.zeros(R, H, max_blocks + 1, dtype=torch.bool, device=dev)
    hit.scatter_(2, blk, True)
    mask = mask | hit[..., :max_blocks]

    if patterns.blocks is not None:
        P = patterns.block
        nqb, nkb = patterns.blocks.shape[2], patterns.blocks.shape[3]
        qb = torch.div(q.view(R), P, rounding_mode="floor").clamp(min=0, max=nqb - 1)
        row = patterns.blocks[torch.arange(R, device=dev), :, qb]  # [R, H, NKB]
        # KV block b overlaps pattern blocks kb_lo..kb_hi (clamped like the
        # reference); any of them set <=> prefix-count difference > 0.
        cs = torch.nn.functional.pad(row.to(torch.int32).cumsum(-1), (1, 0))
        kb_lo = torch.div(start, P, rounding_mode="floor").clamp(max=nkb - 1)
        kb_hi = torch.div(last.clamp(min=0), P, rounding_mode="floor").clamp(max=nkb - 1)
        kb_lo = kb_lo.expand(R, H, max_blocks)
        kb_hi = kb_hi.expand(R, H, max_blocks)
        anyb = (cs.gather(2, kb_hi + 1) - cs.gather(2, kb_lo)) > 0
        mask = mask | anyb
    return mask & exists


def selection_from_patterns(patterns: PatternBatch, seq_lens: torch.Tensor,
                            block_size: int, max_blocks: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sel_blocks [R, Hkv, max_blocks], sel_count [R, Hkv]) int32: the
    blocks holding any position the decode query (at ``seq_len - 1``) may
    attend to under ``patterns``.  On device, no host sync."""
    return _sel_from_mask(selection_mask_from_patterns(patterns, seq_lens,
                                                       block_size, max_blocks))
