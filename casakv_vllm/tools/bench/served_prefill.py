"""`casakv bench kernels --sections served`: casakv's sparse prefill as a CUDA server runs it, through the
real builder and ``CasakvImpl.forward`` (``tools.harness``), against the dense policy on the same path.

One request of N tokens (Llama-3-8B attention shapes, structured attention from
``bench.estimated.structured_qk``: local, stripe, mixed and diffuse heads) and the prompt's last prefill
chunk of ``chunk`` tokens (the whole prompt, or the last 8192 of it as chunked prefill gives it).  The
last chunk always re-estimates, so each timed call pays everything a sparse chunk can: the builder's plan
(host), then in the layer the observation window's copy, the keys' gather, the estimator, the batch's
patterns, the tile index on the device and the sparse paged kernel.  ``dense_ms`` is the same step under the
dense policy (casakv's dense paged kernel); ``speedup`` = dense / sparse.  ``vllm_ms``: vLLM's
``unified_attention`` (causal) on the same cache and chunk when staged, the dense paged prefill a vLLM server
runs; ``speedup_vllm`` = vLLM / sparse.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from casakv_vllm.tools.bench.gpu_timing import D, HKV, HQ, PAGE, _bench
from casakv_vllm.tools.bench.layer import _time


@dataclass
class ServedResult:
    kind: str  # "served"
    seq_len: int
    chunk: int
    sparse_ms: float  # the layer's forward of the chunk, casakv sparse prefill (estimator included)
    dense_ms: float  # the same under the dense policy
    plan_ms: float  # the builder's host planning of the sparse batch (serves every layer)
    speedup: float
    heads: dict  # what the estimator picked: "full" / "sparse" KV heads
    vllm_ms: float | None = None  # vLLM's unified_attention on the same chunk (causal), when staged
    speedup_vllm: float | None = None


def _served(harness, server: dict | None, n: int, chunk: int, q, k, rep_ms: int, device: str = "cuda",
            shape=(HQ, HKV, D), vllm_attn=None):
    """(forward ms, plan ms, the request's patterns at layer 0 or None, vLLM's kernel ms or None)."""
    from dataclasses import replace

    from casakv_vllm.integration.context import worker_context
    from casakv_vllm.tools.harness import _Layer

    vc = harness.config(server, num_heads=shape[0], num_kv_heads=shape[1], head_size=shape[2], num_layers=32,
                        device=device, compaction=True, max_model_len=n + 64, max_num_seqs=1)
    builder, impl = harness.backend(vc, PAGE, device)
    params = harness.requests([(n, None)])
    batch = harness.batch(impl, [chunk], [n - chunk], PAGE, torch.bfloat16, device, seed=3, keys=[k])
    layer = _Layer("model.layers.0.self_attn.attn")
    if chunk < n:  # the earlier chunk first, untimed: the request starts at 0 (no prefix-cache hit)
        first = harness.at(batch, [n - chunk], [0])
        first = replace(first, query=q[:n - chunk].to(torch.bfloat16).to(device))
        md = builder.build(0, first.cm)
        impl.forward(layer, first.query, None, None, first.kv_cache, md, torch.empty_like(first.query))
    batch = replace(batch, query=q[n - chunk:].to(torch.bfloat16).to(device))
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    md = builder.build(0, batch.cm)
    plan_ms = (time.perf_counter() - t0) * 1e3
    out = torch.empty_like(batch.query)
    run = lambda: impl.forward(layer, batch.query, None, None, batch.kv_cache, md, out)  # noqa: E731
    ms = _bench(run, rep_ms) if device == "cuda" else _time(run, device)
    assert torch.isfinite(out).all()
    vllm_ms = None
    if vllm_attn is not None:
        from casakv_vllm.tools.bench.vllm_triton import make_call

        cm = batch.cm
        try:
            vllm_ms = _bench(make_call(vllm_attn, batch.query, batch.kv_cache, cm.block_table_tensor,
                                       cm.query_start_loc, cm.seq_lens, chunk, n, impl.scale,
                                       torch.empty_like(out)), rep_ms)
        except Exception as err:  # noqa: BLE001  (the peer failing at this shape leaves its cell empty)
            print(f"  vLLM kernel failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    state = worker_context().requests.rows[0]
    patterns = state.prefill_patterns.get(0)
    assert params
    del batch, out
    if device == "cuda":
        torch.cuda.empty_cache()
    return ms, plan_ms, (patterns[1] if patterns else None), vllm_ms


def bench_served(n: int, chunk: int, gen: torch.Generator, rep_ms: int = 200, device: str = "cuda",
                 shape=(HQ, HKV, D), vllm_attn=None) -> ServedResult:
    """``device`` / ``shape``: a smoke run elsewhere (the CPU takes casakv's torch path there)."""
    from casakv_vllm.integration.plugin import register
    from casakv_vllm.tools.bench.estimated import structured_qk
    from casakv_vllm.tools.harness import Harness

    register()
    q, k = structured_qk(n, gen, device, shape)
    q, k = q.cpu(), k.cpu()
    server = {"policy": "casakv", "kv_ratio": 0.25,
              "policy_params": {"sparse_prefill": True, "sparse_min_len": 2048}}
    with tempfile.TemporaryDirectory() as tmp:
        harness = Harness(Path(tmp))
        sparse_ms, plan_ms, patterns, _ = _served(harness, server, n, chunk, q, k, rep_ms, device, shape)
        if patterns is None:
            raise RuntimeError("the casakv chunk was not planned sparse: no patterns were estimated")
        dense_ms, _, _, vllm_ms = _served(harness, None, n, chunk, q, k, rep_ms, device, shape, vllm_attn)
    full = int(patterns.full.sum())
    return ServedResult("served", n, chunk, sparse_ms, dense_ms, plan_ms, dense_ms / sparse_ms,
                        {"full": full, "sparse": shape[1] - full}, vllm_ms,
                        vllm_ms / sparse_ms if vllm_ms else None)


def markdown(results: list[dict]) -> list[str]:
    lines = ["", "## Sparse prefill as served: casakv's builder and impl, estimator included", "",
             "One request, the prompt's last prefill chunk (the whole prompt, or its last 8192 tokens) at one "
             "layer, through `CasakvMetadataBuilder.build` and `CasakvImpl.forward` on hand-built vLLM metadata "
             "(structured attention). `sparse` = casakv with `sparse_prefill` (window copy, key gather, "
             "estimator, patterns, tile index on the device, sparse kernel); `dense` = the dense policy on the "
             "same path; `vLLM` = vLLM's `unified_attention` (causal) on the same cache and chunk; `plan` = the "
             "builder's host planning of the sparse batch (once for all layers). The prompt's last chunk always "
             "re-estimates (earlier chunks reuse an estimate until the sequence grows 1.5x), so these are the "
             "chunks that pay the most.", "",
             "| N | chunk | sparse ms | dense ms | vLLM ms | dense / sparse | vLLM / sparse | plan ms | "
             "heads sparse / full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        vl, sv = r.get("vllm_ms"), r.get("speedup_vllm")
        lines.append(f"| {r['seq_len']} | {r['chunk']} | {r['sparse_ms']:.3f} | {r['dense_ms']:.3f} | "
                     f"{'-' if vl is None else format(vl, '.3f')} | {r['speedup']:.2f} | "
                     f"{'-' if sv is None else format(sv, '.2f')} | {r['plan_ms']:.2f} | "
                     f"{r['heads']['sparse']} / {r['heads']['full']} |")
    return lines
