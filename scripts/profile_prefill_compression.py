"""In-process time to first token of a 7k-token prompt on the CPU build: dense, then snapkv at 4x with
prefill compression (twice), same engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, block size 16, 512-token
prefill chunks), with a cProfile of the last run.
Usage: .venv/bin/python scripts/profile_prefill_compression.py"""
import os
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main():
    import cProfile
    import pstats

    from vllm import LLM, SamplingParams

    from casakv_vllm.tools.bench.cpu import prompts
    from casakv_vllm.tools.demo_model import demo_model_path

    llm = LLM(model=demo_model_path(), attention_backend="casakv", max_model_len=8192, dtype="bfloat16",
              max_num_seqs=4, block_size=16, max_num_batched_tokens=512)
    texts = prompts(3, 7000, seed=9)
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    compress = {"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25, "casakv_prefill_compression": True}
    profile = cProfile.Profile()
    for i, (text, xargs) in enumerate(zip(texts, [None, compress, compress])):
        if i == 2:
            profile.enable()
        t0 = time.perf_counter()
        llm.generate([text], SamplingParams(max_tokens=1, extra_args=xargs), use_tqdm=False)
        print(f"TTFT {'snapkv+prefill' if xargs else 'dense'}: {time.perf_counter() - t0:.2f} s", flush=True)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
