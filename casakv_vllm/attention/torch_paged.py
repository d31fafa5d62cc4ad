"""CPU path of the casakv backend: paged attention with torch ops.

The KV cache has vLLM's logical shape ``[num_blocks, num_kv_heads, block_size,
2 * head_size]`` (K in the first half of the last dim, V in the second) with
whatever strides the resolved layout gives it; only indexing is used here, so
any layout works.  Position ``p`` of request ``i`` lives in physical block
``block_table[i, p // block_size]`` at offset ``p % block_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys/values at their slots; negative slots are padding.

    Args:
        key, value: ``[num_tokens_padded, num_kv_heads, head_size]``.
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
        slot_mapping: ``[n]`` int, ``n <= num_tokens_padded``.
    """
    n = slot_mapping.shape[0]
    if n == 0:
        return
    head_size = key.shape[-1]
    block_size = kv_cache.shape[2]
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        idx = valid.nonzero().squeeze(1)
        slots, key, value = slots[idx], key[:n][idx], value[:n][idx]
    else:
        key, value = key[:n], value[:n]
    blocks, offsets = slots // block_size, slots % block_size
    # advanced indices on dims 0 and 2 -> indexed view is [n, num_kv_heads, D]
    kv_cache[blocks, :, offsets, :head_size] = key.to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head_size:] = value.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one request, ``[num_kv_heads, seq_len, head_size]`` each."""
    num_kv_heads, block_size, two_d = kv_cache.shape[1:]
    kv = kv_cache.index_select(0, blocks)  # [nb, Hkv, bs, 2D]
    kv = kv.transpose(0, 1).reshape(num_kv_heads, -1, two_d)[:, :seq_len]
    head_size = two_d // 2
    return kv[..., :head_size], kv[..., head_size:]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, scale: float,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the last ``q_len`` positions of a sequence, fp32 math.

    Args:
        q: ``[num_heads, q_len, D]``; row ``j`` is at position ``context_len + j``.
        k, v: ``[num_kv_heads, seq_len, D]`` with ``seq_len = context_len + q_len``.
        allowed: optional ``[num_kv_heads, q_len, seq_len]`` bool pattern mask
            (already causal, see ``patterns.pattern_mask``); None = dense causal.

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
    seq_len = kf.shape[1]
    rows = torch.arange(q_len, device=q.device).unsqueeze(1) + context_len
    mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= rows
    return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per head against its whole sequence, fp32, GQA without copies.

    Args:
        q: ``[num_heads, 1, D]``; k, v: ``[num_kv_heads, seq_len, D]``.
        allowed: optional ``[num_kv_heads, 1, seq_len]`` bool (False = not read).
    Returns:
        ``(out [num_heads, 1, D] fp32, probs [num_heads, 1, seq_len] fp32)``.
    """
    num_heads, _, dim = q.shape
    num_kv = k.shape[0]
    group = num_heads // num_kv
    qf = q.float().reshape(num_kv, group, dim)
    logits = torch.bmm(qf, k.float().transpose(1, 2)).mul_(scale)  # [Hkv, group, S]
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.bmm(probs, v.float())
    return out.reshape(num_heads, 1, dim), probs.reshape(num_heads, 1, -1)
