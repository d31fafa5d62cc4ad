"""Compaction of one request's layer: its keep-set's tokens move into the leading slots of its blocks.

Before its first compaction a request's slots are its positions.  After a
compaction event with tail ``T`` (``compress.rule``): slot ``s < shared`` is
position ``s``; slots ``[shared, shared + n_h)`` of KV head ``h`` hold the
``n_h`` tokens it kept from ``[shared, T)``, in position order; slots from
``T`` on are positions again.  Keys carry their rotary position already, so
attention over slots equals attention over the kept positions.

The keep-set (and H2O's scores) live over *live columns*: the slots
``[0, head_end)`` followed by ``[T, ...)`` (``rule.LiveLayout``), exactly the
order in which ``live_blocks`` gathers the cache.  A compaction event maps
the columns of one layout onto the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casakv_vllm.compress.rule import CompactionTerms, LiveLayout, cdiv
from casakv_vllm.ops.paged import set_token_kv, token_kv


@dataclass
class LayerCompaction:
    """What one layer moves and how its keep-set's columns map afterwards.

    ``src_slot[h, :count[h]]`` (ascending) go to slots ``shared .. shared + count[h] - 1``;
    ``src_col[h, c]`` is the old column of new column ``c`` (-1: an empty slot).
    """

    shared: int
    src_slot: torch.Tensor  # [Hkv, M] long
    count: torch.Tensor  # [Hkv] long
    src_col: torch.Tensor  # [Hkv, new width] long

    def remap(self, values: torch.Tensor, empty) -> torch.Tensor:
        """``values`` ``[Hkv, old width]`` (the keep mask, scores) over the new columns."""
        out = values.gather(1, self.src_col.clamp_min(0))
        return out.masked_fill(self.src_col < 0, empty)


def _column_slots(layout: LiveLayout | None, width: int, device=None) -> torch.Tensor:
    """Slot of each live column (``layout`` None: the slots are the positions), made on ``device``."""
    if layout is None:
        return torch.arange(width, device=device)
    head = torch.arange(layout.head_end, device=device)
    return torch.cat([head, torch.arange(layout.tail, layout.tail + width - layout.head_end, device=device)])


def plan_layer(mask: torch.Tensor, terms: CompactionTerms, read: LiveLayout | None, tail: int,
               scores: torch.Tensor | None = None, fit: bool | None = None) -> LayerCompaction:
    """One layer's compaction event.

    Args:
        mask: the keep-set over the live columns of ``read`` (None: over positions), ``[Hkv, width]``.
        tail: ``T`` of this event; what is kept of slots ``[shared, T)`` moves to the compacted region.
        scores: scores over the same columns (H2O's accumulated attention, an event step's attention, a
            prefill chunk's votes); when a head keeps more than the region holds (a long generation, a
            prefill event) the lowest-scored tokens go (without scores: the oldest).
        fit: whether the keep-set may hold more than the region (default: every event but a select-once
            policy's first, whose keep-set is its own promise).
    """
    if fit is None:
        fit = read is not None
    shared, head_end = terms.shared, terms.head_end
    num_kv, width = mask.shape
    slot = _column_slots(read, width, mask.device)  # made there: a host copy would wait for the device
    region = (slot >= shared) & (slot < tail)
    kept = mask & region.unsqueeze(0)
    room = head_end - shared
    count = kept.sum(1)
    if mask.device.type == "cpu":  # host checks are free here; on CUDA nothing below reads the device
        if int(count.max()) > room:
            if not fit:  # the prompt's keep-set is the policy's own choice: it must fit its promise
                raise RuntimeError(f"casakv: a keep-set holds {int(count.max())} tokens, more than the "
                                   f"{room} compacted slots its policy promised")
            kept = _fit(kept, scores, room)
            count = kept.sum(1)
    elif fit:  # fitting is a no-op where the region has room
        kept = _fit(kept, scores, room)
        count = kept.sum(1)
    else:
        count = count.clamp_max(room)
    order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices  # kept columns first, in order
    m = min(room, width)  # entries past count[h] are never moved
    src_slot = slot[order[:, :m]]
    # the new columns: [0, shared) as they were, the compacted region, then the tail from T on
    first_tail = (read.column_of(tail) if read is not None else tail)
    new_width = head_end + width - first_tail
    src_col = torch.full((num_kv, new_width), -1, dtype=torch.long, device=mask.device)
    src_col[:, :shared] = torch.arange(shared, device=mask.device)
    idx = torch.arange(room, device=mask.device).unsqueeze(0)
    region_cols = torch.cat([order[:, :m], torch.zeros(num_kv, room - m, dtype=torch.long,
                                                       device=mask.device)], 1)
    src_col[:, shared:head_end] = torch.where(idx < count.unsqueeze(1), region_cols, -1)
    src_col[:, head_end:] = torch.arange(first_tail, width, device=mask.device)
    return LayerCompaction(shared, src_slot, count, src_col)


def _fit(kept: torch.Tensor, scores: torch.Tensor | None, room: int) -> torch.Tensor:
    """Keep at most ``room`` columns per head: the highest scores (ties and no scores: the latest)."""
    width = kept.shape[1]
    rank = torch.arange(width, device=kept.device, dtype=torch.float32).unsqueeze(0) / (width + 1)
    value = rank if scores is None else scores.float() + rank * 1e-6
    value = value.masked_fill(~kept, float("-inf"))
    top = torch.topk(value, room, dim=1).indices
    fitted = torch.zeros_like(kept).scatter_(1, top, True)
    return fitted & kept


def compact_cpu(kv_cache: torch.Tensor, blocks: torch.Tensor, plan: LayerCompaction, layout: str = "vec") -> None:
    """Move the tokens in place, in a CPU cache layout (``ops.paged``).

    ``blocks``: the request's physical block ids (logical order; freed ones are never touched).
    All sources are read before anything is written (sources and destinations overlap).
    """
    num_kv, width = plan.src_slot.shape
    cols = torch.arange(width).unsqueeze(0).expand(num_kv, width)
    valid = cols < plan.count.unsqueeze(1)
    heads = torch.arange(num_kv).unsqueeze(1).expand(num_kv, width)[valid]
    src, dst = plan.src_slot[valid], cols[valid] + plan.shared
    moving = src != dst
    heads, src, dst = heads[moving], src[moving], dst[moving]
    if src.numel() == 0:
        return
    block_size = kv_cache.shape[2]
    k, v = token_kv(kv_cache, blocks[src // block_size], heads, src % block_size, layout)  # copies
    set_token_kv(kv_cache, blocks[dst // block_size], heads, dst % block_size, k, v, layout)


def compact_gpu(kv_cache: torch.Tensor, table_row: torch.Tensor, plan: LayerCompaction,
                scratch: torch.Tensor | None = None) -> None:
    """Move the tokens in place on CUDA (``casakv::compact_kv``; no host sync).

    The op moves the ``j``-th listed position of each head to position ``j``: the list is the dense
    prefix ``[0, shared)`` (left in place) followed by the head's kept slots.
    ``scratch``: ``[1, Hkv, shared + M, 2 * D]`` in the cache dtype (``M``: ``src_slot``'s width).
    """
    from casakv_kernels.compaction import compact_kv

    num_kv = plan.src_slot.shape[0]
    prefix = torch.arange(plan.shared, device=kv_cache.device).expand(num_kv, plan.shared)
    keep = torch.cat([prefix, plan.src_slot], 1).to(torch.int32).unsqueeze(0)
    count = (plan.count + plan.shared).to(torch.int32).unsqueeze(0)
    compact_kv(kv_cache, table_row.to(torch.int32).unsqueeze(0), keep, count, scratch)


def tail_skip_bits(mask: torch.Tensor, head_end: int, block_size: int) -> torch.Tensor:
    """``[Hkv]`` int32 for the decode kernel: bit ``i`` set where the first tail block's ``i``-th token
    (live column ``head_end + i``, ``i < min(block_size, 32)``) is not kept.  Columns not made yet (tokens
    to come) count as kept.  No host sync."""
    n = min(block_size, 32)
    cols = mask[:, head_end:head_end + n]
    gone = torch.zeros(mask.shape[0], n, dtype=torch.int64, device=mask.device)
    gone[:, :cols.shape[1]] = (~cols).to(torch.int64)
    value = (gone << torch.arange(n, device=mask.device)).sum(1)
    return torch.where(value >= 2 ** 31, value - 2 ** 32, value).to(torch.int32)


def live_blocks(table_row: torch.Tensor, layout: LiveLayout, seq_len: int, block_size: int) -> torch.Tensor:
    """Physical ids of a compacted request's live blocks: ``[0, head_end)`` and ``[tail, seq_len)``."""
    return torch.cat([table_row[: layout.head_end // block_size],
                      table_row[layout.tail // block_size: cdiv(seq_len, block_size)]])
