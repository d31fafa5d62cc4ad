"""``CasakvMetadataBuilder``: the plan of every batch (FlashInfer's ``plan()``), once for all layers.

``build`` turns vLLM's ``CommonAttentionMetadata`` into a
:class:`~casakv_vllm.plan.metadata.CasakvMetadata`: each row's request state
and policy, the observation recordings, and the device plan of the batch (on
CUDA the kernel choice, tile index and decode selection; on the CPU the call
of vLLM's kernels for the dense rows and the pattern masks' inputs).
``CasakvImpl.forward`` only launches.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vllm.config import VllmConfig
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata

from casakv_vllm.compress.compact import live_blocks
from casakv_vllm.integration.context import worker_context
from casakv_vllm.integration.scheduler import compaction_enabled
from casakv_vllm.plan.batch import BatchPlan, CompactionSetup, plan_batch
from casakv_vllm.plan.metadata import CasakvMetadata
from casakv_vllm.plan.patterns import batch_patterns, pattern_layers
from casakv_vllm.requests.resolve import resolver_for


class CasakvMetadataBuilder(AttentionMetadataBuilder[CasakvMetadata]):
    # Attention runs outside CUDA graphs (piecewise capture): the sparse plans
    # are still allocated per batch.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.head_size = kv_cache_spec.head_size
        model = vllm_config.model_config
        self.num_heads = model.get_num_attention_heads(vllm_config.parallel_config)
        self.dtype = model.dtype
        self.max_batch = vllm_config.scheduler_config.max_num_seqs
        self.resolver = resolver_for(vllm_config)
        config = self.resolver.base
        self.context = worker_context()
        # the scheduler frees compacted blocks (same answer in its process): compact at first decode
        self.compaction = CompactionSetup(self.block_size, self.num_kv_heads) \
            if compaction_enabled(vllm_config) else None
        self.stats = self.context.stats_for(config.policy, config.metrics)
        self._workspace = None
        self.cpu_kernels = None
        if device.type == "cpu":
            from casakv_vllm.integration.cpu_kernels import CpuKernels

            self.cpu_kernels = CpuKernels.get(self.dtype, self.block_size, self.head_size,
                                              vllm_config.cache_config.cache_dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CasakvMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        qsl_cpu = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        if cm.seq_lens.device.type == "cpu":
            seq_lens_cpu = cm.seq_lens[:num_reqs].tolist()
        elif cm.seq_lens_cpu_upper_bound is not None:
            seq_lens_cpu = cm.seq_lens_cpu_upper_bound[:num_reqs].tolist()
        else:
            raise RuntimeError("casakv needs host sequence lengths (seq_lens_cpu_upper_bound) from vLLM")
        ctx = self.context
        plan = plan_batch(ctx.requests, self.resolver, ctx.observations, qsl_cpu, seq_lens_cpu, self.compaction)
        plan.stats = self.stats
        if self.stats is not None and ctx.requests is not None and ctx.requests.on_change is None:
            stats = self.stats
            ctx.requests.on_change = lambda t: stats.set_requests(len(t), t.released, t.restarts)
            ctx.requests.on_change(ctx.requests)
        seq_lens = cm.seq_lens[:num_reqs]
        table = cm.block_table_tensor[:num_reqs]
        self._plan_live_blocks(plan, table)
        if self.device.type == "cpu":
            self._plan_cpu(plan, cm, seq_lens, table)
        else:
            self._plan_gpu(plan, cm, seq_lens, table)
        return CasakvMetadata(
            num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc, seq_lens=seq_lens, block_table=table, slot_mapping=cm.slot_mapping,
            query_start_loc_cpu=qsl_cpu, seq_lens_cpu=seq_lens_cpu, plan=plan)

    def _plan_cpu(self, plan: BatchPlan, cm: CommonAttentionMetadata, seq_lens, table) -> None:
        if self.cpu_kernels is not None:
            plan.cpu_layout = self.cpu_kernels.layout
            lens, kernel_table = plan.kernel_view(seq_lens, table)
            plan.cpu_dense = self.cpu_kernels.plan_dense(plan, cm.query_start_loc, lens, kernel_table,
                                                         cm.num_actual_tokens, self.num_heads, self.num_kv_heads,
                                                         self.head_size)
        for layer in pattern_layers(plan):
            plan.cpu_patterns[layer] = batch_patterns(plan, 0 if layer is None else layer, self.num_kv_heads,
                                                      torch.device("cpu"))

    def _plan_gpu(self, plan: BatchPlan, cm: CommonAttentionMetadata, seq_lens, table) -> None:
        from casakv_vllm.plan.gpu import decode_workspace, plan_gpu

        pure_decode = cm.max_query_len == 1 and cm.num_actual_tokens == cm.num_reqs
        if pure_decode and self._workspace is None:  # allocated once: fixed addresses from then on
            self._workspace = decode_workspace(self.max_batch, self.num_heads, self.num_kv_heads, self.head_size,
                                               self.block_size, self.device)
        plan.gpu = plan_gpu(plan, cm.query_start_loc, seq_lens, table, cm.num_actual_tokens, cm.max_query_len,
                            cm.max_seq_len, self.num_heads, self.num_kv_heads, self.head_size, self.block_size,
                            self.dtype, self._workspace)

    def _plan_live_blocks(self, plan: BatchPlan, table) -> None:
        """The live blocks of the rows compacted in an earlier step, for torch attention and the kernels'
        view of ``live_dense`` rows (every layer reads the same ones)."""
        for row in plan.rows:
            if row.read is not None and row.q_len > 0:
                plan.live_blocks[row.index] = live_blocks(table[row.index].long(), row.read, row.seq_len,
                                                          self.block_size)
