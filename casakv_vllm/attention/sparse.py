"""Sparse prefill rows (``RowPlan.sparse``): a prefill chunk computed under its request's own patterns.

The row's policy gives the patterns (``Policy.prefill_patterns``: casakv's estimator over the chunk's
last queries, kept per layer in the request's state).  Positions are the row's own (such a row has not
been compacted yet).

- CPU build (:func:`sparse_prefill_row`): ``ops.sparse_prefill`` computes only the (query, key) pairs
  they allow, in torch.
- CUDA (:func:`estimated_layer`): the rows' patterns join the rest of the batch's (planned by the
  builder, ``GpuPlan.parts``) in one ``PatternBatch``, whose tile index is built on the device; the
  sparse paged kernel then computes every row in one launch.  Nothing here reads a device value on the
  host.
"""

from __future__ import annotations

from typing import Callable

import torch

from casakv_kernels.patterns import PatternBatch
from casakv_kernels.sparse_index import SparseIndex, build_prefill_index
from casakv_vllm.ops.sparse_prefill import sparse_attend
from casakv_vllm.plan.batch import RowPlan


def row_patterns(row: RowPlan, query: torch.Tensor, keys: Callable[[], torch.Tensor], layer: int,
                 scale: float) -> PatternBatch:
    """The row's patterns at ``layer`` (one request); ``keys()``: its ``[Hkv, seq_len, D]`` keys."""
    q = query[row.q_start:row.q_start + row.q_len].transpose(0, 1)  # [H, q_len, D]
    obs = row.obs.layer(layer) if row.obs is not None else None
    return row.policy.prefill_patterns(row.state.prefill_patterns, layer, q, keys, row.context_len, row.seq_len,
                                       scale, final=row.seq_len >= row.prompt_len, obs=obs)


def sparse_prefill_row(row: RowPlan, query: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], layer: int,
                       scale: float, out: torch.Tensor) -> int:
    """Attention of one sparse prefill row into ``out`` (CPU); returns the (query, key) pairs it computed."""
    k, v = kv
    patterns = row_patterns(row, query, lambda: k, layer, scale)
    q = query[row.q_start:row.q_start + row.q_len].transpose(0, 1)
    o, pairs = sparse_attend(q, k, v, row.context_len, scale, patterns)
    out[row.q_start:row.q_start + row.q_len] = o.transpose(0, 1).to(out.dtype)
    return pairs


def estimated_layer(md, layer: int, query: torch.Tensor, keys_of, num_kv_heads: int,
                    scale: float) -> tuple[PatternBatch, SparseIndex]:
    """The batch's patterns at ``layer`` with its sparse prefill rows' estimated ones, and their tile index
    (CUDA path).  ``keys_of(row)``: the row's gathered keys (only read where the policy estimates)."""
    gp = md.plan.gpu
    parts = list(gp.parts[layer if layer in gp.parts else None])
    for i in gp.estimated:
        row = md.plan.rows[i]
        parts.append(([i], row_patterns(row, query, lambda row=row: keys_of(row), layer, scale)))
    if len(parts) == 1 and len(md.plan.rows) == 1:  # one sparse row alone: its own patterns
        patterns = parts[0][1]
    else:
        patterns = PatternBatch.assemble(parts, len(md.plan.rows), num_kv_heads, query.device)
    index = build_prefill_index(patterns, md.query_start_loc, gp.seq_lens, md.max_query_len, md.max_seq_len,
                                *gp.tiles)
    return patterns, index
