"""CPU forward of one layer for a planned batch.

- Dense rows (the dense policy, and evicting policies while their prompt is
  prefilled) run on vLLM's CPU attention kernels, in one call for all of them
  (``plan.cpu_dense``, prepared by the builder): they cost what stock vLLM
  costs.  Where those kernels cannot serve the layer (``plan.cpu_dense`` is
  None, e.g. an unsupported head size) dense rows run in torch too.
- Sparse prefill rows (casakv's prompt chunks, ``attention.sparse``) compute only the (query, key)
  pairs their request's estimated patterns allow, in torch.
- Masked rows pay for what their policy changes, in torch
  (``attention.masked``): pattern rows through their pattern's mask,
  evicting rows that decode through their request's keep-set.
- Compaction (``attention.masked.compact_row``): in a request's first decode
  step, and every ``chunk_size`` generated tokens after it, each layer, after
  its attention, moves the kept tokens into the leading slots; later steps
  gather only the live blocks (the scheduler frees the others).
- Prefill rows record their prompt's observations, before any row attends (the rows of a question
  select from their context's observations, possibly recorded by the same chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from casakv_vllm.attention.masked import RowKV, attend_row, causal_pairs, compact_row, prefill_rank
from casakv_vllm.attention.sparse import sparse_prefill_row
from casakv_vllm.observe.record import record_layer
from casakv_vllm.plan.batch import RowPlan
from casakv_vllm.plan.metadata import CasakvMetadata


@dataclass
class LayerCounts:
    """KV tokens read by one layer call (summed over query tokens and KV heads)."""

    attended: int = 0
    decode: dict[str, list[int]] = field(default_factory=dict)  # label -> [attended, causal] of decode rows


def run_layer_cpu(query: torch.Tensor, kv_cache: torch.Tensor, md: CasakvMetadata, layer: int, scale: float,
                  out: torch.Tensor) -> LayerCounts:
    """Attention of one layer for the planned batch.

    Args:
        query: ``[num_tokens, num_heads, D]``; out: same shape, written.
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * D]`` (vLLM's CPU layouts, ``plan.cpu_layout``).
    """
    plan = md.plan
    num_kv = kv_cache.shape[1]
    counts = LayerCounts()
    if plan.cpu_dense is not None:
        plan.cpu_dense.run(query, kv_cache, out, scale)
    kv_of = RowKV(kv_cache, md, plan.cpu_layout)
    for job in plan.records:  # before attention: a question's first chunk reads its context's last queries
        record_layer(job, layer, query, scale, lambda: kv_of(plan.rows[job.row])[0])

    patterns = plan.cpu_patterns.get(layer, plan.cpu_patterns.get(None)) if plan.cpu_patterns else None
    for row in plan.rows:
        causal = num_kv * causal_pairs(row)
        read = num_kv * causal_pairs(row, row.read_context) if row.live_dense else causal
        if row.sparse:
            read = sparse_prefill_row(row, query, kv_of(row), layer, scale, out)
        elif row.q_len > 0 and (not row.dense or plan.cpu_dense is None):
            read = attend_row(row, query, kv_of(row), layer, scale, out, patterns)
        counts.attended += read
        if row.compact:
            if row.context_len < row.prompt_len:  # a prefill event: the chunk's queries rank
                prefill_rank(row, layer, query, kv_of(row), scale)
            compact_row(row, layer, kv_cache, md.block_table[row.index].long(), plan, plan.cpu_layout)
        if row.q_len == 1:
            pair = counts.decode.setdefault(row.label, [0, 0])
            pair[0] += read
            pair[1] += causal
    return counts
