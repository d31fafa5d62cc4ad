"""The casakv attention backend: static capabilities for vLLM's selector."""

from __future__ import annotations

from typing import ClassVar

import torch

from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf
from vllm.v1.kv_cache_layout import KVCacheLayout


#: the ``AttentionBackendEnum`` member casakv registers (``--attention-backend casakv``, any case)
BACKEND_NAME = "CASAKV"
BACKEND_PATH = "casakv_vllm.integration.backend.CasakvBackend"


class CasakvBackend(AttentionBackend):
    """Paged attention with per-head sparse patterns (``--attention-backend casakv``).

    KV cache: vLLM's logical ``[num_blocks, num_kv_heads, block_size,
    2 * head_size]``; the kernels take strides, so both head-major (HND,
    preferred: one head's tokens of a block are contiguous, which the
    compaction step relies on) and token-major (NHD) block interiors work.
    """

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        from casakv_vllm.integration.impl import CasakvImpl

        return CasakvImpl

    @staticmethod
    def get_builder_cls():
        from casakv_vllm.integration.builder import CasakvMetadataBuilder

        return CasakvMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # Kernels address every KV token through block_table[p // bs], p % bs.
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        # CPU: capability is None.  CUDA: Triton kernels need sm_80+ for bf16.
        return capability is None or capability.major >= 8
