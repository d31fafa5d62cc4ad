"""Plain-torch references for ``sparse_decode.py`` (tests / debugging only:
Python loops, fp32, host syncs)."""

from __future__ import annotations

import torch

from .patterns import PatternBatch, pattern_mask


def selected_positions(sel_blocks_row: torch.Tensor, count: int, block_size: int,
                       seq_len: int) -> torch.Tensor:
    """Logical KV positions covered by the first ``count`` selected blocks,
    clipped to ``seq_len``; int64, ascending if the blocks are."""
    blocks = sel_blocks_row[:count].long().cpu()
    pos = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).reshape(-1)
    return pos[pos < seq_len]


def sparse_paged_decode_ref(
    query: torch.Tensor,  # [R, num_heads, head_size]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table: torch.Tensor,  # [R, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [R]
    sel_blocks: torch.Tensor,  # [R, num_kv_heads, MAXSEL] logical block ids
    sel_count: torch.Tensor,  # [R, num_kv_heads]
    scale: float,
    return_lse: bool = False,
    hole: torch.Tensor | None = None,  # [R, num_kv_heads, 3]: skipped range of the selected token stream,
    # then skip bits of the tokens right after it
):
    """fp32 attention of each request's decode query over exactly the
    positions of its selected blocks (per KV head; query head ``h`` uses KV
    head ``h // group``).  Returns fp32 ``out`` [R, num_heads, head_size]
    (and ``lse`` [R, num_heads], natural log).  Rows with no selected
    position give out = 0, lse = -inf."""
    num_seqs, num_heads, head_size = query.shape
    _, num_kv_heads, block_size, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(num_seqs, num_heads, head_size, dtype=torch.float32,
                      device=query.device)
    lse = torch.full((num_seqs, num_heads), float("-inf"), dtype=torch.float32,
                     device=query.device)
    lens = seq_lens.tolist()
    counts = sel_count.tolist()
    holes = hole.tolist() if hole is not None else None
    for r in range(num_seqs):
        for h in range(num_kv_heads):
            pos = selected_positions(sel_blocks[r, h], counts[r][h], block_size, lens[r])
            if holes is not None:  # stream index i is the i-th selected position
                lo, hi, bits = holes[r][h]
                idx = torch.arange(pos.numel())
                after = idx - hi
                skipped = (after >= 0) & (after < min(block_size, 32)) & (
                    ((torch.tensor(bits, dtype=torch.int64) >> after.clamp(0, 31)) & 1) != 0)
                pos = pos[((idx < lo) | (idx >= hi)) & ~skipped]
            if pos.numel() == 0:
                continue
            pos = pos.to(kv_cache.device)
            phys = block_table[r].long()[pos // block_size]
            kv = kv_cache[phys, h, pos % block_size].float()  # [n, 2D]
            k, v = kv[:, :head_size], kv[:, head_size:]
            heads = slice(h * group, (h + 1) * group)
            q = query[r, heads].float()  # [group, D]
            s = (q @ k.T) * scale  # [group, n]
            lse[r, heads] = torch.logsumexp(s, dim=-1)
            out[r, heads] = torch.softmax(s, dim=-1) @ v
    if return_lse:
        return out, lse
    return out


def selection_mask_from_patterns_ref(patterns: PatternBatch, seq_lens: torch.Tensor,
                                     block_size: int, max_blocks: int) -> torch.Tensor:
    """[R, Hkv, max_blocks] bool via the dense ``pattern_mask``: block ``b``
    is selected iff it holds a position allowed for the query at
    ``seq_len - 1``."""
    R, H = patterns.num_requests, patterns.num_heads
    out = torch.zeros(R, H, max_blocks, dtype=torch.bool)
    for r, seq_len in enumerate(seq_lens.tolist()):
        allowed = pattern_mask(patterns, r, torch.tensor([seq_len - 1]), seq_len)[:, 0].cpu()
        nb = -(-seq_len // block_size)
        pad = torch.zeros(H, nb * block_size, dtype=torch.bool)
        pad[:, :seq_len] = allowed
        blk = pad.view(H, nb, block_size).any(-1)
        n = min(nb, max_blocks)
        out[r, :, :n] = blk[:, :n]
    return out
