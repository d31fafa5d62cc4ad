"""Issue 15's new-user check: `vllm serve <demo model> --attention-backend casakv --additional-config
'{"casakv": {"policy": "casakv", "kv_ratio": 0.25}}'`, a question over a ~6k-token document and a chat question;
prints the answers, `vllm:kv_cache_usage_perc` while the long request decodes (against a dense server's), and
the casakv series of `/metrics` (heads per pattern, re-profiles, freed blocks).  The long request generates 300
tokens, past its first re-profile; the chat prompt is shorter than `kv_min` (128), so it is kept whole.
Usage: .venv/bin/python scripts/new_user_casakv.py"""
import json
import re
import statistics

from casakv_vllm.tools.bench.cpu import prompts, timed_completion
from casakv_vllm.tools.bench.memory import Sampler
from casakv_vllm.tools.demo_model import demo_model_path
from casakv_vllm.tools.serving import VllmServer, cpu_env

text = prompts(1, 6000, seed=42)[0]
for name, extra in (("dense", []),
                    ("casakv", ["--additional-config", json.dumps({"casakv": {"policy": "casakv", "kv_ratio": 0.25}})])):
    with VllmServer(model=demo_model_path(), attention_backend="casakv", extra_args=["--max-model-len", "8192"] + extra,
                    env=cpu_env()) as server:
        with Sampler(server) as s:
            r = timed_completion(server, text, 300)  # past the first re-profile (every 256 generated tokens)
        late = [u for t, u, _ in s.samples if r["prefill_s"] + r["decode_s"] / 2 <= t <= r["prefill_s"] + r["decode_s"]]
        print(f"{name}: {r['prompt_tokens']} prompt tokens, first token {r['prefill_s']:.1f} s; "
              f"vllm:kv_cache_usage_perc during decode: median {statistics.median(late):.5f}", flush=True)
        answer = server.chat("What is the capital of France? Answer in one sentence.", max_tokens=24)
        print(f"{name} chat ({answer['usage']['prompt_tokens']} prompt tokens): "
              f"{answer['choices'][0]['message']['content']!r}")
        metrics = server.get_text("/metrics")
        for line in metrics.splitlines():
            if re.match(r"casakv_(heads|reprofile_total|reprofile_checks_total|kv_blocks_freed_total|compression_ratio_sum)", line):
                print("  ", line)
