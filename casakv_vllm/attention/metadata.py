"""Per-batch metadata of the casakv backend and its builder (FlashInfer's "plan").

``CasakvMetadataBuilder.build`` runs once per batch and serves every layer of
the KV-cache group; ``CasakvImpl.forward`` only launches kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)

from casakv_vllm.attention.plan import BatchPlan, PolicyResolver, plan_batch
from casakv_vllm.config import load_config


@dataclass
class BatchCounts:
    """Host-side counts of one batch, for metrics (computed once per batch).

    ``causal_kv`` is the number of (query token, KV token) pairs of full causal
    attention, per KV head.
    """

    prefill_tokens: int
    decode_tokens: int
    causal_kv: int


@dataclass
class CasakvMetadata:
    """Tensors describing one varlen batch.

    Attributes:
        num_actual_tokens: tokens in the batch (rows of q beyond are padding).
        max_query_len, max_seq_len: host ints (launch sizes; no device sync).
        query_start_loc: ``[num_reqs + 1]`` int32, device.
        seq_lens: ``[num_reqs]`` int32, device; context + new tokens.
        block_table: ``[num_reqs, max_blocks]`` int32, device.
        slot_mapping: ``[num_actual_tokens]`` int64, device; -1 = padding.
        query_start_loc_cpu, seq_lens_cpu: host ints (CPU path loops on them).
        counts: host counts for metrics.
        plan: each row's policy and request state (see ``plan``).
    """

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    counts: BatchCounts
    plan: BatchPlan


def batch_counts(query_start_loc: list[int], seq_lens: list[int]) -> BatchCounts:
    prefill = decode = causal = 0
    for i, seq_len in enumerate(seq_lens):
        q_len = query_start_loc[i + 1] - query_start_loc[i]
        if q_len == 1:
            decode += 1
        else:
            prefill += q_len
        ctx = seq_len - q_len
        # rows attend to ctx+1 .. ctx+q_len keys
        causal += q_len * ctx + q_len * (q_len + 1) // 2
    return BatchCounts(prefill, decode, causal)


class CasakvMetadataBuilder(AttentionMetadataBuilder[CasakvMetadata]):
    # Attention runs outside CUDA graphs (piecewise capture) until the sparse
    # decode kernels with fixed-address buffers land.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.resolver = PolicyResolver(load_config(_additional(vllm_config)), _num_layers(vllm_config))

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> CasakvMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        qsl_cpu = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        if cm.seq_lens.device.type == "cpu":
            seq_lens_cpu = cm.seq_lens[:num_reqs].tolist()
        elif cm.seq_lens_cpu_upper_bound is not None:
            seq_lens_cpu = cm.seq_lens_cpu_upper_bound[:num_reqs].tolist()
        else:  # metrics only; the GPU kernels never read host lengths
            seq_lens_cpu = [cm.max_seq_len] * num_reqs
        return CasakvMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=seq_lens_cpu,
            counts=batch_counts(qsl_cpu, seq_lens_cpu),
            plan=plan_batch(self.resolver, num_reqs),
        )


def _additional(vllm_config: VllmConfig) -> dict:
    extra = vllm_config.additional_config
    return extra if isinstance(extra, dict) else {}


def _num_layers(vllm_config: VllmConfig) -> int:
    hf = getattr(vllm_config.model_config, "hf_text_config", None) if vllm_config.model_config else None
    return int(getattr(hf, "num_hidden_layers", 1) or 1)
