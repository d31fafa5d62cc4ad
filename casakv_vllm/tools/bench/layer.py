"""The GPU layer harness (``casakv bench kernels --sections layer``): one attention layer of casakv's
real builder and impl, driven with hand-built vLLM metadata (``tools.harness``), as a CUDA server runs it.

A batch of requests with long prompts (Llama-3-8B attention shapes) is prefilled,
then decoded: under ``dense``, and under an evicting policy at 4x whose first
decode step compacts every request (the event) and whose later steps run the
decode kernel over the compacted blocks.  Per decode step: the builder's
planning on the host (once per batch, for every layer: divided by the model's
layers here) and the layer's kernel time (CUDA events); per event: the whole
step (torch keep-set selection, attention and compaction).  The event happens
once every ``chunk_size`` steps, so its share of a step is ``event / chunk``.

Needs vLLM's Python layer (the GPU box gets it staged: ``scripts/stage_vllm_python.py``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from casakv_vllm.tools.bench.gpu_timing import D, HKV, HQ, PAGE

MODEL_LAYERS = 32  # Llama-3-8B: the builder's plan serves this many layers
STEPS = 12  # timed decode steps after the event


@dataclass
class LayerResult:
    kind: str  # "layer"
    seq_len: int
    batch: int
    policy: str
    dense_step_ms: float  # one layer's decode step, dense policy (kernel only)
    step_ms: float  # the same step under the policy, compacted (kernel only)
    plan_ms: float  # the builder's host planning of one decode batch (all layers)
    dense_plan_ms: float  # the same planning under the dense policy (what any backend's builder pays)
    event_ms: float  # the compaction event's step at one layer (selection, attention, compaction)
    cold_event_ms: float  # the same, the first time at this size in the process
    chunk: int
    speedup: float  # dense_step_ms / step_ms
    bookkeeping_share: float  # (plan_ms / MODEL_LAYERS + event_ms / chunk) / step_ms
    added_share: float  # what compression adds: ((plan_ms - dense_plan_ms) / MODEL_LAYERS + event_ms / chunk) / step_ms
    # the floor of the event: a device copy moving the bytes it must touch (every key read for the selection,
    # the kept keys and values read and written), and the added share with that event
    event_floor_ms: float | None = None
    floor_share: float | None = None


def _time(fn, device: str) -> float:
    """ms of ``fn`` (CUDA events on the GPU; the wall clock elsewhere, for smoke runs)."""
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def _decode_run(harness, server: dict, n: int, batch: int, chunk: int, shape=(HQ, HKV, D),
                device: str = "cuda", profile: int = 0) -> dict:
    """Prefill ``batch`` requests of about ``n`` tokens, then decode: the first step's time (the event, if
    the policy compacts) and ``STEPS`` later steps' kernel and planning times."""
    from casakv_vllm.integration.context import worker_context
    from casakv_vllm.tools.harness import _Layer

    vc = harness.config({**server, "chunk_size": chunk} if server else None, num_heads=shape[0],
                        num_kv_heads=shape[1], head_size=shape[2], num_layers=MODEL_LAYERS, device=device,
                        compaction=True, max_model_len=n + batch + 2 * STEPS + 64, max_num_seqs=batch)
    builder, impl = harness.backend(vc, PAGE, device)
    prompts = [n + i for i in range(batch)]  # distinct prompts (observations are kept per prompt)
    params = harness.requests([(p, None) for p in prompts])
    full = harness.batch(impl, [1] * batch, [p + STEPS + 1 for p in prompts], PAGE, torch.bfloat16, device, seed=1)
    layer = _Layer("model.layers.0.self_attn.attn")

    def step(q_lens, ctx, seed):
        b = harness.at(full, q_lens, ctx, seed=seed)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        md = builder.build(0, b.cm)
        if device == "cuda":
            torch.cuda.synchronize()
        plan_ms = (time.perf_counter() - t0) * 1e3
        out = torch.empty_like(b.query)
        ms = _time(lambda: impl.forward(layer, b.query, None, None, b.kv_cache, md, out), device)
        assert torch.isfinite(out).all()
        return plan_ms, ms

    step(prompts, [0] * batch, 0)  # prefill (records the observation windows)
    if profile:  # where the event's time goes: torch's profiler table (top ``profile`` ops)
        import collections
        import warnings

        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=acts) as prof, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":  # where the host waits for the device
                torch.cuda.set_sync_debug_mode("warn")
            _, event_ms = step([1] * batch, prompts, 1)
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        syncs = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                    if "synchroniz" in str(w.message))
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        print(f"event profile, N={n} B={batch}: {event_ms:.2f} ms")
        print(prof.key_averages().table(sort_by=key, row_limit=profile))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=profile))
        print("host syncs in the event step (file:line: count):", dict(syncs))
    else:
        _, event_ms = step([1] * batch, prompts, 1)
    if server:  # every request was compacted by the event
        assert all(worker_context().requests.rows[i].layout is not None for i in range(batch))
    plans, kernels = [], []
    for i in range(STEPS):
        plan_ms, ms = step([1] * batch, [p + 1 + i for p in prompts], 2 + i)
        plans.append(plan_ms)
        kernels.append(ms)
    assert params
    del full
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"event_ms": event_ms, "plan_ms": statistics.median(plans), "step_ms": statistics.median(kernels)}


def bench_layer(n: int, batch: int, policy: str = "snapkv", ratio: float = 0.25, chunk: int = 256,
                shape=(HQ, HKV, D), device: str = "cuda", profile: int = 0) -> LayerResult:
    """``profile``: print torch's profiler table of the event step (its top ``profile`` ops)."""
    from casakv_vllm.integration.plugin import register
    from casakv_vllm.tools.harness import Harness

    register()
    with tempfile.TemporaryDirectory() as tmp:
        harness = Harness(Path(tmp))
        server = {"policy": policy, "kv_ratio": ratio}
        _decode_run(harness, server, 1024, 1, chunk, shape, device)  # warm-up: compiles every kernel once
        dense = _decode_run(harness, {}, n, batch, chunk, shape, device)
        # twice: the first event at a new size also pays the allocator's growth and lazy kernel loading
        cold = _decode_run(harness, server, n, batch, chunk, shape, device)
        ours = _decode_run(harness, server, n, batch, chunk, shape, device, profile)
    share = (ours["plan_ms"] / MODEL_LAYERS + ours["event_ms"] / chunk) / ours["step_ms"]
    added = (max(0.0, ours["plan_ms"] - dense["plan_ms"]) / MODEL_LAYERS + ours["event_ms"] / chunk) / ours["step_ms"]
    floor = floor_share = None
    if device == "cuda":
        from casakv_vllm.tools.bench.gpu_timing import copy_same_bytes

        keys = n * shape[1] * shape[2] * 2  # bf16 bytes of one request's keys at one layer
        kept = int(n * ratio) * shape[1] * 2 * shape[2] * 2  # its kept keys and values
        touched = batch * (keys + 2 * kept)  # read the keys; read and write what is kept
        floor = copy_same_bytes(touched)
        floor_share = floor / chunk / ours["step_ms"]
    return LayerResult("layer", n, batch, f"{policy}/kv_ratio={ratio:g}", dense["step_ms"], ours["step_ms"],
                       ours["plan_ms"], dense["plan_ms"], ours["event_ms"], cold["event_ms"], chunk,
                       dense["step_ms"] / ours["step_ms"],
                       share, added, floor, floor_share)


def markdown(results: list[dict]) -> list[str]:
    lines = ["", "## GPU layer harness: decode with compaction, through casakv's builder and impl", "",
             f"One attention layer (Llama-3-8B shapes) driven with hand-built vLLM metadata. `step` = the layer's "
             f"decode kernel time (median of {STEPS} steps, CUDA events), `plan` = the builder's host planning of "
             f"one decode batch (serves all {MODEL_LAYERS} layers), `event` = the compaction step at one layer "
             f"(keep-set selection, attention and compaction, in torch), once every `chunk` steps, timed on a "
             f"second batch of requests (`cold event`: the first batch at that size, which also grows the "
             f"allocator and loads kernels). "
             f"`bookkeeping` = (plan / {MODEL_LAYERS} + event / chunk) / step; `added` = what compression adds "
             f"to it: ((plan - dense plan) / {MODEL_LAYERS} + event / chunk) / step (the target's measure). "
             f"`event floor` = a device copy moving the bytes the event must touch (every key read for the "
             f"selection; the kept keys and values read and written); `floor share` = event floor / chunk / step.",
             "",
             "| N | B | policy | dense step ms | step ms | speedup | dense plan ms | plan ms | cold event ms | "
             "event ms | chunk | bookkeeping | added | event floor ms | floor share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seq_len']} | {r['batch']} | {r['policy']} | {r['dense_step_ms']:.3f} | "
                     f"{r['step_ms']:.3f} | {r['speedup']:.2f} | {r.get('dense_plan_ms', float('nan')):.2f} | "
                     f"{r['plan_ms']:.2f} | {r.get('cold_event_ms', float('nan')):.2f} | {r['event_ms']:.2f} | "
                     f"{r['chunk']} | "
                     f"{r['bookkeeping_share']:.1%} | "
                     f"{r.get('added_share', float('nan')):.1%} | {_num(r.get('event_floor_ms'), '.3f')} | "
                     f"{_num(r.get('floor_share'), '.2%')} |")
    return lines


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)
