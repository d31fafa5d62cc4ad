"""CPU forward of one layer for a planned batch: patterns, keep-sets, observations.

Each row of the batch is served by its own policy (see ``plan``):

- dense or pattern policies: causal attention, masked by the policy's
  :class:`PatternBatch` when it has one;
- evicting policies (:class:`~casakv_vllm.policies.keep.KeepPolicy`): prefill
  rows attend densely and record the prompt's observations; decode rows read
  only the request's keep-set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from casakv_vllm.attention.plan import BatchPlan
from casakv_vllm.attention.torch_paged import attend, decode_attention, gather_kv
from casakv_vllm.observations import record_chunk
from casakv_vllm.triton_kernels.patterns import PatternBatch, pattern_mask


@dataclass
class LayerCounts:
    """KV tokens read by one layer call (summed over query tokens and KV heads)."""

    attended: int = 0
    decode: dict[str, list[int]] = field(default_factory=dict)  # label -> [attended, causal] of decode rows


def cpu_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, query_start_loc: list[int],
    seq_lens: list[int], scale: float, out: torch.Tensor, plan: BatchPlan | None = None, layer: int = 0,
    patterns: PatternBatch | None = None,
) -> LayerCounts:
    """Causal paged attention for a varlen batch on CPU (host-side loop over requests), fp32 math.

    Args:
        query: ``[num_tokens, num_heads, D]``.
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * D]``.
        block_table: ``[num_reqs, max_blocks]`` int.
        query_start_loc: ``num_reqs + 1`` host ints; seq_lens: ``num_reqs`` host ints.
        out: ``[num_tokens, num_heads, D]``; rows of the batch are written.
        plan: each row's policy and request (None: every row dense, or ``patterns``).
        patterns: explicit per-row patterns (used when the plan gives none).
    """
    block_size, num_kv = kv_cache.shape[2], kv_cache.shape[1]
    counts = LayerCounts()
    if plan is not None and plan.uniform is not None and not plan.uniform.attends_all and not plan.uniform.evicts:
        patterns = plan.patterns(layer, seq_lens, num_kv, query.device)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        row = plan.rows[i] if plan is not None else None
        ctx = seq_len - q_len
        k, v = gather_kv(kv_cache, block_table[i, : -(-seq_len // block_size)].long(), seq_len)
        q = query[start:end].transpose(0, 1)  # [H, q_len, D]
        allowed, keep_policy = None, None
        if patterns is not None:
            allowed = pattern_mask(patterns, i, torch.arange(ctx, seq_len), seq_len)
        elif row is not None and row.policy.evicts and row.slot is not None:
            plen = row.slot.prompt_len
            if ctx < plen and row.obs is not None:
                record_chunk(row.obs, layer, q, k, ctx, scale, row.policy.needs_col_sums)
            if ctx >= plen:
                visible = row.policy.visible(layer, row.slot.state, plen, seq_len, k,
                                             row.obs.layers.get(layer) if row.obs else None, scale)
                allowed = visible.unsqueeze(1)  # [Hkv, 1, S]: a decode row sees every position before it
                if q_len > 1:
                    allowed = allowed & (torch.arange(seq_len).unsqueeze(0) <= torch.arange(ctx, seq_len).unsqueeze(1))
                keep_policy = row.policy
        if q_len == 1:
            o, probs = decode_attention(q, k, v, scale, allowed)
            if keep_policy is not None and keep_policy.observes_decode:
                keep_policy.on_decode(layer, row.slot.state, row.slot.state[layer], probs)
        else:
            o = attend(q, k, v, ctx, scale, allowed)
        out[start:end] = o.transpose(0, 1).to(out.dtype)
        causal_kv = num_kv * (q_len * ctx + q_len * (q_len + 1) // 2)
        read = int(allowed.sum()) if allowed is not None else causal_kv
        counts.attended += read
        if q_len == 1 and row is not None:
            pair = counts.decode.setdefault(row.label, [0, 0])
            pair[0] += read
            pair[1] += causal_kv
    return counts
