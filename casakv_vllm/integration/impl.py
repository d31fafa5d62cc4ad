"""``CasakvImpl``: one attention layer's forward (FlashInfer's ``run()``): kernel launches only."""

from __future__ import annotations

import torch

from vllm.v1.attention.backend import AttentionImpl, AttentionLayer, AttentionType

from casakv_vllm.plan.metadata import CasakvMetadata


class CasakvImpl(AttentionImpl[CasakvMetadata]):
    """Decoder self-attention over vLLM's paged KV cache.

    CPU: vLLM's CPU kernels for dense rows, torch for the rows a policy
    restricts (``attention.cpu``).  CUDA: casakv's Triton kernels
    (``attention.gpu``).  Every index they read was planned by the builder.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"attention type {attn_type!r}": attn_type != AttentionType.DECODER,
            f"kv_cache_dtype {kv_cache_dtype!r}": kv_cache_dtype not in ("auto", "float16", "bfloat16"),
        }
        missing = [name for name, bad in unsupported.items() if bad]
        if missing:
            raise ValueError(f"casakv backend does not support {', '.join(missing)} yet; choose another --attention-backend")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.layer_index: int | None = None

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if kv_cache.device.type == "cpu":
            from casakv_vllm.integration.cpu_kernels import CpuKernels
            from casakv_vllm.ops.paged import write_kv

            kernels = CpuKernels.get(kv_cache.dtype, kv_cache.shape[2], self.head_size, self.kv_cache_dtype)
            (kernels.write if kernels is not None else write_kv)(key, value, kv_cache, slot_mapping)
        else:
            import casakv_vllm.ops.custom  # noqa: F401  (registers torch.ops.casakv.*)

            torch.ops.casakv.reshape_and_cache(key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CasakvMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention for a varlen batch.

        Args:
            query: ``[num_tokens, num_heads, head_size]``.
            kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
            output: ``[num_tokens, num_heads, head_size]`` (or flattened heads).
        """
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("casakv backend does not support fused output quantization")
        if attn_metadata is None:  # profiling run
            return output
        md = attn_metadata
        n = md.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if self.layer_index is None:
            self.layer_index = layer_index(getattr(layer, "layer_name", ""))
        plan = md.plan
        kv_causal = plan.counts.causal_kv * self.num_kv_heads
        if kv_cache.device.type == "cpu":
            from casakv_vllm.attention.cpu import run_layer_cpu

            counts = run_layer_cpu(q, kv_cache, md, self.layer_index, self.scale, out)
            attended, decode_kv = counts.attended, counts.decode
        else:
            from casakv_vllm.attention.gpu import run_layer_gpu

            run_layer_gpu(q, kv_cache, md, self.layer_index, self.scale, out)
            # exact KV counts of sparse patterns would need a device sync: not counted on CUDA
            attended = kv_causal if plan.gpu.kind != "sparse" else None
            decode_kv = None
        if plan.stats is not None:
            plan.stats.record(plan.counts.prefill_tokens, plan.counts.decode_tokens, attended, kv_causal, decode_kv)
        return output


def layer_index(layer_name: str) -> int:
    """``model.layers.7.self_attn.attn`` -> 7 (0 when the name has no number)."""
    for part in layer_name.split("."):
        if part.isdigit():
            return int(part)
    return 0
