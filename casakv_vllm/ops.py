"""casakv's Triton kernels as torch custom ops (``torch.ops.casakv.*``).

Registered through vLLM's ``direct_register_custom_op`` when vLLM is present
(its low-overhead dispatch), otherwise through ``torch.library``; either way
torch.compile sees opaque ops with fake (meta) implementations and CUDA graphs
capture the Triton launches.  The CUDA C++ extension (``casakv_vllm._C``,
built from csrc/) adds ``torch.ops.casakv.compact_kv`` to the same namespace.

Import this module to register; registration happens once per process.
"""

from __future__ import annotations

import torch

_LIB = torch.library.Library("casakv", "FRAGMENT")
_registered: set[str] = set()


def _register(name: str, func, mutates: list[str]) -> None:
    if name in _registered:
        return

    def fake(*args, **kwargs):
        return None

    try:
        from vllm.utils.torch_utils import direct_register_custom_op
    except ImportError:
        direct_register_custom_op = None
    if direct_register_custom_op is not None:
        direct_register_custom_op(name, func, mutates_args=mutates, fake_impl=fake, target_lib=_LIB, dispatch_key="CUDA")
    else:
        schema = torch.library.infer_schema(func, mutates_args=mutates)
        _LIB.define(name + schema)
        _LIB.impl(name, func, "CUDA")
        _LIB._register_fake(name, fake)
    _registered.add(name)


def _paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
) -> None:
    from casakv_vllm.triton_kernels.paged_attention import paged_attention

    paged_attention(query, kv_cache, block_table, query_start_loc, seq_lens, scale, out,
                    max_query_len=max_query_len, max_seq_len=max_seq_len)


def _reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    from casakv_vllm.triton_kernels.reshape_and_cache import reshape_and_cache

    reshape_and_cache(key, value, kv_cache, slot_mapping)


_register("paged_attention", _paged_attention, ["out"])
_register("reshape_and_cache", _reshape_and_cache, ["kv_cache"])


def _sparse_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    full: torch.Tensor,
    sink: torch.Tensor,
    window: torch.Tensor,
    slash: torch.Tensor,
    vertical: torch.Tensor,
    blocks: torch.Tensor | None,
    block: int,
    max_query_len: int,
    max_seq_len: int,
    sparse_only: bool = False,
) -> None:
    """Varlen (prefill / extend / mixed) attention restricted to per-KV-head patterns."""
    from casakv_vllm.triton_kernels.patterns import PatternBatch
    from casakv_vllm.triton_kernels.sparse_index import build_prefill_index
    from casakv_vllm.triton_kernels.sparse_prefill import plan_blocks, sparse_paged_attention

    patterns = PatternBatch(full, sink, window, slash, vertical, blocks, block, sparse_only)
    group = query.shape[1] // kv_cache.shape[1]
    block_q, block_n = plan_blocks(group, query.shape[2], max_query_len, max_seq_len, query.dtype, sparse_only)
    index = build_prefill_index(patterns, query_start_loc, seq_lens, max_query_len, max_seq_len, block_q, block_n)
    sparse_paged_attention(query, kv_cache, block_table, query_start_loc, seq_lens, scale, out, patterns, index,
                           max_query_len, max_seq_len)


def _sparse_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sel_blocks: torch.Tensor,
    sel_count: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    ws_acc: torch.Tensor,
    ws_m: torch.Tensor,
    ws_l: torch.Tensor,
    sel_physical: bool,
) -> None:
    """Split-KV decode over the selected blocks (logical or physical block ids);
    CUDA-graph capturable (workspace given)."""
    from casakv_vllm.triton_kernels.sparse_decode import SparseDecodeWorkspace, sparse_paged_decode

    sparse_paged_decode(query, kv_cache, block_table, seq_lens, sel_blocks, sel_count, scale, out,
                        workspace=SparseDecodeWorkspace(ws_acc, ws_m, ws_l), sel_physical=sel_physical)


_register("sparse_attention", _sparse_attention, ["out"])
_register("sparse_decode", _sparse_decode, ["out", "ws_acc", "ws_m", "ws_l"])


def sparse_attention(query, kv_cache, block_table, query_start_loc, seq_lens, scale, out, patterns,
                     max_query_len: int, max_seq_len: int) -> None:
    """``torch.ops.casakv.sparse_attention`` taking a ``PatternBatch``."""
    p = patterns
    torch.ops.casakv.sparse_attention(query, kv_cache, block_table, query_start_loc, seq_lens, scale, out,
                                      p.full, p.sink, p.window, p.slash, p.vertical, p.blocks, int(p.block),
                                      max_query_len, max_seq_len, bool(p.sparse_only))


def sparse_decode(query, kv_cache, block_table, seq_lens, sel_blocks, sel_count, scale, out, workspace,
                  sel_physical: bool = False) -> None:
    """``torch.ops.casakv.sparse_decode`` taking a ``SparseDecodeWorkspace``;
    ``sel_physical``: ``sel_blocks`` holds physical block ids."""
    torch.ops.casakv.sparse_decode(query, kv_cache, block_table, seq_lens, sel_blocks, sel_count, scale, out,
                                   workspace.acc, workspace.m, workspace.l, sel_physical)
