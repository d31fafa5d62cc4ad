"""Sparse prefill rows (``RowPlan.sparse``): a prefill chunk computed under its request's own patterns.

The row's policy gives the patterns (``Policy.prefill_patterns``: casakv's estimator over the chunk's
last queries, kept per layer in the request's state), and ``ops.sparse_prefill`` computes only the
(query, key) pairs they allow.  CPU build only; positions are the row's own (such a row has not been
compacted yet).
"""

from __future__ import annotations

import torch

from casakv_vllm.ops.sparse_prefill import sparse_attend
from casakv_vllm.plan.batch import RowPlan


def sparse_prefill_row(row: RowPlan, query: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], layer: int,
                       scale: float, out: torch.Tensor) -> int:
    """Attention of one sparse prefill row into ``out``; returns the (query, key) pairs it computed."""
    k, v = kv
    q = query[row.q_start:row.q_start + row.q_len].transpose(0, 1)  # [H, q_len, D]
    patterns = row.policy.prefill_patterns(row.state.prefill_patterns, layer, q, k, row.context_len, scale,
                                           final=row.seq_len >= row.prompt_len)
    o, pairs = sparse_attend(q, k, v, row.context_len, scale, patterns)
    out[row.q_start:row.q_start + row.q_len] = o.transpose(0, 1).to(out.dtype)
    return pairs
