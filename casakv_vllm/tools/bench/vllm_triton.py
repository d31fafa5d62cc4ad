"""vLLM's own Triton paged-attention kernel (``unified_attention``) as a peer
in `casakv bench kernels`, run from vLLM's kernel file.

On a box with vLLM installed the file is imported from there.  The lent GPU
has no vLLM, so ``scripts/stage_vllm_kernel.py`` copies the file (unchanged)
from the vLLM installed on the CPU machine into a folder that travels with
the call; ``--vllm-kernel DIR`` points here.  The kernel reads casakv's own
paged cache through a strided view (vLLM's ``[blocks, block_size, kv_heads,
head_size]`` K and V over casakv's ``[blocks, kv_heads, block_size, 2 *
head_size]``), so both kernels read the same bytes.  Causal prefill and
dense decode only: vLLM's kernel has no sink + window or block-selection
masks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def load(kernel_dir: str | Path | None):
    """``unified_attention`` from ``kernel_dir`` (a staged folder), else from
    an installed vLLM; None (with the reason printed) when neither works."""
    if kernel_dir is not None:
        path = Path(kernel_dir).resolve()
        if not (path / "vllm").is_dir():
            print(f"  vLLM kernel: {path} has no staged vllm/ (scripts/stage_vllm_kernel.py)")
            return None
        sys.path.insert(0, str(path))
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception as err:  # noqa: BLE001  (missing or incompatible vLLM: the column stays empty)
        print(f"  vLLM kernel unavailable: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return None
    return unified_attention


def _kv_views(kv: torch.Tensor):
    """vLLM-layout K and V views ``[blocks, block_size, kv_heads, D]`` of
    casakv's ``[blocks, kv_heads, block_size, 2D]`` cache (no copy)."""
    d = kv.shape[-1] // 2
    nhd = kv.permute(0, 2, 1, 3)
    return nhd[..., :d], nhd[..., d:]


def make_call(unified_attention, q: torch.Tensor, kv: torch.Tensor, table: torch.Tensor,
              query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int,
              max_seq_len: int, scale: float, out: torch.Tensor):
    """A no-argument callable running vLLM's kernel on this batch (causal),
    writing ``out``.  Decode batches use its split-KV (3D) path with 16
    segments, as vLLM's Triton backend does for up to 128 // kv_heads
    sequences."""
    k, v = _kv_views(kv)
    num_seqs = seq_lens.shape[0]
    num_heads, head_size = q.shape[1], q.shape[2]
    kv_heads = k.shape[2]
    threshold = max(1, 128 // kv_heads)
    segments = 16
    dev = q.device
    ones = torch.ones(num_seqs, kv_heads, dtype=torch.float32, device=dev)
    seg_out = torch.empty(threshold, num_heads, segments, head_size, dtype=torch.float32, device=dev)
    seg_max = torch.empty(threshold, num_heads, segments, dtype=torch.float32, device=dev)
    seg_sum = torch.empty_like(seg_max)

    def call():
        unified_attention(
            q=q, k=k, v=v, out=out, cu_seqlens_q=query_start_loc, max_seqlen_q=max_query_len,
            seqused_k=seq_lens, max_seqlen_k=max_seq_len, softmax_scale=scale, causal=True,
            window_size=(-1, -1), block_table=table, softcap=0, q_descale=None, k_descale=ones,
            v_descale=ones, seq_threshold_3D=threshold, num_par_softmax_segments=segments,
            softmax_segm_output=seg_out, softmax_segm_max=seg_max, softmax_segm_expsum=seg_sum)

    return call
