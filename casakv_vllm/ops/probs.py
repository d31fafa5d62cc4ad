"""Attention probabilities in plain torch (fp32), for scoring and observation.

Used by the scorers of data-dependent policies and by the observation
recorder; never on the dense path.
"""

from __future__ import annotations

import torch


def grouped_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q k^T`` in fp32 for GQA without copying keys per query head.

    Args:
        q: ``[num_heads, n, D]`` (heads of a group adjacent); k: ``[num_kv_heads, S, D]``.
    Returns:
        ``[num_kv_heads, group * n, S]`` fp32 (row ``j * n + i``: head ``j`` of the group, query ``i``).

    On CUDA with 16-bit keys the product runs on the keys' dtype with fp32 results
    (``bmm(..., out_dtype=float32)``): no fp32 copy of the keys.
    """
    num_heads, n, dim = q.shape
    num_kv = k.shape[0]
    qg = q.reshape(num_kv, (num_heads // num_kv) * n, dim)
    if k.is_cuda and k.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(qg.to(k.dtype), k.transpose(1, 2), out_dtype=torch.float32).mul_(scale)
    return torch.bmm(qg.float(), k.float().transpose(1, 2)).mul_(scale)


def attention_probs(q: torch.Tensor, k: torch.Tensor, first_pos, scale: float,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax probabilities, fp32, on the tensors' device.

    Args:
        q: ``[num_heads, n, D]`` at positions ``first_pos ..`` (an int), or at
            the positions given by an ``[n]`` tensor.
        k: ``[num_kv_heads, S, D]``.
        allowed: optional ``[num_kv_heads, n, S]`` bool mask (on top of causal).
    Returns:
        ``[num_heads, n, S]``.
    """
    num_heads, n, _ = q.shape
    num_kv, seq, _ = k.shape
    group = num_heads // num_kv
    logits = grouped_logits(q, k, scale).view(num_kv, group, n, seq)
    device = q.device
    pos = torch.arange(n, device=device) + first_pos if isinstance(first_pos, int) else first_pos.to(device)
    mask = torch.arange(seq, device=device).unsqueeze(0) <= pos.unsqueeze(1)  # [n, S]
    mask = mask.view(1, 1, n, seq)
    if allowed is not None:
        mask = mask & allowed.unsqueeze(1)
    logits.masked_fill_(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).view(num_heads, n, seq)


def group_sum(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[num_heads, ...]`` -> ``[num_kv_heads, ...]`` summed over each GQA group."""
    num_heads = probs.shape[0]
    return probs.reshape(num_kv_heads, num_heads // num_kv_heads, *probs.shape[1:]).sum(1)
