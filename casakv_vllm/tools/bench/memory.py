"""`casakv bench memory`: KV blocks a request holds, dense against each evicting policy, on a real server.

One ``vllm serve`` (CPU build, demo model, block size 16, a fixed KV pool of
``--pool-blocks`` blocks, prefix caching on) serves every cell; the policy is
chosen per request (``vllm_xargs``), dense being the server's own policy.
Each prompt is new (the prefix cache never hits).  While a request streams, a
thread samples ``/metrics`` every 0.2 s: ``vllm:kv_cache_usage_perc`` times
the pool is the blocks held.  Per request: the peak, and the steady value
(the median over the second half of its decode phase, after compaction).  Then a burst
of concurrent long requests against the same pool, dense and under the main
policy: the most requests running at once (``vllm:num_requests_running``) and
output tokens/s.  The KV usage over time of the bursts is plotted.  Last, the
quick quality suite, dense and under the main policy, on the same server.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

BLOCK = 16
POLICIES = ["snapkv", "pyramidkv", "adakv", "static-heads", "composite", "h2o", "streaming"]
POLICY_PARAMS = {"composite": {"members": [{"policy": "streaming", "share": 0.25, "policy_params": {"scope": "decode"}},
                                           {"policy": "snapkv", "share": 0.75}]},
                 "streaming": {"scope": "decode"}}
GAUGES = ["vllm:kv_cache_usage_perc", "vllm:num_requests_running"]


#: the suffix of a policy's label when it also compresses while the prompt is prefilled
PREFILL = "+prefill"


def xargs_for(label: str | None, ratio: float, assignment: str | None) -> dict | None:
    """``vllm_xargs`` of a cell: a policy name, or ``policy+prefill`` (``prefill_compression`` on)."""
    if label is None:
        return None
    policy = label.removesuffix(PREFILL)
    x = {"casakv_policy": policy, "casakv_kv_ratio": ratio}
    if label.endswith(PREFILL):
        x["casakv_prefill_compression"] = True
    params = dict(POLICY_PARAMS.get(policy, {}))
    if policy == "static-heads":
        params["assignment"] = assignment
    if params:
        x["casakv_policy_params"] = json.dumps(params)  # vllm_xargs values are strings or numbers
    return x


class Sampler:
    """Samples the server's gauges every ``period`` seconds in a thread: ``[(t, usage, running)]``."""

    def __init__(self, server, period: float = 0.2):
        self.server, self.period, self.samples = server, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                v = self.server.metric_values(GAUGES, settle_timeout=0)
                self.samples.append((time.monotonic() - t0, v[GAUGES[0]], v[GAUGES[1]]))
            except OSError:
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_request(server, prompt: str, decode_tokens: int, xargs: dict | None, pool: int) -> dict:
    from casakv_vllm.tools.bench.cpu import timed_completion

    with Sampler(server) as s:
        r = timed_completion(server, prompt, decode_tokens, xargs)
    usage = [u for _, u, _ in s.samples]
    # steady: the second half of decode (compaction happened at its first step, the free one step later)
    late = [u for t, u, _ in s.samples if r["prefill_s"] + r["decode_s"] / 2 <= t <= r["prefill_s"] + r["decode_s"]]
    return {**r, "peak_blocks": round(max(usage, default=0) * pool),
            "steady_blocks": round(statistics.median(late) * pool) if late else None, "samples": len(usage),
            "steady_samples": len(late)}


def burst(server, texts: list[str], decode_tokens: int, xargs: dict | None, pool: int) -> dict:
    from casakv_vllm.tools.bench.cpu import timed_completion

    t0 = time.monotonic()
    with Sampler(server) as s, cf.ThreadPoolExecutor(len(texts)) as ex:
        runs = list(ex.map(lambda t: timed_completion(server, t, decode_tokens, xargs), texts))
    wall = time.monotonic() - t0
    out_tokens = sum(r["completion_tokens"] or 0 for r in runs)
    return {"requests": len(texts), "max_running": int(max((n for _, _, n in s.samples), default=0)),
            "wall_s": round(wall, 2), "output_tokens_per_s": round(out_tokens / wall, 2),
            "usage": [(round(t, 2), round(u * pool, 1)) for t, u, _ in s.samples]}


def quick_quality(server, policy: str, ratio: float) -> dict:
    """The quick quality suite (passkey + longdoc, 2 samples of 1024 tokens) on ``server``, dense and
    ``policy`` at ``ratio`` (``snapkv+prefill``: with prefill compression): mean score per side (``casakv eval
    quality``, in a subprocess)."""
    import sys
    import tempfile

    budget = f"{round(1 / ratio)}x"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.json"
        cmd = [sys.executable, "-m", "casakv_vllm.tools.cli", "eval", "quality", "--url", server.url, "--policies",
               f"full,{policy}", "--budgets", budget, "--tasks", "passkey,longdoc", "--samples", "2",
               "--context", "1024", "--json", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"quick quality suite failed: {done.stderr.strip().splitlines()[-1:]}")
        records = json.loads(out.read_text())["results"]
    score = {side: [r["score"] for r in records if r["policy"] == side and r["task"] in ("passkey", "longdoc")]
             for side in ("full", policy)}
    return {"dense": round(statistics.mean(score["full"]), 3), "casakv": round(statistics.mean(score[policy]), 3),
            "budget": budget, "tasks": ["passkey", "longdoc"]}


def run(json_path: Path | None, md_path: Path | None, plot_path: Path | None, lengths=(2000, 4000, 7000),
        policies=POLICIES, ratio: float = 0.25, decode_tokens: int = 48, pool_blocks: int = 1400,
        burst_requests: int = 12, progress=print, model: str | None = None, prefill: bool = True,
        burst_decode_tokens: int = 1024) -> dict:
    """``prefill``: also run the main policy with prefill compression (``<policy>+prefill``), which is then
    the one the burst and the quality suite measure against dense."""
    from casakv_vllm.tools.bench.cpu import prompts
    from casakv_vllm.tools.demo_model import demo_model_path
    from casakv_vllm.tools.serving import VllmServer, cpu_env

    model = model or demo_model_path()
    assignment = str(Path(__file__).resolve().parents[3] / "docs" / "quality-static-heads.json")
    if "static-heads" in policies and not Path(assignment).exists():
        policies = [p for p in policies if p != "static-heads"]  # an installed copy without the docs
    args = ["--max-model-len", "8192", "--dtype", "bfloat16", "--block-size", str(BLOCK), "--max-num-seqs",
            str(max(8, burst_requests)), "--max-num-batched-tokens", "512", "--enable-prefix-caching",
            "--num-gpu-blocks-override", str(pool_blocks)]
    main = policies[0] + PREFILL if prefill else policies[0]
    labels = [*policies, *([main] if prefill else [])]
    result = {"benchmark": "casakv bench memory", "machine": platform.processor() or platform.machine(),
              "model": model, "server_args": args, "pool_blocks": pool_blocks, "block_size": BLOCK, "ratio": ratio,
              "decode_tokens": decode_tokens, "burst_decode_tokens": burst_decode_tokens, "cells": {},
              "main_policy": main}
    t0 = time.monotonic()
    with VllmServer(model=model, attention_backend="casakv", extra_args=args, env=cpu_env(4)) as server:
        progress(f"server ready in {time.monotonic() - t0:.0f}s")
        seed = 0
        for n in lengths:
            for policy in [None, *labels]:
                seed += 1
                text = prompts(1, n, seed=seed)[0]
                label = policy or "dense"
                cell = one_request(server, text, decode_tokens, xargs_for(policy, ratio, assignment), pool_blocks)
                result["cells"].setdefault(str(n), {})[label] = cell
                progress(f"[{n} tokens] {label}: {cell['prompt_tokens']} prompt tokens, peak {cell['peak_blocks']} "
                         f"blocks, steady {cell['steady_blocks']}")
        for label, policy in (("dense", None), (main, main)):
            texts = prompts(burst_requests, lengths[-1], seed=1000 + len(label))  # new prompts: no cache hits
            result.setdefault("burst", {})[label] = b = burst(server, texts, burst_decode_tokens,
                                                             xargs_for(policy, ratio, assignment), pool_blocks)
            progress(f"[burst x{burst_requests}] {label}: at most {b['max_running']} running, "
                     f"{b['output_tokens_per_s']} output tokens/s")
        try:  # the measurements above are kept whatever happens here
            result["quality"] = quick_quality(server, main, ratio)
            progress(f"[quality] dense {result['quality']['dense']}, {main} {result['quality']['casakv']}")
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            result["quality"] = {"dense": None, "casakv": None, "error": str(err)}
            progress(f"[quality] not measured: {err}")
    longest = str(lengths[-1])
    cells = result["cells"][longest]
    result.update({
        "dense_blocks_per_request": cells["dense"]["steady_blocks"],
        "casakv_blocks_per_request": cells[main]["steady_blocks"],
        "casakv_peak_blocks_per_request": cells[main]["peak_blocks"],
        "dense_peak_blocks_per_request": cells["dense"]["peak_blocks"],
        "max_concurrent_dense": result["burst"]["dense"]["max_running"],
        "max_concurrent_casakv": result["burst"][main]["max_running"],
        "quality_dense": result["quality"]["dense"], "quality_casakv": result["quality"]["casakv"],
    })
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    if md_path:
        Path(md_path).write_text(markdown(result))
    if plot_path:
        plot(result, Path(plot_path))
    return result


def markdown(r: dict) -> str:
    main = r["main_policy"]
    lines = [f"# casakv bench memory ({r['machine']})", "",
             f"Demo model, one `vllm serve --attention-backend casakv {' '.join(r['server_args'])}`; policies chosen "
             f"per request at {1 / r['ratio']:g}x (`kv_ratio` {r['ratio']}), {r['decode_tokens']} decoded tokens. "
             "Blocks held = `vllm:kv_cache_usage_perc` x pool, sampled every 0.2 s; steady = median over the second "
             "half of the request's decode phase.", "",
             "| prompt | policy | prompt tokens | peak blocks | steady blocks | steady vs dense |", "|---|---|---|---|---|---|"]
    for n, cells in r["cells"].items():
        dense = cells["dense"]["steady_blocks"] or 1
        for label, c in cells.items():
            steady = c["steady_blocks"]
            ratio = f"{steady / dense:.2f}" if steady is not None else "n/a"
            lines.append(f"| {n} | {label} | {c['prompt_tokens']} | {c['peak_blocks']} | {steady} | {ratio} |")
    lines += ["", f"Burst of {r['burst']['dense']['requests']} concurrent {list(r['cells'])[-1]}-token requests "
                  f"against {r['pool_blocks']} blocks, {r['burst_decode_tokens']} decoded tokens each (vLLM prefills "
                  "one long prompt at a time within the step's token budget, so requests pile up only while "
                  "others decode):", "", "| policy | most running at once | output tokens/s | wall s |",
              "|---|---|---|---|"]
    for label, b in r["burst"].items():
        lines.append(f"| {label} | {b['max_running']} | {b['output_tokens_per_s']} | {b['wall_s']} |")
    q = r["quality"]
    if "error" in q:
        lines += ["", f"Quick quality suite: not measured ({q['error']})."]
    else:
        lines += ["", f"Quick quality suite ({', '.join(q['tasks'])}, 2 samples of 1024 tokens, mean score): dense "
                      f"{q['dense']}, {main} at {q['budget']} {q['casakv']}."]
    dense = max(1, r['dense_blocks_per_request'])
    lines += ["", f"Headline ({main}): {r['casakv_blocks_per_request']} steady blocks per long request against "
                  f"{r['dense_blocks_per_request']} dense ({r['casakv_blocks_per_request'] / dense:.2f}x), peak "
                  f"{r['casakv_peak_blocks_per_request']} against {r['dense_peak_blocks_per_request']} "
                  f"({r['casakv_peak_blocks_per_request'] / max(1, r['dense_peak_blocks_per_request']):.2f}x); "
                  f"{r['max_concurrent_casakv']} against {r['max_concurrent_dense']} requests running at once.", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, b in r["burst"].items():
        ts, blocks = zip(*b["usage"]) if b["usage"] else ((), ())
        ax.plot(ts, blocks, label=f"{label} (at most {b['max_running']} running)")
    ax.axhline(r["pool_blocks"], color="grey", linestyle=":", label="pool")
    ax.set_xlabel("seconds since the burst started")
    ax.set_ylabel("KV blocks held")
    ax.set_title(f"{r['burst']['dense']['requests']} concurrent long requests, demo model, CPU build")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
