"""CPU forward of one layer for a planned batch.

- Dense rows (the dense policy, and evicting policies while their prompt is
  prefilled) run on vLLM's CPU attention kernels, in one call for all of them
  (``plan.cpu_dense``, prepared by the builder): they cost what stock vLLM
  costs.  Where those kernels cannot serve the layer (``plan.cpu_dense`` is
  None, e.g. an unsupported head size) dense rows run in torch too.
- Masked rows pay for what their policy changes, in torch: pattern rows
  attend through their pattern's mask, evicting rows that decode read their
  request's keep-set (made at the first decode step, then updated by the
  policy's eviction hooks).
- Compaction (``compress``): in a request's first decode step, and every
  ``chunk_size`` generated tokens after it, each layer, after its attention,
  moves the kept tokens into the leading slots; later steps gather only the
  live blocks (the scheduler frees the others).
- Prefill rows record their prompt's observations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from casakv_kernels.patterns import pattern_mask
from casakv_vllm.compress.compact import compact_cpu, plan_layer
from casakv_vllm.observe.record import record_layer
from casakv_vllm.ops.paged import gather_kv
from casakv_vllm.ops.torch_attention import attend, decode_attention
from casakv_vllm.plan.batch import RowPlan
from casakv_vllm.plan.metadata import CasakvMetadata


@dataclass
class LayerCounts:
    """KV tokens read by one layer call (summed over query tokens and KV heads)."""

    attended: int = 0
    decode: dict[str, list[int]] = field(default_factory=dict)  # label -> [attended, causal] of decode rows


def _causal_pairs(row: RowPlan) -> int:
    return row.q_len * row.context_len + row.q_len * (row.q_len + 1) // 2


def run_layer_cpu(query: torch.Tensor, kv_cache: torch.Tensor, md: CasakvMetadata, layer: int, scale: float,
                  out: torch.Tensor) -> LayerCounts:
    """Attention of one layer for the planned batch.

    Args:
        query: ``[num_tokens, num_heads, D]``; out: same shape, written.
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * D]`` (vLLM's CPU layouts, ``plan.cpu_layout``).
    """
    plan = md.plan
    num_kv, block_size = kv_cache.shape[1], kv_cache.shape[2]
    counts = LayerCounts()
    if plan.cpu_dense is not None:
        plan.cpu_dense.run(query, kv_cache, out, scale)
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def kv_of(row: RowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        if row.index not in gathered:
            if row.read is None:
                blocks = md.block_table[row.index, : -(-row.seq_len // block_size)].long()
                gathered[row.index] = gather_kv(kv_cache, blocks, row.seq_len, plan.cpu_layout)
            else:  # only the live blocks (planned by the builder): the freed ones may be another request's now
                gathered[row.index] = gather_kv(kv_cache, plan.cpu_live_blocks[row.index],
                                                row.read.width(row.seq_len), plan.cpu_layout)
        return gathered[row.index]

    patterns = plan.cpu_patterns.get(layer, plan.cpu_patterns.get(None)) if plan.cpu_patterns else None
    for row in plan.rows:
        causal = num_kv * _causal_pairs(row)
        read = causal
        if row.q_len > 0 and (not row.dense or plan.cpu_dense is None):
            read = _torch_row(row, query, kv_of(row), layer, scale, out, patterns)
        counts.attended += read
        if row.compact:
            _compact_row(row, layer, kv_cache, md.block_table[row.index].long(), plan)
        if row.q_len == 1:
            pair = counts.decode.setdefault(row.label, [0, 0])
            pair[0] += read
            pair[1] += causal
    for job in plan.records:
        record_layer(job, layer, query, scale, lambda: kv_of(plan.rows[job.row])[0])
    return counts


def _compact_row(row: RowPlan, layer: int, kv_cache: torch.Tensor, table_row: torch.Tensor, plan) -> None:
    """After a compaction event's attention at ``layer``: move what the layer keeps of ``[shared, T)``
    into the compacted region; its keep-set (and scores) become columns of the new live layout, so later
    steps read a prefix of them."""
    t0 = time.perf_counter()
    keep = row.state.keep[layer]
    step = plan_layer(keep.mask, row.state.compaction, row.read, row.compact_tail, keep.scores)
    compact_cpu(kv_cache, table_row, step, plan.cpu_layout)
    keep.pos = step.remap(keep.positions(keep.capacity), -1)
    keep.mask = step.remap(keep.mask, False)
    if keep.scores is not None:
        keep.scores = step.remap(keep.scores, 0.0)
    elif row.state.compaction.chunk:  # later events rank what to keep by the decode steps' attention
        keep.scores = torch.zeros(keep.mask.shape, device=keep.mask.device)
    if plan.stats is not None:
        plan.stats.record_compaction(time.perf_counter() - t0)


def _torch_row(row: RowPlan, query: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], layer: int,
               scale: float, out: torch.Tensor, patterns) -> int:
    """Attention of one row in torch (the rows a policy restricts; dense rows only where vLLM's
    kernels cannot serve the layer); returns the KV tokens it read."""
    k, v = kv
    ctx, seq_len = row.context_len, row.seq_len
    q = query[row.q_start:row.q_start + row.q_len].transpose(0, 1)  # [H, q_len, D]
    keep = None
    if row.evicting:
        keep = row.state.keep.get(layer)
        if keep is None:
            obs = row.obs.layer(layer) if row.obs is not None else None
            keep = row.state.keep[layer] = row.policy.start(layer, row.prompt_len, k, obs, scale, seq_len)
        layout = row.read
        width = seq_len if layout is None else layout.width(seq_len)
        row.policy.prepare_step(keep, layer, row.prompt_len, seq_len, width)  # over live columns once compacted
        allowed = keep.visible(width).unsqueeze(1)  # [Hkv, 1, S]: a decode row sees every position before it
        if row.q_len > 1:  # positions of the columns: causal order among the queries' own tokens
            cols = torch.arange(seq_len) if layout is None else \
                torch.cat([torch.zeros(layout.head_end, dtype=torch.long), torch.arange(layout.tail, seq_len)])
            allowed = allowed & (cols.unsqueeze(0) <= torch.arange(ctx, seq_len).unsqueeze(1))
    elif not row.dense:
        allowed = pattern_mask(patterns, row.index, torch.arange(ctx, seq_len), seq_len)
    else:
        allowed = None
    if row.q_len == 1:
        o, probs = decode_attention(q, k, v, scale, allowed)
        if keep is not None and row.policy.caps.observes_decode:
            row.policy.observe(keep, probs)
        elif keep is not None and keep.scores is not None:  # ranks a long generation's compaction events
            keep.accumulate(probs)
    else:
        o = attend(q, k, v, ctx, scale, allowed)
    out[row.q_start:row.q_start + row.q_len] = o.transpose(0, 1).to(out.dtype)
    return int(allowed.sum()) if allowed is not None else k.shape[0] * _causal_pairs(row)
