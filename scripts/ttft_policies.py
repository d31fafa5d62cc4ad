"""In-process time to first token of 7k-token prompts on the CPU build, policies side by side in one engine
(VLLM_ENABLE_V1_MULTIPROCESSING=0, block size 16, 512-token prefill chunks, bf16): dense, casakv at 4x,
casakv at 4x with chunk-wise prefill compression, snapkv at 4x with it, casakv at 4x with sparse prefill
(``sparse_prefill``: chunks from 2048 tokens on computed under their estimated patterns); ``--rounds`` rounds in rotation, a
fresh prompt per request (no prefix-cache hits).  The engine runs in this process, so the process's CPU
time per request (all threads) is printed beside the wall time: on a shared machine it moves less.
Usage: .venv/bin/python scripts/ttft_policies.py [--rounds 2]"""
import argparse
import os
import platform
import subprocess
import statistics
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # stdout is the record: no engine logs in it

CONFIGS = {
    "dense": None,
    "casakv": {"casakv_policy": "casakv", "casakv_kv_ratio": 0.25},
    "casakv+prefill": {"casakv_policy": "casakv", "casakv_kv_ratio": 0.25, "casakv_prefill_compression": True},
    "snapkv+prefill": {"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25, "casakv_prefill_compression": True},
    "casakv+sparse": {"casakv_policy": "casakv", "casakv_kv_ratio": 0.25,
                      "casakv_policy_params": '{"sparse_prefill": true}'},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"$ .venv/bin/python scripts/ttft_policies.py --rounds {args.rounds}   ({time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, commit {commit})", flush=True)
    from vllm import LLM, SamplingParams

    from casakv_vllm.tools.bench.cpu import prompts
    from casakv_vllm.tools.demo_model import demo_model_path

    llm = LLM(model=demo_model_path(), attention_backend="casakv", max_model_len=8192, dtype="bfloat16",
              max_num_seqs=4, block_size=16, max_num_batched_tokens=512, gpu_memory_utilization=0.2)
    texts = iter(prompts(args.rounds * len(CONFIGS), 7000, seed=21))
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, xargs in CONFIGS.items():
            text = next(texts)
            t0, c0 = time.perf_counter(), time.process_time()
            out = llm.generate([text], SamplingParams(max_tokens=1, extra_args=xargs), use_tqdm=False)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"round {r} {name}: TTFT {times[name][-1]:.2f} s, CPU {cpu[name][-1]:.2f} s "
                  f"({len(out[0].prompt_token_ids)} prompt tokens)", flush=True)
    for name, ts in times.items():
        print(f"{name}: median TTFT {statistics.median(ts):.2f} s, median CPU time {statistics.median(cpu[name]):.2f} s "
              f"over {len(ts)}", flush=True)


if __name__ == "__main__":
    main()
