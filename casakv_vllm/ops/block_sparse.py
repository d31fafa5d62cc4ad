"""Prefill attention under per-KV-head patterns in torch, computing only the key blocks a pattern touches.

The CPU path of pattern rows (the ``casakv`` policy's estimated patterns, static
patterns): for each block of ``block`` queries and each KV head, the key blocks
holding an allowed ``(q, k)`` pair (``casakv_kernels.patterns``) are gathered
and attended with the exact element mask, so the work follows the pattern's
density instead of the causal square.  The GQA group of a KV head shares its
pattern and its gathered keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from casakv_kernels.patterns import PatternBatch, pattern_mask


def _touched_blocks(allowed: torch.Tensor, block: int, num_kblocks: int) -> torch.Tensor:
    """``allowed`` ``[Hkv, Q, S]`` -> ``[Hkv, num_kblocks]`` bool: key blocks holding an allowed pair."""
    hkv, q, s = allowed.shape
    pad = num_kblocks * block - s
    any_q = allowed.any(1)  # [Hkv, S]
    if pad:
        any_q = F.pad(any_q, (0, pad))
    return any_q.view(hkv, num_kblocks, block).any(-1)


def pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, scale: float,
                      patterns: PatternBatch, row: int = 0, block: int = 64) -> tuple[torch.Tensor, int]:
    """Attention of one request's chunk under its pattern row.

    Args:
        q: ``[H, Q, D]`` queries at positions ``context .. context + Q - 1``.
        k, v: ``[Hkv, context + Q, D]`` every key and value so far.
        patterns: row ``row`` holds this request's per-KV-head pattern.

    Returns:
        (``[H, Q, D]`` fp32 output, the (query, key) pairs computed, per KV head summed).
    """
    num_heads, q_len, d = q.shape
    num_kv, seq, _ = k.shape
    group = num_heads // num_kv
    out = torch.empty(num_heads, q_len, d, dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    computed = 0
    for q0 in range(0, q_len, block):
        q1 = min(q_len, q0 + block)
        pos = torch.arange(context + q0, context + q1, device=q.device)
        hi = context + q1  # keys past the block's last query are never allowed
        allowed = pattern_mask(patterns, row, pos, hi)  # [Hkv, b, hi]
        touched = _touched_blocks(allowed, block, -(-hi // block))
        for h in range(num_kv):
            cols = touched[h].nonzero().flatten()
            idx = (cols.unsqueeze(1) * block + torch.arange(block, device=q.device)).flatten()
            idx = idx[idx < hi]
            qh = q[h * group:(h + 1) * group, q0:q1].float()  # [g, b, D]
            mask = allowed[h][:, idx]  # [b, n]
            o = F.scaled_dot_product_attention(qh, kf[h, idx].unsqueeze(0).expand(group, -1, -1),
                                               vf[h, idx].unsqueeze(0).expand(group, -1, -1),
                                               attn_mask=mask.unsqueeze(0), scale=scale)
            out[h * group:(h + 1) * group, q0:q1] = o
            computed += (q1 - q0) * idx.numel()
    return out, computed
