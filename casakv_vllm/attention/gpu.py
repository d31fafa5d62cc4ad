"""CUDA forward of one layer: launch the kernel the batch's device plan chose (``plan.gpu``).

No host synchronisation and no index building here: the builder planned
everything once per batch.  The rows the kernels cannot express
(``GpuPlan.torch_rows``: compaction events and evicting rows with per-step
work) are computed again in torch over their live blocks
(``attention.masked``), then compacted where this step is an event.  Prefill
rows also record their prompt's observations (window queries, on the device), before attention.
"""

from __future__ import annotations

import torch

import casakv_vllm.ops.custom as ops
from casakv_vllm.attention.masked import RowKV, attend_row, compact_row, prefill_rank
from casakv_vllm.attention.sparse import estimated_layer
from casakv_vllm.observe.record import record_layer
from casakv_vllm.plan.metadata import CasakvMetadata


def run_layer_gpu(query: torch.Tensor, kv_cache: torch.Tensor, md: CasakvMetadata, layer: int, scale: float,
                  out: torch.Tensor) -> None:
    """Attention of one layer for the planned batch.

    Args:
        query: ``[num_tokens, num_heads, D]``; out: same shape, written.
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * D]`` (K|V per token).
    """
    gp = md.plan.gpu
    kv_of = RowKV(kv_cache, md, "kv")  # casakv's K|V layout (also under TRITON_INTERPRET on the CPU)
    for job in md.plan.records:  # before attention: a question's first chunk reads its context's last queries
        record_layer(job, layer, query, scale, lambda: kv_of(md.plan.rows[job.row])[0])
    if gp.kind == "decode":
        sel, cnt = gp.decode_sel
        ops.sparse_decode(query, kv_cache, md.block_table, md.seq_lens, sel, cnt, scale, out, gp.workspace,
                          sel_physical=True, hole=gp.holes[layer] if gp.holes is not None else None)
    elif gp.kind == "dense":
        torch.ops.casakv.paged_attention(query, kv_cache, gp.block_table, md.query_start_loc, gp.seq_lens, scale,
                                         out, md.max_query_len, md.max_seq_len)
    else:
        patterns, index = gp.layer_patterns(layer) if not gp.estimated else \
            estimated_layer(md, layer, query, lambda row: kv_of(row)[0], kv_cache.shape[1], scale)
        ops.sparse_attention(query, kv_cache, gp.block_table, md.query_start_loc, gp.seq_lens, scale, out,
                             patterns, index, md.max_query_len, md.max_seq_len)
    for i in gp.torch_rows:
        row = md.plan.rows[i]
        if row.q_len > 0:
            attend_row(row, query, kv_of(row), layer, scale, out, None, count=False)
    for row in md.plan.rows:
        if row.compact:
            if row.context_len < row.prompt_len:  # a prefill event: the chunk's queries rank
                prefill_rank(row, layer, query, kv_of(row), scale)
            compact_row(row, layer, kv_cache, md.block_table[row.index], md.plan, "kv")
