"""The CUDA device plan of a batch: which kernel runs, with every index it reads built here.

Built once per batch by the metadata builder; the layers only launch:

- pure decode (one new token per row), no pattern rows: the split-KV decode
  kernel over each row's blocks (``decode_sel``: physical block ids and
  per-(row, KV head) valid counts, built once for all layers).  A compacted
  row whose policy selected once reads only its live blocks, minus each
  layer and head's empty compacted slots and its first tail block's evicted
  tokens (``holes``, ``[layers, rows, Hkv, 3]``, from the request's
  ``state.holes``);
- every row dense otherwise: the dense paged kernel;
- any row with a pattern: the sparse paged kernel over one ``PatternBatch``
  of the whole batch (dense rows as full heads) and its tile index
  (``index``), built once, or once per layer when a policy's patterns differ
  between layers;
- sparse prefill rows (``RowPlan.sparse``: casakv's chunks under their own
  estimated patterns): the same kernel, but their patterns come from the
  layer's own queries and keys, so each layer estimates them and builds the
  tile index on the device (``attention.sparse.estimated_layer``, no host
  sync); the builder plans everything else: the other rows' parts of the
  batch's patterns (``parts``) and the kernel's tile shape (``tiles``).

Evicting rows the kernels cannot express (``torch_rows``: a compaction
event, eviction or observation while generating (H2O, decode-scope
streaming), tail blocks over 32 tokens, any evicting decode row in a batch
with prefill rows) are computed
again by ``attention.masked`` over their live blocks, after the kernel (their
kernel output is overwritten; in a decode batch the kernel skips them).

The decode workspace belongs to the builder (fixed addresses across batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from casakv_kernels.patterns import PatternBatch
from casakv_kernels.sparse_decode import (SparseDecodeWorkspace, _block_counts, choose_num_splits,
                                          dense_physical_selection, device_sm_count)
from casakv_kernels.sparse_index import SparseIndex, build_prefill_index
from casakv_kernels.sparse_prefill import plan_blocks
from casakv_vllm.plan.batch import BatchPlan
from casakv_vllm.plan.patterns import batch_patterns, pattern_layers, pattern_parts


@dataclass
class GpuPlan:
    kind: str  # "decode" | "dense" | "sparse"
    workspace: SparseDecodeWorkspace | None = None
    decode_sel: tuple[torch.Tensor, torch.Tensor] | None = None
    patterns: dict[int | None, PatternBatch] = field(default_factory=dict)  # layer (None: every layer) -> patterns
    index: dict[int | None, SparseIndex] = field(default_factory=dict)
    holes: torch.Tensor | None = None  # [layers, rows, Hkv, 3] int32 (decode with compacted rows)
    estimated: list[int] = field(default_factory=list)  # sparse prefill rows: patterns estimated per layer
    parts: dict[int | None, list] = field(default_factory=dict)  # layer -> the other rows' assemble parts
    tiles: tuple[int, int] | None = None  # (block_q, block_n) of the sparse kernel, estimated batches
    torch_rows: list[int] = field(default_factory=list)
    # the dense / sparse kernels' view (``BatchPlan.kernel_view``; None: the metadata's own)
    seq_lens: torch.Tensor | None = None
    block_table: torch.Tensor | None = None

    def layer_patterns(self, layer: int) -> tuple[PatternBatch, SparseIndex]:
        key = layer if layer in self.patterns else None
        return self.patterns[key], self.index[key]


def decode_workspace(max_batch: int, num_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                     device: torch.device) -> SparseDecodeWorkspace:
    """The split-KV workspace for every decode batch up to ``max_batch`` rows: as many splits as
    the one-row batch uses (the most any batch uses)."""
    splits = choose_num_splits(1, num_kv_heads, 1 << 30, block_size, device_sm_count(device))
    return SparseDecodeWorkspace.allocate(max_batch, num_heads, head_size, splits, device)


def plan_gpu(plan: BatchPlan, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
             num_tokens: int, max_query_len: int, max_seq_len: int, num_heads: int, num_kv_heads: int,
             head_size: int, block_size: int, dtype: torch.dtype,
             workspace: SparseDecodeWorkspace | None) -> GpuPlan:
    """The device plan of ``plan`` (tensors on the metadata's device; no host sync)."""
    num_reqs = len(plan.rows)
    pure_decode = max_query_len == 1 and num_tokens == num_reqs
    has_patterns = any(not r.dense and not r.evicting and not r.sparse for r in plan.rows)
    estimated = [r.index for r in plan.rows if r.sparse]
    hole_rows = [r for r in plan.rows if pure_decode and _kernel_reads_compacted(r)]
    served = {r.index for r in hole_rows}
    torch_rows = [r.index for r in plan.rows if r.evicting and r.index not in served]
    if pure_decode and not has_patterns:
        if not hole_rows and not torch_rows:
            sel = dense_physical_selection(block_table[:num_reqs], seq_lens, block_size, num_kv_heads)
            return GpuPlan("decode", workspace, decode_sel=sel)
        sel = live_physical_selection(block_table[:num_reqs], seq_lens, block_size, num_kv_heads, hole_rows,
                                      torch_rows)
        return GpuPlan("decode", workspace, decode_sel=sel, torch_rows=torch_rows,
                       holes=_batch_holes(plan, hole_rows, num_kv_heads, seq_lens.device) if hole_rows else None)
    seq_lens, block_table = plan.kernel_view(seq_lens, block_table)  # live_dense rows: over their live blocks
    if not has_patterns and not estimated:
        return GpuPlan("dense", workspace, torch_rows=torch_rows, seq_lens=seq_lens, block_table=block_table)
    device = seq_lens.device
    out = GpuPlan("sparse", workspace, torch_rows=torch_rows, seq_lens=seq_lens, block_table=block_table)
    group = num_heads // num_kv_heads
    if estimated:  # estimated patterns may have full heads: no sparse-only promise
        out.estimated = estimated
        out.tiles = plan_blocks(group, head_size, max_query_len, max_seq_len, dtype, False)
        for layer in pattern_layers(plan) or [None]:
            out.parts[layer] = pattern_parts(plan, 0 if layer is None else layer, num_kv_heads, device,
                                             estimated=True)
        return out
    for layer in pattern_layers(plan):
        patterns = batch_patterns(plan, 0 if layer is None else layer, num_kv_heads, device)
        block_q, block_n = plan_blocks(group, head_size, max_query_len, max_seq_len, dtype, patterns.sparse_only)
        out.patterns[layer] = patterns
        out.index[layer] = build_prefill_index(patterns, query_start_loc, seq_lens, max_query_len, max_seq_len,
                                               block_q, block_n)
    return out


def _kernel_reads_compacted(row) -> bool:
    """The decode kernel serves this row: it was compacted before this step (and this step is not an
    event), by a policy that does no per-step work (it selected once: no decode observation, no eviction
    while generating).  Its keep-set is then each head's first region slots, all later tokens and its
    first tail block's kept tokens, which ``state.holes`` describe (the skip bits cover a tail block of at
    most 32 tokens); a ``live_dense`` row keeps every live column (its holes are empty)."""
    state = row.state
    if row.read is None or row.compact or state.holes is None or row.q_len != 1:
        return False
    return row.live_dense or (row.evicting and state.compaction.block_size <= 32 and row.policy.selects_once())


def live_physical_selection(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                            num_kv_heads: int, hole_rows: list, torch_rows: list[int]):
    """Decode selection over live blocks: every block of a dense row, ``[0, head_end)`` and
    ``[tail, ...)`` of a compacted row, nothing of a torch row.  One host-to-device copy of three ints per
    row, no sync."""
    num_reqs, max_blocks = block_table.shape
    head = [0] * num_reqs
    tail = [0] * num_reqs
    skip = [0] * num_reqs
    for r in hole_rows:
        head[r.index], tail[r.index] = r.read.head_end // block_size, r.read.tail // block_size
    for i in torch_rows:
        skip[i] = 1
    host = torch.tensor([head, tail, skip], dtype=torch.int32)
    if block_table.is_cuda:
        host = host.pin_memory()
    head_b, tail_b, skip_b = host.to(block_table.device, non_blocking=True).unbind(0)
    nblk = _block_counts(seq_lens, block_size, max_blocks, 1)[:, 0]
    count = torch.where(skip_b.bool(), 0, nblk - tail_b + head_b)
    idx = torch.arange(max_blocks, dtype=torch.int32, device=block_table.device).unsqueeze(0)
    logical = torch.where(idx < head_b.unsqueeze(1), idx, idx - head_b.unsqueeze(1) + tail_b.unsqueeze(1))
    phys = block_table.gather(1, logical.clamp(0, max_blocks - 1).long()).to(torch.int32)
    sel = phys.unsqueeze(1).expand(num_reqs, num_kv_heads, max_blocks)
    return sel, count.view(-1, 1).expand(num_reqs, num_kv_heads).contiguous().to(torch.int32)


def _batch_holes(plan: BatchPlan, hole_rows: list, num_kv_heads: int, device) -> torch.Tensor:
    """``[layers, rows, Hkv, 3]``: the compacted rows' empty slots and tail skip bits per layer and head
    (nothing skipped elsewhere)."""
    holes = torch.zeros(plan.num_layers, len(plan.rows), num_kv_heads, 3, dtype=torch.int32, device=device)
    rows = torch.tensor([r.index for r in hole_rows], dtype=torch.long).to(device, non_blocking=True)
    holes.index_copy_(1, rows, torch.stack([r.state.holes for r in hole_rows], 1))
    return holes
