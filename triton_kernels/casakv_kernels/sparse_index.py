"""GPU-side tile index for sparse (pattern-restricted) paged prefill.

For every request ``r``, KV head ``h`` and tile ``qt`` of ``block_q`` query
tokens, :func:`build_prefill_index` lists the KV tiles (``block_n``
positions each) that hold at least one allowed ``(q, k)`` pair (see
:mod:`.patterns`), split into the tiles where *every* pair is allowed
(listed first, ascending) and the partial ones (listed from the end of the
row), so the attention kernel runs the full tiles in a loop with no element
mask and no load masks, and the partial ones in a second, masked loop.

Everything runs on the device with no host synchronisation (the tensor
shapes only depend on the host ints ``max_query_len`` / ``max_seq_len``), so
it can be captured in a CUDA graph.

Two small Triton kernels:

1. ``_pattern_bits_kernel`` (grid ``(R, H)``) turns the unordered ``slash``
   and ``vertical`` lists into 64-bit-word bitmaps over offsets ``q - k`` and
   columns ``k`` (``[R, H, cdiv(max_seq_len, 64)]`` int64, built with
   ``atomic_or``).  Entries ``< 0`` (unused) or ``>= max_seq_len`` (never
   reachable) are dropped.  The bitmaps make "is any/every position of a
   range marked" an O(1)-per-word question, independent of the list lengths,
   and the attention kernel reuses them for its element-wise mask.
2. ``_tile_index_kernel`` (grid ``(R, NQT, H)``) walks the causal KV tiles
   ``0 .. q_hi // block_n`` of its query tile in chunks of ``BLOCK_T`` tiles,
   decides membership arithmetically per pattern kind, and compacts the
   member tiles with two prefix sums (full tiles forward from the front,
   partial tiles backward from the end).

Membership of KV tile ``t`` (positions ``k_lo = t*block_n .. k_end``) for
the query tile's real rows ``q_lo .. q_hi`` (``k_hi = min(k_end, q_hi)``):

* full head: always (every causal tile);
* sink ``s``: ``k_lo < s``;
* window ``w`` (with the diagonal, i.e. ``w_eff = max(w, 1)``):
  ``q_lo - k_hi < w_eff``;
* slash: any offset in ``[max(q_lo - k_hi, 0), q_hi - k_lo]``;
* vertical: any column in ``[k_lo, k_hi]``;
* blocks: any set pattern block whose rectangle, intersected with the
  tile pair, contains a causal pair (``k_min <= q_max``); pattern block
  indices are clamped to the grid like :func:`.patterns.pattern_mask`.

``tile_full`` is 1 only for tiles that are causally complete
(``k_end <= q_lo``) and covered by: a full head; sink + window + diagonal
+ vertical columns together (exact: the uncovered columns of the last row
``[max(s, k_lo), min(q_hi - w_eff, k_end)]`` must all be vertical); or
pattern blocks that are all set.  Slash lines never make a tile full, and
blocks are not combined with the other kinds, so it is conservative (0
where 1 would be allowed) for those mixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .patterns import PatternBatch, pattern_mask

WORD_BITS = 64


@dataclass
class SparseIndex:
    """Per (request, kv head, query tile) list of KV tiles to visit.

    Attributes:
        tile_idx: ``[R, H, NQT, MAXT]`` int32, partitioned: the first
            ``tile_nfull`` entries are the full tiles (every pair allowed)
            in ascending order, the last ``tile_count - tile_nfull`` entries
            the partial tiles in descending order; the slots between are -1.
        tile_count: ``[R, H, NQT]`` int32, tiles listed (full + partial).
        tile_full: ``[R, H, NQT, MAXT]`` int8; 1 at the full tiles' slots.
        tile_nfull: ``[R, H, NQT]`` int32, full tiles listed.
        slash_bits / vert_bits: ``[R, H, NW]`` int64 bitmaps of the slash
            offsets / vertical columns (bit ``x % 64`` of word ``x // 64``),
            ``NW = cdiv(max_seq_len, 64)``; used by the attention kernel.
        block_q / block_n: query tokens / KV positions per tile.
        params: ``[R, H, 5]`` int32 per-head scalars read by both kernels,
            from :func:`head_params`; ``None`` for the torch reference.
    """

    tile_idx: torch.Tensor
    tile_count: torch.Tensor
    tile_full: torch.Tensor
    slash_bits: torch.Tensor
    vert_bits: torch.Tensor
    block_q: int
    block_n: int
    tile_nfull: torch.Tensor
    params: torch.Tensor | None = None

    @property
    def num_q_tiles(self) -> int:
        return self.tile_idx.shape[2]

    @property
    def max_tiles(self) -> int:
        return self.tile_idx.shape[3]


def words_for_range(length: int) -> int:
    """Max number of 64-bit words a range of ``length`` consecutive bits spans."""
    return (max(length, 1) - 1) // WORD_BITS + 2


def head_params(patterns: PatternBatch, num_seqs: int) -> torch.Tensor:
    """``[num_seqs, H, 5]`` int32, contiguous: (full, sink, window,
    has_slash, has_vert) per head; the last two are 1 when the head lists
    any slash offset / vertical column (on device, no sync), so the attention
    kernel skips a kind's bitmap loads for heads where it is 0."""
    return torch.stack([patterns.full[:num_seqs].to(torch.int32),
                        patterns.sink[:num_seqs].to(torch.int32),
                        patterns.window[:num_seqs].to(torch.int32),
                        (patterns.slash[:num_seqs] >= 0).any(-1).to(torch.int32),
                        (patterns.vertical[:num_seqs] >= 0).any(-1).to(torch.int32)],
                       dim=-1).contiguous()


@triton.jit
def _pattern_bits_kernel(
    slash_ptr, vert_ptr,  # [R, H, S] / [R, H, V] int32
    sbits_ptr, vbits_ptr,  # [R, H, NW] int64, zero-initialised
    num_slash, num_vert, num_heads, n_words,
    stride_s_r, stride_s_h, stride_s_e,
    stride_v_r, stride_v_h, stride_v_e,
    BLOCK_E: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    row = (r * num_heads + h).to(tl.int64) * n_words
    limit = n_words * 64
    offs = tl.arange(0, BLOCK_E)
    one = tl.full([BLOCK_E], 1, tl.int64)
    s_row = slash_ptr + r.to(tl.int64) * stride_s_r + h * stride_s_h
    for e0 in range(0, num_slash, BLOCK_E):
        e = e0 + offs
        d = tl.load(s_row + e * stride_s_e, mask=e < num_slash, other=-1)
        ok = (d >= 0) & (d < limit)
        d = tl.where(ok, d, 0)
        tl.atomic_or(sbits_ptr + row + (d >> 6), one << (d & 63).to(tl.int64),
                     mask=ok)
    v_row = vert_ptr + r.to(tl.int64) * stride_v_r + h * stride_v_h
    for e0 in range(0, num_vert, BLOCK_E):
        e = e0 + offs
        c = tl.load(v_row + e * stride_v_e, mask=e < num_vert, other=-1)
        ok = (c >= 0) & (c < limit)
        c = tl.where(ok, c, 0)
        tl.atomic_or(vbits_ptr + row + (c >> 6), one << (c & 63).to(tl.int64),
                     mask=ok)


@triton.jit
def _range_mask(a, b, w):
    """int64 mask of the bits of word ``w`` inside ``[a, b]`` and whether it
    is non-empty (a, b, w: same-shape int tensors)."""
    lo = a - w * 64
    hi = b - w * 64
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, 63)
    nonempty = lo <= hi
    lo = tl.minimum(lo, 63).to(tl.int64)
    hi = tl.maximum(hi, 0).to(tl.int64)
    # (2 << 63) wraps to 0, so hi = 63 gives all ones.
    m = ((tl.full(lo.shape, 2, tl.int64) << hi) - 1) & (
        tl.full(lo.shape, -1, tl.int64) << lo)
    return m, nonempty


@triton.jit
def _bits_any(row_ptr, a, b, n_words, NW: tl.constexpr):
    """Per element: is any bit of ``[a, b]`` set (a >= 0; a > b = empty)."""
    res = a < 0  # all False
    w0 = a >> 6
    for j in tl.static_range(NW):
        w = w0 + j
        m, nonempty = _range_mask(a, b, w)
        valid = nonempty & (w < n_words)
        word = tl.load(row_ptr + w, mask=valid, other=0)
        res = res | (valid & ((word & m) != 0))
    return res


@triton.jit
def _bits_all(row_ptr, a, b, n_words, NW: tl.constexpr):
    """Per element: is every bit of ``[a, b]`` set (empty range: True)."""
    res = a == a  # all True
    w0 = tl.maximum(a, 0) >> 6
    for j in tl.static_range(NW):
        w = w0 + j
        m, nonempty = _range_mask(a, b, w)
        valid = nonempty & (a <= b)
        word = tl.load(row_ptr + w, mask=valid & (w < n_words), other=0)
        res = res & ((~valid) | ((word & m) == m))
    return res


@triton.jit
def _tile_index_kernel(
    tile_idx_ptr,  # [R, H, NQT, MAXT] int32
    tile_count_ptr,  # [R, H, NQT] int32
    tile_full_ptr,  # [R, H, NQT, MAXT] int8
    tile_nfull_ptr,  # [R, H, NQT] int32
    params_ptr,  # [R, H, 5] int32: full, sink, window, has_slash, has_vert
    sbits_ptr, vbits_ptr,  # [R, H, NW] int64
    blocks_ptr,  # [R, H, NQB, NKB] uint8 (unused unless HAS_BLOCKS)
    query_start_loc_ptr, seq_lens_ptr,
    num_heads, num_q_tiles, max_tiles, n_words,
    pblock, nqb, nkb,
    stride_b_r, stride_b_h, stride_b_q, stride_b_k,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NW_COL: tl.constexpr,  # words spanned by BLOCK_N consecutive bits
    NW_DIST: tl.constexpr,  # words spanned by BLOCK_Q + BLOCK_N - 1 bits
    HAS_BLOCKS: tl.constexpr,
):
    r = tl.program_id(0)
    qt = tl.program_id(1)
    h = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + r)
    q_len = tl.load(query_start_loc_ptr + r + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + r)
    ctx = seq_len - q_len
    q_tile_start = qt * BLOCK_Q
    q_lo = ctx + q_tile_start
    q_hi = ctx + tl.minimum(q_tile_start + BLOCK_Q, q_len) - 1
    n_tiles = tl.where(q_tile_start < q_len, q_hi // BLOCK_N + 1, 0)

    rh = r * num_heads + h
    is_full = tl.load(params_ptr + rh * 5) != 0
    sink = tl.load(params_ptr + rh * 5 + 1)
    # The diagonal is a window of 1; a full head is an unbounded window.
    w_eff = tl.maximum(tl.load(params_ptr + rh * 5 + 2), 1)
    w_eff = tl.where(is_full, 1 << 30, w_eff)
    sbits_row = sbits_ptr + rh.to(tl.int64) * n_words
    vbits_row = vbits_ptr + rh.to(tl.int64) * n_words
    out_row = (rh.to(tl.int64) * num_q_tiles + qt)
    idx_row = tile_idx_ptr + out_row * max_tiles
    full_row = tile_full_ptr + out_row * max_tiles
    blocks_row = blocks_ptr + r.to(tl.int64) * stride_b_r + h * stride_b_h

    n_full = n_tiles * 0
    n_part = n_tiles * 0
    for c0 in range(0, n_tiles, BLOCK_T):
        t = c0 + tl.arange(0, BLOCK_T)
        in_range = t < n_tiles
        k_lo = t * BLOCK_N
        k_end = k_lo + BLOCK_N - 1
        k_hi = tl.minimum(k_end, q_hi)
        member = (k_lo < sink) | (q_lo - k_hi < w_eff)
        member = member | _bits_any(vbits_row, k_lo, k_hi, n_words, NW_COL)
        member = member | _bits_any(sbits_row, tl.maximum(q_lo - k_hi, 0),
                                    q_hi - k_lo, n_words, NW_DIST)
        complete = k_end <= q_lo  # every column causal for every real row
        gap_a = tl.maximum(k_lo, sink)
        gap_b = tl.minimum(k_end, q_hi - w_eff)
        covered = _bits_all(vbits_row, gap_a, gap_b, n_words, NW_COL)
        full = complete & covered
        if HAS_BLOCKS:
            b_member = t < 0
            b_all = t >= 0
            kb0 = k_lo // pblock
            for qb in range(q_lo // pblock, q_hi // pblock + 1):
                qa = tl.maximum(qb * pblock, q_lo)
                qz = tl.minimum(qb * pblock + pblock - 1, q_hi)
                q_row = blocks_row + tl.minimum(qb, nqb - 1) * stride_b_q
                for j in range(0, (BLOCK_N - 1) // pblock + 2):
                    kb = kb0 + j
                    ka = tl.maximum(kb * pblock, k_lo)
                    kz = kb * pblock + pblock - 1
                    in_tile = in_range & (ka <= tl.minimum(kz, k_end))
                    bit = tl.load(q_row + tl.minimum(kb, nkb - 1) * stride_b_k,
                                  mask=in_tile, other=0) != 0
                    b_member = b_member | (
                        bit & in_tile & (ka <= tl.minimum(kz, k_hi)) & (ka <= qz))
                    b_all = b_all & (bit | ~in_tile)
            member = member | b_member
            full = full | (complete & b_all)
        member = member & in_range
        # Full tiles from the front, partial ones from the back of the row.
        fm = member & full
        pm = member & ~full
        f32 = fm.to(tl.int32)
        p32 = pm.to(tl.int32)
        fpos = n_full + tl.cumsum(f32, axis=0) - 1
        ppos = max_tiles - n_part - tl.cumsum(p32, axis=0)
        tl.store(idx_row + fpos, t, mask=fm)
        tl.store(full_row + fpos, f32.to(tl.int8), mask=fm)
        tl.store(idx_row + ppos, t, mask=pm)
        n_full += tl.sum(f32, axis=0)
        n_part += tl.sum(p32, axis=0)
    tl.store(tile_count_ptr + out_row, n_full + n_part)
    tl.store(tile_nfull_ptr + out_row, n_full)


def build_pattern_bits(patterns: PatternBatch, num_seqs: int, max_seq_len: int):
    """(slash_bits, vert_bits): ``[num_seqs, H, cdiv(max_seq_len, 64)]``
    int64 bitmaps of the slash offsets and vertical columns."""
    device = patterns.full.device
    num_heads = patterns.num_heads
    n_words = max(triton.cdiv(max_seq_len, WORD_BITS), 1)
    sbits = torch.zeros(num_seqs, num_heads, n_words, dtype=torch.int64,
                        device=device)
    vbits = torch.zeros_like(sbits)
    slash, vert = patterns.slash, patterns.vertical
    if num_seqs == 0 or (slash.shape[-1] == 0 and vert.shape[-1] == 0):
        return sbits, vbits
    _pattern_bits_kernel[(num_seqs, num_heads)](
        slash, vert, sbits, vbits,
        slash.shape[-1], vert.shape[-1], num_heads, n_words,
        slash.stride(0), slash.stride(1), slash.stride(2),
        vert.stride(0), vert.stride(1), vert.stride(2),
        BLOCK_E=64, num_warps=2,
    )
    return sbits, vbits


def build_prefill_index(
    patterns: PatternBatch,
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    max_query_len: int,
    max_seq_len: int,
    block_q: int,
    block_n: int,
) -> SparseIndex:
    """Build the tile index on the patterns' device (no host sync).

    ``max_query_len`` / ``max_seq_len`` must be upper bounds of the
    per-request values; the first ``num_seqs`` requests of ``patterns`` are
    used.
    """
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.shape[0] == num_seqs + 1
    assert patterns.num_requests >= num_seqs, "one pattern row per request"
    assert block_q >= 1 and block_n >= 1
    device = patterns.full.device
    num_heads = patterns.num_heads
    nqt = max(triton.cdiv(max(max_query_len, 0), block_q), 0)
    maxt = max(triton.cdiv(max(max_seq_len, 0), block_n), 0)
    tile_idx = torch.full((num_seqs, num_heads, nqt, maxt), -1,
                          dtype=torch.int32, device=device)
    tile_count = torch.zeros((num_seqs, num_heads, nqt), dtype=torch.int32,
                             device=device)
    tile_full = torch.zeros((num_seqs, num_heads, nqt, maxt), dtype=torch.int8,
                            device=device)
    tile_nfull = torch.zeros_like(tile_count)
    sbits, vbits = build_pattern_bits(patterns, num_seqs, max_seq_len)
    params = head_params(patterns, num_seqs)
    index = SparseIndex(tile_idx, tile_count, tile_full, sbits, vbits,
                        block_q, block_n, tile_nfull, params)
    if num_seqs == 0 or nqt == 0 or maxt == 0:
        return index
    has_blocks = patterns.blocks is not None
    if has_blocks:
        blocks = patterns.blocks
        if blocks.dtype == torch.bool:
            blocks = blocks.view(torch.uint8)
        b_strides = blocks.stride()
        nqb, nkb = blocks.shape[2], blocks.shape[3]
        assert nqb >= 1 and nkb >= 1
    else:
        blocks, b_strides, nqb, nkb = tile_full, (0, 0, 0, 0), 1, 1
    block_t = min(128, max(16, triton.next_power_of_2(maxt)))
    _tile_index_kernel[(num_seqs, nqt, num_heads)](
        tile_idx, tile_count, tile_full, tile_nfull, params, sbits, vbits,
        blocks, query_start_loc, seq_lens,
        num_heads, nqt, maxt, sbits.shape[-1],
        int(patterns.block), nqb, nkb,
        b_strides[0], b_strides[1], b_strides[2], b_strides[3],
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_T=block_t,
        NW_COL=words_for_range(block_n),
        NW_DIST=words_for_range(block_q + block_n - 1),
        HAS_BLOCKS=has_blocks,
        num_warps=4,
    )
    return index


def build_prefill_index_ref(
    patterns: PatternBatch,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    block_q: int,
    block_n: int,
) -> SparseIndex:
    """Slow dense reference from :func:`pattern_mask`, in the same
    partitioned layout.

    ``tile_full`` here is exact: 1 iff every (real query row, tile position)
    pair is allowed (positions past a row are causal-masked, so a tile
    reaching past the first row of the query tile is never full).  The bitmap
    fields are left empty.
    """
    num_seqs = seq_lens.shape[0]
    num_heads = patterns.num_heads
    nqt = triton.cdiv(max_query_len, block_q)
    maxt = triton.cdiv(max_seq_len, block_n)
    tile_idx = torch.full((num_seqs, num_heads, nqt, maxt), -1, dtype=torch.int32)
    tile_count = torch.zeros((num_seqs, num_heads, nqt), dtype=torch.int32)
    tile_full = torch.zeros((num_seqs, num_heads, nqt, maxt), dtype=torch.int8)
    tile_nfull = torch.zeros((num_seqs, num_heads, nqt), dtype=torch.int32)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    p = patterns.to("cpu")
    for r in range(num_seqs):
        q_len = qsl[r + 1] - qsl[r]
        seq_len = lens[r]
        ctx = seq_len - q_len
        if q_len == 0:
            continue
        q_pos = ctx + torch.arange(q_len)
        # Columns up to maxt * block_n: past seq_len nothing is causal.
        mask = pattern_mask(p, r, q_pos, maxt * block_n)  # [H, Q, maxt*bn]
        mask[:, :, seq_len:] = False
        for qt in range(triton.cdiv(q_len, block_q)):
            rows = mask[:, qt * block_q:(qt + 1) * block_q]  # [H, q, cols]
            tiles = rows.reshape(num_heads, rows.shape[1], maxt, block_n)
            any_ = tiles.any(dim=3).any(dim=1)  # [H, maxt]
            all_ = tiles.all(dim=3).all(dim=1)
            for h in range(num_heads):
                ts = torch.nonzero(any_[h]).flatten()
                fs = ts[all_[h, ts]].to(torch.int32)
                ps = ts[~all_[h, ts]].to(torch.int32)
                tile_count[r, h, qt] = ts.numel()
                tile_nfull[r, h, qt] = fs.numel()
                tile_idx[r, h, qt, :fs.numel()] = fs
                tile_full[r, h, qt, :fs.numel()] = 1
                if ps.numel():
                    tile_idx[r, h, qt, maxt - ps.numel():] = ps.flip(0)
    empty = torch.zeros(num_seqs, num_heads, 0, dtype=torch.int64)
    return SparseIndex(tile_idx, tile_count, tile_full, empty, empty.clone(),
                       block_q, block_n, tile_nfull)

