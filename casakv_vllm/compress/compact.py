"""Compaction of one request's layer: its keep-set's tokens move into the leading slots of its blocks.

After compaction a request's slots are no longer its positions: slot ``s <
shared`` is position ``s``; slots ``[shared, shared + n_h)`` of KV head ``h``
hold the ``n_h`` tokens it kept from ``[shared, tail_start)`` in position
order; slots from ``tail_start`` on are positions again.  Keys carry their
rotary position already, so attention over slots equals attention over the
kept positions.  The keep-set becomes a mask over slots (``slot_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casakv_vllm.compress.rule import CompactionTerms, cdiv
from casakv_vllm.ops.paged import set_token_kv, token_kv


@dataclass
class LayerCompaction:
    """What one layer moves: ``keep_pos[h, :count[h]]`` (ascending) go to slots ``0 .. count[h] - 1``."""

    keep_pos: torch.Tensor  # [Hkv, M] long
    count: torch.Tensor  # [Hkv] long
    slot_mask: torch.Tensor  # [Hkv, capacity] bool: the keep-set over slots afterwards


def plan_layer(mask: torch.Tensor, terms: CompactionTerms) -> LayerCompaction:
    """From the keep-set over positions ``mask`` ``[Hkv, capacity]`` (capacity >= tail_start)."""
    shared, tail = terms.shared, terms.tail_start
    region = mask[:, :tail].clone()
    region[:, :shared] = True  # the shared prefix stays where it is
    count = region.sum(1)
    if int(count.max()) > shared + terms.slots:
        raise RuntimeError(f"casakv: a keep-set holds {int(count.max()) - shared} tokens, more than the "
                           f"{terms.slots} compacted slots its policy promised")
    order = torch.sort((~region).to(torch.int8), dim=1, stable=True).indices  # kept positions first, ascending
    keep_pos = order[:, : int(count.max())]
    slot_mask = mask.clone()
    slot_mask[:, :tail] = torch.arange(tail, device=mask.device).unsqueeze(0) < count.unsqueeze(1)
    return LayerCompaction(keep_pos, count, slot_mask)


def compact_cpu(kv_cache: torch.Tensor, blocks: torch.Tensor, plan: LayerCompaction, layout: str = "vec") -> None:
    """Move the tokens in place, in a CPU cache layout (``ops.paged``).

    ``blocks``: the request's physical block ids (logical order), covering ``tail_start``.
    All sources are read before anything is written (sources and destinations overlap).
    """
    num_kv, width = plan.keep_pos.shape
    cols = torch.arange(width).unsqueeze(0).expand(num_kv, width)
    valid = cols < plan.count.unsqueeze(1)
    heads = torch.arange(num_kv).unsqueeze(1).expand(num_kv, width)[valid]
    src, dst = plan.keep_pos[valid], cols[valid]
    moving = src != dst
    heads, src, dst = heads[moving], src[moving], dst[moving]
    if src.numel() == 0:
        return
    block_size = kv_cache.shape[2]
    k, v = token_kv(kv_cache, blocks[src // block_size], heads, src % block_size, layout)  # copies
    set_token_kv(kv_cache, blocks[dst // block_size], heads, dst % block_size, k, v, layout)


def live_blocks(table_row: torch.Tensor, terms: CompactionTerms, seq_len: int) -> torch.Tensor:
    """Physical ids of a compacted request's live blocks: ``[0, head_end)`` and ``[tail_start, seq_len)``."""
    bs = terms.block_size
    return torch.cat([table_row[: terms.head_end // bs], table_row[terms.tail_start // bs: cdiv(seq_len, bs)]])


def live_columns(slot_mask: torch.Tensor, terms: CompactionTerms, seq_len: int) -> torch.Tensor:
    """The slot mask restricted to the live slots (the columns ``live_blocks`` gathers), up to ``seq_len``."""
    return torch.cat([slot_mask[:, : terms.head_end], slot_mask[:, terms.tail_start: seq_len]], dim=1)
