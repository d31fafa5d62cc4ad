"""casakv's decode re-profiling against the decode step, on the CPU build (demo model, 7k prompts, 4x).

Re-profiling runs at a compaction event every ``reprofile_interval`` generated tokens: per layer, the event
query's recall over the live cache against the summaries of the evicted blocks (``estimated_recall``) and
the program update.  This prints (1) that work per layer, timed on the live cache a 7k prompt keeps at 4x,
(2) the decode step of the same requests measured in-process (casakv at 4x, ``(t(1 + G tokens) - t(1 token))
/ G`` over fresh prompts), and (3) the amortised share: ``layers x (1) / interval`` over (2).

    .venv/bin/python scripts/reprofile_cost_cpu.py | tee docs/benchmarks/reprofile-cpu.txt
"""
import os
import platform
import statistics
import subprocess
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # stdout is the record: no engine logs in it

PROMPT, GEN, ROUNDS = 7000, 64, 2


def reprofile_ms(hq: int, hkv: int, dim: int, prompt: int, repeats: int = 30) -> float:
    """Median ms of one layer's re-profile of one request (the first 5 calls are warm-up)."""
    import torch

    from casakv_vllm.observe.estimate import FULL
    from casakv_vllm.policies.casakv import estimated_recall, evicted_summary

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(hkv, prompt, dim, generator=gen).bfloat16()
    keep = torch.rand(hkv, prompt, generator=gen) < 0.25 * 1.25
    summary = evicted_summary(keys, keep)
    kept = int(keep.sum(1).max())
    live = keys[:, :kept].contiguous()
    q = torch.randn(hq, 1, dim, generator=gen)
    allowed = torch.ones(hkv, 1, kept, dtype=torch.bool)
    program = torch.zeros(hkv, dtype=torch.long)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        recall = estimated_recall(q, live, allowed, summary, dim ** -0.5)
        torch.where(recall < 0.95, FULL, program)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[5:])


def main():
    from vllm import LLM, SamplingParams

    from casakv_vllm.tools.bench.cpu import prompts
    from casakv_vllm.tools.demo_model import demo_model_path

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"$ .venv/bin/python scripts/reprofile_cost_cpu.py   ({time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, commit {commit})", flush=True)
    llm = LLM(model=demo_model_path(), attention_backend="casakv", max_model_len=8192, dtype="bfloat16",
              max_num_seqs=4, block_size=16, max_num_batched_tokens=512, gpu_memory_utilization=0.2)
    cfg = llm.llm_engine.model_config.hf_config
    layers, hq, hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // hq
    xargs = {"casakv_policy": "casakv", "casakv_kv_ratio": 0.25}
    interval = 256  # CasakvParams.reprofile_interval's default
    texts = iter(prompts(2 * ROUNDS, PROMPT, seed=33))
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    steps = []
    for _ in range(ROUNDS):
        spans = {}
        for tokens in (1, 1 + GEN):
            t0 = time.perf_counter()
            llm.generate([next(texts)], SamplingParams(max_tokens=tokens, ignore_eos=True, extra_args=xargs),
                         use_tqdm=False)
            spans[tokens] = time.perf_counter() - t0
        steps.append(1e3 * (spans[1 + GEN] - spans[1]) / GEN)
        print(f"decode step (casakv 4x, {PROMPT}-token prompt): {steps[-1]:.2f} ms", flush=True)
    step = statistics.median(steps)
    per_layer = reprofile_ms(hq, hkv, dim, PROMPT)
    share = layers * per_layer / interval / step
    print(f"re-profile of one request at one layer: {per_layer:.3f} ms ({hkv} KV heads, {hq} query heads, "
          f"live cache of a {PROMPT}-token prompt at 4x)")
    print(f"re-profile per step, amortised: {layers} layers x {per_layer:.3f} ms / {interval} tokens = "
          f"{layers * per_layer / interval:.4f} ms, {share:.3%} of the {step:.2f} ms decode step")


if __name__ == "__main__":
    main()
