"""Plain-torch reference for ``compaction.py`` (tests / debugging only)."""

from __future__ import annotations

import torch


def compact_kv_ref(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table: torch.Tensor,  # [R, max_blocks_per_seq] int32
    keep: torch.Tensor,  # [R, num_kv_heads, MAXK] int32, strictly ascending rows
    keep_count: torch.Tensor,  # [R, num_kv_heads] int32
) -> torch.Tensor:
    """In place: retained token ``j`` of row ``(r, h)`` (``j < keep_count``)
    moves to logical position ``j`` of request ``r``, KV head ``h``; all
    sources are read from the original cache before anything is written.
    Returns ``kv_cache``."""
    block_size = kv_cache.shape[2]
    orig = kv_cache.clone()
    counts = keep_count.tolist()
    for r in range(keep.shape[0]):
        row = block_table[r].long()
        for h in range(keep.shape[1]):
            n = counts[r][h]
            if n == 0:
                continue
            src = keep[r, h, :n].long()
            assert bool((src[1:] > src[:-1]).all()), "keep must be strictly ascending"
            dst = torch.arange(n, device=kv_cache.device)
            kv_cache[row[dst // block_size], h, dst % block_size] = \
                orig[row[src // block_size], h, src % block_size]
    return kv_cache
