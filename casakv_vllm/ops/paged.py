"""Torch access to the paged KV cache, in the layout of each device.

Both devices keep vLLM's logical shape ``[num_blocks, num_kv_heads,
block_size, 2 * head_size]``; position ``p`` of a request lives in block
``block_table[p // block_size]`` at offset ``p % block_size``.

- CUDA: casakv's kernels store K and V side by side per token
  (``[..., :D]`` and ``[..., D:]``).
- CPU: casakv writes and reads the cache the way vLLM's CPU attention kernels
  do, so those kernels can serve dense rows.  The memory of one (block, KV
  head) holds its keys, then its values, in one of two layouts (``layout``):
  ``"vec"`` (the vec / vec16 kernels): keys transposed ``[head_size,
  block_size]``, values ``[block_size, head_size]`` (``kv_views``);
  ``"amx"`` (the AMX kernels, bf16): keys ``[block_size / 16, head_size / 2,
  16, 2]`` (16-token tiles of dimension pairs) and values ``[head_size / 16,
  block_size / 2, 16, 2]`` (16-dimension tiles of token pairs).
  ``integration.cpu_kernels`` checks at start-up that the kernels agree.
"""

from __future__ import annotations

import torch


def kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys [nb, Hkv, D, bs], values [nb, Hkv, bs, D])``: views of the cache."""
    num_blocks, num_kv, block_size, two_d = kv_cache.shape
    d = two_d // 2
    flat = kv_cache.view(num_blocks, num_kv, 2, block_size * d)
    return flat[:, :, 0].view(num_blocks, num_kv, d, block_size), flat[:, :, 1].view(num_blocks, num_kv, block_size, d)


def _amx_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys [nb, Hkv, bs/16, D/2, 16, 2], values [nb, Hkv, D/16, bs/2, 16, 2])`` of the AMX layout."""
    num_blocks, num_kv, block_size, two_d = kv_cache.shape
    d = two_d // 2
    flat = kv_cache.view(num_blocks, num_kv, 2, block_size * d)
    return (flat[:, :, 0].view(num_blocks, num_kv, block_size // 16, d // 2, 16, 2),
            flat[:, :, 1].view(num_blocks, num_kv, d // 16, block_size // 2, 16, 2))


def token_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, heads, offsets: torch.Tensor,
             layout: str = "vec") -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``n`` tokens (CPU layouts), ``[n, D]`` each (``heads``: ``[n]`` ids) or
    ``[n, Hkv, D]`` (``heads = slice(None)``); copies."""
    if layout == "amx":
        kview, vview = _amx_views(kv_cache)
        k = kview[blocks, heads, offsets // 16, :, offsets % 16, :]  # [n, (Hkv,) D/2, 2]
        v = vview[blocks, heads, :, offsets // 2, :, offsets % 2]  # [n, (Hkv,) D/16, 16]
        return k.flatten(-2), v.flatten(-2)
    kview, vview = kv_views(kv_cache)
    return kview[blocks, heads, :, offsets], vview[blocks, heads, offsets]


def set_token_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, heads, offsets: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, layout: str = "vec") -> None:
    """Store ``n`` tokens' K and V (shapes as :func:`token_kv` returns them)."""
    key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
    if layout == "amx":
        kview, vview = _amx_views(kv_cache)
        kview[blocks, heads, offsets // 16, :, offsets % 16, :] = key.unflatten(-1, (-1, 2))
        vview[blocks, heads, :, offsets // 2, :, offsets % 2] = value.unflatten(-1, (-1, 16))
        return
    kview, vview = kv_views(kv_cache)
    kview[blocks, heads, :, offsets] = key
    vview[blocks, heads, offsets] = value


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             layout: str = "vec") -> None:
    """Store new keys/values at their slots (torch; vLLM's kernel does the same); negative slots are padding.

    Args:
        key, value: ``[num_tokens_padded, num_kv_heads, head_size]``.
        slot_mapping: ``[n]`` int, ``n <= num_tokens_padded``.
    """
    n = slot_mapping.shape[0]
    if n == 0:
        return
    slots = slot_mapping.long()
    keep = (slots >= 0).nonzero().squeeze(1)
    slots, key, value = slots[keep], key[:n][keep], value[:n][keep]
    block_size = kv_cache.shape[2]
    set_token_kv(kv_cache, slots // block_size, slice(None), slots % block_size, key, value, layout)


def gather_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, seq_len: int,
              layout: str = "vec") -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one request's first ``seq_len`` positions, ``[num_kv_heads, seq_len, head_size]`` each,
    in the cache dtype, from either device's layout (``layout``: a CPU one, or ``"kv"``, casakv's CUDA
    layout, which a cache off the CPU always has).

    ``blocks``: the request's physical block ids, ``cdiv(seq_len, block_size)`` of them.
    """
    if kv_cache.device.type != "cpu" or layout == "kv":
        num_kv, d = kv_cache.shape[1], kv_cache.shape[3] // 2
        sel = kv_cache.index_select(0, blocks)  # [n, Hkv, block, 2D]
        # K and V each contiguous per head (matrix products over strided halves fall off cuBLAS's fast paths)
        k = sel[..., :d].transpose(0, 1).reshape(num_kv, -1, d)[:, :seq_len]
        v = sel[..., d:].transpose(0, 1).reshape(num_kv, -1, d)[:, :seq_len]
        return k, v
    if layout == "amx":
        kview, vview = _amx_views(kv_cache)
        num_kv, d = kview.shape[1], 2 * kview.shape[3]
        k = kview.index_select(0, blocks).permute(1, 0, 2, 4, 3, 5).reshape(num_kv, -1, d)[:, :seq_len]
        v = vview.index_select(0, blocks).permute(1, 0, 3, 5, 2, 4).reshape(num_kv, -1, d)[:, :seq_len]
        return k, v
    kview, vview = kv_views(kv_cache)
    num_kv, d = kview.shape[1], kview.shape[2]
    k = kview.index_select(0, blocks).permute(1, 0, 3, 2).reshape(num_kv, -1, d)[:, :seq_len]
    v = vview.index_select(0, blocks).transpose(0, 1).reshape(num_kv, -1, d)[:, :seq_len]
    return k, v
