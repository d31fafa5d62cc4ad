"""vLLM's CPU attention kernels, serving casakv's dense rows on the CPU.

Stock vLLM's CPU backend (CPU_ATTN) writes the cache with
``cpu_attn_reshape_and_cache`` and attends with ``cpu_attention_with_kv_cache``
over a per-batch scheduler plan.  casakv uses the same three ops, so a dense
row costs what it costs in stock vLLM, and reads the same cache layout in
torch for the rows a policy restricts (``ops.paged``).  At first use the
layout is probed: random tokens are written with the kernel and read back
through casakv's views; an instruction set whose layout differs (a packed
one) is replaced by the portable ``vec`` / ``vec16`` kernels, and when none
agrees casakv writes and attends in torch.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from casakv_vllm.ops.paged import token_kv
from casakv_vllm.plan.batch import BatchPlan

logger = logging.getLogger("casakv_vllm")
_PORTABLE = ("vec", "vec16")


def _split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache) as vLLM's CPU ops take them: ``[nb, Hkv, bs, D]`` halves of each block."""
    nb, h, bs, two_d = kv_cache.shape
    return kv_cache.view(nb, h, 2 * bs, two_d // 2).chunk(2, dim=2)


def _layout_agrees(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> bool:
    """Write random tokens with vLLM's kernel for ``isa``; True when ``ops.paged`` reads them back."""
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(0)
    num_blocks, num_kv, n = 3, 2, block_size + 3
    cache = torch.zeros(num_blocks, num_kv, block_size, 2 * head_size, dtype=dtype)
    key = torch.randn(n, num_kv, head_size, generator=g).to(dtype)
    value = torch.randn(n, num_kv, head_size, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    try:
        kc, vc = _split(cache)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)
    except RuntimeError:
        return False
    k, v = token_kv(cache, slots // block_size, slice(None), slots % block_size, layout_of(isa))
    return torch.equal(k, key) and torch.equal(v, value)


def layout_of(isa: str) -> str:
    """The cache layout (``ops.paged``) vLLM's CPU kernels of ``isa`` write."""
    return "amx" if isa == "amx" else "vec"


@dataclass(frozen=True)
class CpuKernels:
    """vLLM's CPU attention ops for one (dtype, block size, head size)."""

    isa: str
    dtype: torch.dtype
    kv_cache_dtype: str

    @property
    def layout(self) -> str:
        return layout_of(self.isa)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def get(dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str = "auto") -> "CpuKernels | None":
        """The kernels for this shape, or None when casakv must write and attend in torch."""
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa
        except ImportError:
            return None
        if head_size not in CPUAttentionBackend.get_supported_head_sizes() or block_size % 16:
            return None
        if not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):   # vLLM's Python layer without its CPU ops
            return None
        try:
            first = _get_attn_isa(dtype, block_size, head_size, kv_cache_dtype)
        except NotImplementedError:
            return None
        tried = [first] + [isa for isa in _PORTABLE if isa != first and (isa == "vec16" or block_size % 32 == 0)]
        for isa in tried:
            if _layout_agrees(isa, dtype, block_size, head_size):
                if isa != first:
                    logger.info("casakv: vLLM's CPU attention '%s' kernels pack the cache; using '%s'", first, isa)
                return CpuKernels(isa, dtype, kv_cache_dtype)
        logger.warning("casakv: no vLLM CPU attention kernel shares casakv's cache layout; attending in torch")
        return None

    def write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        from vllm import _custom_ops as ops

        kc, vc = _split(kv_cache)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slot_mapping, self.isa, kv_cache_dtype=self.kv_cache_dtype)

    def plan_dense(self, plan: BatchPlan, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                   block_table: torch.Tensor, num_tokens: int, num_heads: int, num_kv_heads: int,
                   head_size: int) -> "DenseCall | None":
        """One kernel call for every dense row of ``plan`` (None when it has none)."""
        from vllm import _custom_ops as ops
        from vllm import envs

        rows = plan.dense_rows
        if not rows:
            return None
        if len(rows) == len(plan.rows):
            tokens = None
            qsl, lens, table = query_start_loc, seq_lens, block_table
        else:
            idx = torch.tensor([r.index for r in rows], dtype=torch.long)
            tokens = torch.cat([torch.arange(r.q_start, r.q_start + r.q_len) for r in rows])
            qsl = torch.tensor([0] + [r.q_len for r in rows], dtype=query_start_loc.dtype).cumsum(0).to(
                query_start_loc.dtype)
            lens, table = seq_lens.index_select(0, idx), block_table.index_select(0, idx)
            num_tokens = tokens.numel()
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(rows), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size, seq_lens=lens,
            dtype=self.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=self.kv_cache_dtype)
        return DenseCall(self, tokens, num_tokens, qsl, lens, table, sched)


@dataclass
class DenseCall:
    """A planned call of vLLM's CPU attention over a batch's dense rows (``tokens``: their query
    rows in the batch, None when every row is dense)."""

    kernels: CpuKernels
    tokens: torch.Tensor | None
    num_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scheduler_metadata: torch.Tensor

    def run(self, query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, scale: float) -> None:
        from vllm import _custom_ops as ops

        q = query[:self.num_tokens] if self.tokens is None else query.index_select(0, self.tokens)
        o = out[:self.num_tokens] if self.tokens is None else torch.empty_like(q)
        kc, vc = _split(kv_cache)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=kc, value_cache=vc, output=o, query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=self.block_table, softcap=0, scheduler_metadata=self.scheduler_metadata, s_aux=None,
            kv_cache_dtype=self.kernels.kv_cache_dtype)
        if self.tokens is not None:
            out.index_copy_(0, self.tokens, o)
