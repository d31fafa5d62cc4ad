"""`casakv bench cpu`: casakv's CPU serving path against vLLM's own CPU backend, side by side.

Two real ``vllm serve`` processes on loopback, both up at once, with the
same flags and the demo model: stock (vLLM's CPU_ATTN) and casakv
(``--attention-backend casakv``, dense policy).  Each gets a warm-up request,
then ``--runs`` long prompts (different ones per run, the same ones for both
servers, so the prefix cache never hits), sent to the two servers in
alternating order, each streamed with ``ignore_eos``:
prefill time = time to the first token, decode time = the rest of the
``--decode-tokens`` tokens.  casakv also serves the same prompts under a
compressing policy per request (``--policy``), to show what a policy costs
on top of dense (on prompts of its own).  Ratios are casakv / stock (below 1 is faster).
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from pathlib import Path

SERVER_ARGS = ["--max-model-len", "8192", "--dtype", "bfloat16", "--max-num-seqs", "4"]
TARGET = 1.1
COMPACTION = "casakv_compaction_seconds_sum"  # every layer's compaction time, summed (worker metric)
COMPACTION_TARGET = 0.05  # of the policy's decode time


def prompts(n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` different prose prompts of about ``tokens`` tokens (the quality suite's corpus)."""
    from casakv_vllm.tools.quality.tasks import filler

    return ["\n\n".join(filler(random.Random(f"bench-cpu:{seed}:{i}"), tokens)) + "\n\nSummarize the text above."
            for i in range(n)]


def timed_completion(server, prompt: str, max_tokens: int, xargs: dict | None = None) -> dict:
    """Stream one greedy completion; returns prompt tokens, time to first token and decode time."""
    payload = {"model": server.served_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
               "ignore_eos": True, "stream_options": {"include_usage": True}}
    if xargs:
        payload["vllm_xargs"] = xargs
    t0 = time.monotonic()
    first = None
    usage = {}
    for event in server.iter_stream("/v1/completions", payload, timeout=1800):
        if first is None and event.get("choices") and event["choices"][0].get("text"):
            first = time.monotonic()
        usage = event.get("usage") or usage
    end = time.monotonic()
    return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "prefill_s": round(first - t0, 3), "decode_s": round(end - first, 3)}


def _cell(runs: list[dict]) -> dict:
    cell = {"runs": runs, "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_s": statistics.median(r["decode_s"] for r in runs)}
    if runs and "compaction_s" in runs[0]:  # compaction's share of the request's decode time
        cell["compaction_share"] = statistics.median(r["compaction_s"] / r["decode_s"] for r in runs)
    return cell


def run(json_path: Path | None, md_path: Path | None, runs: int = 5, prompt_tokens: int = 4450,
        decode_tokens: int = 64, policy: str | None = "snapkv", progress=print, model: str | None = None) -> dict:
    """Both servers up at once, requests alternating between them (stock first on even runs,
    casakv first on odd ones), so drift on a shared machine falls on both sides alike."""
    from contextlib import ExitStack

    from casakv_vllm.tools.demo_model import demo_model_path
    from casakv_vllm.tools.serving import VllmServer, cpu_env

    model = model or demo_model_path()
    texts = prompts(2 * runs, prompt_tokens)   # the policy's prompts differ too: no prefix-cache hit
    cells: dict[str, list[dict]] = {"stock": [], "dense": []}
    label = f"{policy}/4x" if policy else None
    if label:
        cells[label] = []
    with ExitStack() as stack:
        servers = {}
        for name, backend in (("stock", None), ("casakv", "casakv")):
            t0 = time.monotonic()
            servers[name] = stack.enter_context(VllmServer(model=model, attention_backend=backend,
                                                           extra_args=SERVER_ARGS, env=cpu_env(4)))
            progress(f"[{name}] server ready in {time.monotonic() - t0:.0f}s")
            timed_completion(servers[name], "Warm up: count to ten.", 8)
        for i in range(runs):
            order = [("stock", "stock"), ("dense", "casakv")]
            for cell, name in order if i % 2 == 0 else order[::-1]:
                r = timed_completion(servers[name], texts[i], decode_tokens + 1)
                cells[cell].append(r)
                progress(f"[{cell}] run {i + 1}/{runs}: {r['prompt_tokens']} prompt tokens, "
                         f"prefill {r['prefill_s']:.2f}s, decode {r['decode_s']:.2f}s")
            if label:
                before = servers["casakv"].metric_values([COMPACTION])[COMPACTION]
                r = timed_completion(servers["casakv"], texts[runs + i], decode_tokens + 1,
                                     {"casakv_policy": policy, "casakv_kv_ratio": 0.25})
                r["compaction_s"] = round(servers["casakv"].metric_values([COMPACTION])[COMPACTION] - before, 4)
                cells[label].append(r)
                progress(f"[{label}] run {i + 1}/{runs}: prefill {r['prefill_s']:.2f}s, decode {r['decode_s']:.2f}s, "
                         f"compaction {r['compaction_s']:.3f}s")
    stock = _cell(cells.pop("stock"))
    ours = {k: _cell(v) for k, v in cells.items()}
    result = {
        "benchmark": "casakv bench cpu", "machine": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(), "server_args": SERVER_ARGS, "model": model,
        "prompt_tokens_target": prompt_tokens, "decode_tokens": decode_tokens, "runs": runs,
        "order": "both servers up, requests alternating (stock first on even runs)", "stock": stock,
        "casakv": ours,
        "ratio_prefill": round(ours["dense"]["prefill_s"] / stock["prefill_s"], 3),
        "ratio_decode": round(ours["dense"]["decode_s"] / stock["decode_s"], 3),
        "target": TARGET,
    }
    result["meets_target"] = result["ratio_prefill"] <= TARGET and result["ratio_decode"] <= TARGET
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    if md_path:
        Path(md_path).write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"# casakv bench cpu ({r['machine']}, {r['cpu_count']} cores)", "",
             f"Demo model, `vllm serve` with `{' '.join(r['server_args'])}`, {r['runs']} prompts of about "
             f"{r['prompt_tokens_target']} tokens (median of the runs), {r['decode_tokens']} decoded tokens each.",
             "", "| server | policy | prefill s | decode s | vs stock prefill | vs stock decode |", "|---|---|---|---|---|---|",
             f"| stock (CPU_ATTN) | dense | {r['stock']['prefill_s']:.2f} | {r['stock']['decode_s']:.2f} | 1.00 | 1.00 |"]
    for label, cell in r["casakv"].items():
        lines.append(f"| casakv | {label} | {cell['prefill_s']:.2f} | {cell['decode_s']:.2f} | "
                     f"{cell['prefill_s'] / r['stock']['prefill_s']:.2f} | {cell['decode_s'] / r['stock']['decode_s']:.2f} |")
    verdict = "met" if r["meets_target"] else "missed"
    lines += ["", f"Target: casakv dense within {r['target']}x of stock for prefill and decode: **{verdict}** "
                  f"(prefill {r['ratio_prefill']:.2f}x, decode {r['ratio_decode']:.2f}x)."]
    for label, cell in r["casakv"].items():
        if "compaction_share" in cell:
            ok = "met" if cell["compaction_share"] <= COMPACTION_TARGET else "missed"
            lines.append(f"Compaction under {label} (every layer, `casakv_compaction_seconds`): "
                         f"{cell['compaction_share']:.1%} of its decode time (target <= {COMPACTION_TARGET:.0%}: "
                         f"**{ok}**).")
    lines.append("")
    return "\n".join(lines)
