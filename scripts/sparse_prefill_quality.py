"""What casakv's CPU sparse prefill does to retrieval: the quality suite's retrieval tasks, each request
prefilling its own prompt (prefix caching off, so the sparse chunks are really computed), side by side:
dense, casakv at 4x, and casakv at 4x with ``sparse_prefill`` (chunks from ``sparse_min_len`` on; sparse
prefill needs a request that compacts, so it is not measured alone).

    .venv/bin/python scripts/sparse_prefill_quality.py --samples 8 | tee docs/benchmarks/sparse-prefill-quality-cpu.txt

(``eval quality`` cannot measure this: its policies read a prompt the full-attention request prefilled,
through the prefix cache.)
"""
import argparse
import json
import os
import platform
import subprocess
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # stdout is the record: no engine logs in it

TASKS = ("passkey", "multikey", "copy", "fewshot")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--sparse-min-len", type=int, default=1024)
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    from casakv_vllm.tools.demo_model import demo_model_path
    from casakv_vllm.tools.quality.scoring import score_retrieval
    from casakv_vllm.tools.quality.tasks import make_samples

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"$ .venv/bin/python scripts/sparse_prefill_quality.py --samples {args.samples} --context {args.context} "
          f"--sparse-min-len {args.sparse_min_len}   ({time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, commit {commit})", flush=True)
    llm = LLM(model=demo_model_path(), attention_backend="casakv", max_model_len=8192, dtype="bfloat16",
              max_num_seqs=4, block_size=16, max_num_batched_tokens=512, enable_prefix_caching=False,
              gpu_memory_utilization=0.2)
    sparse = json.dumps({"sparse_prefill": True, "sparse_min_len": args.sparse_min_len})
    configs = {
        "dense": None,
        "casakv 4x": {"casakv_policy": "casakv", "casakv_kv_ratio": 0.25},
        "casakv 4x + sparse prefill": {"casakv_policy": "casakv", "casakv_kv_ratio": 0.25,
                                       "casakv_policy_params": sparse},
    }
    for task in TASKS:
        samples = make_samples(task, args.samples, 0, args.context)
        for name, xargs in configs.items():
            t0 = time.perf_counter()
            outs = llm.generate([s.prompt for s in samples],
                                SamplingParams(max_tokens=samples[0].max_tokens, temperature=0.0, extra_args=xargs),
                                use_tqdm=False)
            scores = [score_retrieval(task, o.outputs[0].text, s.answer) for o, s in zip(outs, samples)]
            print(f"{task:9s} {name:28s} score {sum(scores) / len(scores):.3f} (n={len(scores)}, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
