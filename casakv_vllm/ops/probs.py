"""Attention probabilities in plain torch (fp32), for scoring and observation.

Used by the scorers of data-dependent policies and by the observation
recorder; never on the dense path.
"""

from __future__ import annotations

import torch


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
    kf = k.float().repeat_interleave(group, dim=0) if group > 1 else k.float()
    logits = torch.matmul(q.float(), kf.transpose(1, 2)) * scale
    device = q.device
    pos = torch.arange(n, device=device) + first_pos if isinstance(first_pos, int) else first_pos.to(device)
    mask = torch.arange(seq, device=device).unsqueeze(0) <= pos.unsqueeze(1)
    if allowed is not None:
        mask = mask & (allowed.repeat_interleave(group, dim=0) if group > 1 else allowed)
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def group_sum(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[num_heads, ...]`` -> ``[num_kv_heads, ...]`` summed over each GQA group."""
    num_heads = probs.shape[0]
    return probs.reshape(num_kv_heads, num_heads // num_kv_heads, *probs.shape[1:]).sum(1)
