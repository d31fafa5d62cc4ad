"""In-process A/B of a 4.45k-token prefill, stock CPU_ATTN vs casakv dense (same engine, VLLM_ENABLE_V1_MULTIPROCESSING=0),
with a cProfile of the last run.  Usage: .venv/bin/python scripts/profile_cpu_prefill.py stock|casakv"""
import os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
def main():
    from casakv_vllm.tools.demo_model import demo_model_path
    from casakv_vllm.tools.bench.cpu import prompts
    backend = sys.argv[1] if sys.argv[1] != "stock" else None
    llm = LLM(model=demo_model_path(), attention_backend=backend, max_model_len=8192, dtype="bfloat16", max_num_seqs=4)
    texts = prompts(4, 4450, seed=9)
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    import cProfile, pstats
    pr = cProfile.Profile()
    t = []
    for i, text in enumerate(texts):
        if i == 3: pr.enable()
        t0 = time.perf_counter(); llm.generate([text], SamplingParams(max_tokens=1), use_tqdm=False); t.append(time.perf_counter() - t0)
    pr.disable()
    print("PREFILL", sys.argv[1], [round(x, 3) for x in t])
    st = pstats.Stats(pr); st.sort_stats("tottime").print_stats(8); st.sort_stats("cumtime").print_stats("casakv_vllm", 12); st.print_callers("_C\\.}")
if __name__ == "__main__":
    main()
