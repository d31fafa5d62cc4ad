"""casakv's Triton kernels as torch custom ops (``torch.ops.casakv.*``).

Registered with ``torch.library`` (the mechanism vLLM's own
``direct_register_custom_op`` uses), so torch.compile sees opaque ops with fake
implementations and CUDA graphs capture the Triton launches.  Each op is
registered for the CUDA key, and for the CPU key too so the kernels can be
exercised under ``TRITON_INTERPRET=1`` on a machine without a GPU.  The CUDA
C++ extension (``casakv_vllm._C``, built from csrc/) adds
``torch.ops.casakv.compact_kv`` to the same namespace.

The ops only launch kernels: every index they read (tile index, decode
selection) is planned once per batch by the metadata builder.  Import this
module to register; registration happens once per process.
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

    _LIB.define(name + torch.library.infer_schema(func, mutates_args=mutates))
    for key in ("CUDA", "CPU"):
        _LIB.impl(name, func, key)
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
    from casakv_kernels.paged_attention import paged_attention

    paged_attention(query, kv_cache, block_table, query_start_loc, seq_lens, scale, out,
                    max_query_len=max_query_len, max_seq_len=max_seq_len)


def _reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    from casakv_kernels.reshape_and_cache import reshape_and_cache

    reshape_and_cache(key, value, kv_cache, slot_mapping)


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
    tile_idx: torch.Tensor,
    tile_count: torch.Tensor,
    tile_full: torch.Tensor,
    tile_nfull: torch.Tensor,
    slash_bits: torch.Tensor,
    vert_bits: torch.Tensor,
    head_params: torch.Tensor,
    block_q: int,
    block_n: int,
    max_query_len: int,
    max_seq_len: int,
) -> None:
    """Varlen (prefill / extend / mixed) attention restricted to per-KV-head patterns,
    over a tile index planned by the builder (``sparse_index.build_prefill_index``)."""
    from casakv_kernels.patterns import PatternBatch
    from casakv_kernels.sparse_index import SparseIndex
    from casakv_kernels.sparse_prefill import sparse_paged_attention

    patterns = PatternBatch(full, sink, window, slash, vertical, blocks, block)
    index = SparseIndex(tile_idx, tile_count, tile_full, slash_bits, vert_bits, block_q, block_n, tile_nfull,
                        head_params)
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
    hole: torch.Tensor | None = None,
) -> None:
    """Split-KV decode over the selected blocks (logical or physical block ids), minus each
    (row, KV head)'s ``hole`` of the selected token stream; CUDA-graph capturable (workspace given)."""
    from casakv_kernels.sparse_decode import SparseDecodeWorkspace, sparse_paged_decode

    sparse_paged_decode(query, kv_cache, block_table, seq_lens, sel_blocks, sel_count, scale, out,
                        workspace=SparseDecodeWorkspace(ws_acc, ws_m, ws_l), sel_physical=sel_physical, hole=hole)


_register("paged_attention", _paged_attention, ["out"])
_register("reshape_and_cache", _reshape_and_cache, ["kv_cache"])
_register("sparse_attention", _sparse_attention, ["out"])
_register("sparse_decode", _sparse_decode, ["out", "ws_acc", "ws_m", "ws_l"])


def sparse_attention(query, kv_cache, block_table, query_start_loc, seq_lens, scale, out, patterns, index,
                     max_query_len: int, max_seq_len: int) -> None:
    """``torch.ops.casakv.sparse_attention`` taking a ``PatternBatch`` and its planned ``SparseIndex``."""
    p, ix = patterns, index
    torch.ops.casakv.sparse_attention(query, kv_cache, block_table, query_start_loc, seq_lens, scale, out,
                                      p.full, p.sink, p.window, p.slash, p.vertical, p.blocks, int(p.block),
                                      ix.tile_idx, ix.tile_count, ix.tile_full, ix.tile_nfull, ix.slash_bits,
                                      ix.vert_bits, ix.params, ix.block_q, ix.block_n, max_query_len, max_seq_len)


def sparse_decode(query, kv_cache, block_table, seq_lens, sel_blocks, sel_count, scale, out, workspace,
                  sel_physical: bool = False, hole: torch.Tensor | None = None) -> None:
    """``torch.ops.casakv.sparse_decode`` taking a ``SparseDecodeWorkspace``;
    ``sel_physical``: ``sel_blocks`` holds physical block ids; ``hole``: ``[R, Hkv, 2]`` int32 token
    ranges of the selection that are skipped."""
    torch.ops.casakv.sparse_decode(query, kv_cache, block_table, seq_lens, sel_blocks, sel_count, scale, out,
                                   workspace.acc, workspace.m, workspace.l, sel_physical, hole)
