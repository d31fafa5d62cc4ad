"""CUDA path of the casakv backend: which kernel runs a batch.

Kept free of vLLM imports so it can be tested on a GPU box without vLLM.

- dense policy, pure decode batch (every request has one new token):
  split-KV decode over all blocks;
- dense policy, any other batch: the dense paged kernel;
- a policy with patterns: the sparse paged kernel, which applies the pattern
  element by element (the split-KV decode kernel works on whole selected
  blocks, the granularity of block-selection policies, so it would read
  more than a pattern allows at the block edges).
"""

from __future__ import annotations

import torch

import casakv_vllm.ops as ops
from casakv_vllm.triton_kernels.patterns import PatternBatch
from casakv_vllm.triton_kernels.sparse_decode import SparseDecodeWorkspace, dense_physical_selection

_WORKSPACES: dict[tuple, SparseDecodeWorkspace] = {}


def decode_workspace(max_batch: int, num_heads: int, head_size: int, device: torch.device) -> SparseDecodeWorkspace:
    """One workspace per (device, shape), shared by all layers (they run one after another)."""
    key = (str(device), max_batch, num_heads, head_size)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = SparseDecodeWorkspace.allocate(max_batch, num_heads, head_size, device=device)
    return ws


def gpu_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, D]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2D]
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, D]
    max_query_len: int,
    max_seq_len: int,
    patterns: PatternBatch | None,
    max_batch: int,
    memo: dict | None = None,  # per-batch cache shared by the layers (BatchPlan.memo)
) -> None:
    num_reqs = seq_lens.shape[0]
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    if patterns is None and max_query_len == 1 and query.shape[0] == num_reqs:
        key = ("dense_selection", block_size, num_kv_heads)
        hit = memo.get(key) if memo is not None else None
        if hit is None:  # physical ids: the block-table rows themselves
            hit = dense_physical_selection(block_table, seq_lens, block_size, num_kv_heads)
            if memo is not None:
                memo[key] = hit
        sel, cnt = hit
        ws = decode_workspace(max(max_batch, num_reqs), query.shape[1], query.shape[2], query.device)
        ops.sparse_decode(query, kv_cache, block_table, seq_lens, sel, cnt, scale, out, ws, sel_physical=True)
    elif patterns is None:
        torch.ops.casakv.paged_attention(query, kv_cache, block_table, query_start_loc, seq_lens, scale, out,
                                         max_query_len, max_seq_len)
    else:
        ops.sparse_attention(query, kv_cache, block_table, query_start_loc, seq_lens, scale, out, patterns,
                             max_query_len, max_seq_len)
