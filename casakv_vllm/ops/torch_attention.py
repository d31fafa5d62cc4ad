"""Attention of one request in plain torch (fp32 math), for rows a policy masks.

Dense rows never come here: they run on vLLM's CPU kernels (CPU) or casakv's
Triton kernels (CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from casakv_vllm.ops.probs import grouped_logits


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, scale: float,
           allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the last ``q_len`` positions of a sequence.

    Args:
        q: ``[num_heads, q_len, D]``; row ``j`` is at position ``context_len + j``.
        k, v: ``[num_kv_heads, seq_len, D]`` with ``seq_len = context_len + q_len``.
        allowed: optional ``[num_kv_heads, q_len, seq_len]`` bool mask (already
            causal, e.g. from ``patterns.pattern_mask``); None = dense causal.

    Returns:
        ``[num_heads, q_len, D]`` float32.
    """
    num_heads, q_len, _ = q.shape
    group = num_heads // k.shape[0]
    qf, kf, vf = q.float(), k.float(), v.float()
    if group > 1:
        kf = kf.repeat_interleave(group, dim=0)
        vf = vf.repeat_interleave(group, dim=0)
    if allowed is not None:
        mask = allowed.repeat_interleave(group, dim=0) if group > 1 else allowed
        return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    if q_len == 1:
        return F.scaled_dot_product_attention(qf, kf, vf, scale=scale)
    if context_len == 0:
        return F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale)
    rows = torch.arange(q_len, device=q.device).unsqueeze(1) + context_len
    mask = torch.arange(kf.shape[1], device=q.device).unsqueeze(0) <= rows
    return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per head against its whole sequence, GQA without copies.

    Args:
        q: ``[num_heads, 1, D]``; k, v: ``[num_kv_heads, seq_len, D]``.
        allowed: optional ``[num_kv_heads, 1, seq_len]`` bool (False = not read).
    Returns:
        ``(out [num_heads, 1, D] fp32, probs [num_heads, 1, seq_len] fp32)``.
    """
    num_heads, _, dim = q.shape
    num_kv = k.shape[0]
    logits = grouped_logits(q, k, scale)  # [Hkv, group, S] fp32
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if v.is_cuda and v.dtype in (torch.bfloat16, torch.float16):  # no fp32 copy of the values
        out = torch.bmm(probs.to(v.dtype), v, out_dtype=torch.float32)
    else:
        out = torch.bmm(probs, v.float())
    return out.reshape(num_heads, 1, dim), probs.reshape(num_heads, 1, -1)
