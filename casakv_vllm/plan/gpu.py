"""The CUDA device plan of a batch: which kernel runs, with every index it reads built here.

Built once per batch by the metadata builder; the layers only launch:

- every row dense, pure decode (one new token per row): the split-KV decode
  kernel over each row's blocks (``decode_sel``: physical block ids and
  per-(row, KV head) valid counts, built once for all layers);
- every row dense otherwise: the dense paged kernel;
- any row with a pattern: the sparse paged kernel over one ``PatternBatch``
  of the whole batch (dense rows as full heads) and its tile index
  (``index``), built once, or once per layer when a policy's patterns differ
  between layers.

The decode workspace belongs to the builder (fixed addresses across batches).
Evicting rows are not served on CUDA yet (refused at start-up and in request
validation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from casakv_kernels.patterns import PatternBatch
from casakv_kernels.sparse_decode import (SparseDecodeWorkspace, choose_num_splits, dense_physical_selection,
                                          device_sm_count)
from casakv_kernels.sparse_index import SparseIndex, build_prefill_index
from casakv_kernels.sparse_prefill import plan_blocks
from casakv_vllm.plan.batch import BatchPlan
from casakv_vllm.plan.patterns import batch_patterns, pattern_layers


@dataclass
class GpuPlan:
    kind: str  # "decode" | "dense" | "sparse"
    workspace: SparseDecodeWorkspace | None = None
    decode_sel: tuple[torch.Tensor, torch.Tensor] | None = None
    patterns: dict[int | None, PatternBatch] = field(default_factory=dict)  # layer (None: every layer) -> patterns
    index: dict[int | None, SparseIndex] = field(default_factory=dict)

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
    evicting = [r.index for r in plan.rows if r.evicting]
    if evicting:
        raise RuntimeError(f"casakv on CUDA does not serve evicting policies yet (rows {evicting})")
    num_reqs = len(plan.rows)
    if plan.all_dense:
        if max_query_len == 1 and num_tokens == num_reqs:
            sel = dense_physical_selection(block_table[:num_reqs], seq_lens, block_size, num_kv_heads)
            return GpuPlan("decode", workspace, decode_sel=sel)
        return GpuPlan("dense", workspace)
    device = seq_lens.device
    out = GpuPlan("sparse", workspace)
    group = num_heads // num_kv_heads
    for layer in pattern_layers(plan):
        patterns = batch_patterns(plan, 0 if layer is None else layer, num_kv_heads, device)
        block_q, block_n = plan_blocks(group, head_size, max_query_len, max_seq_len, dtype, patterns.sparse_only)
        out.patterns[layer] = patterns
        out.index[layer] = build_prefill_index(patterns, query_start_loc, seq_lens, max_query_len, max_seq_len,
                                               block_q, block_n)
    return out
