"""Issue 14's acceptance check as a new user runs it: real `vllm serve --attention-backend casakv` servers (dense,
`--additional-config {"casakv": {"policy": "snapkv", "kv_ratio": 0.25}}`, and the same with
`"prefill_compression": true`), one 6k-token request each; prints `vllm:kv_cache_usage_perc` while it decodes, and
its peak.  Usage: .venv/bin/python scripts/new_user_compression.py"""
import json
import statistics
from casakv_vllm.tools.demo_model import demo_model_path
from casakv_vllm.tools.serving import VllmServer, cpu_env
from casakv_vllm.tools.bench.cpu import prompts
from casakv_vllm.tools.bench.memory import Sampler
from casakv_vllm.tools.bench.cpu import timed_completion

text = prompts(1, 6000, seed=42)[0]
SNAP = {"policy": "snapkv", "kv_ratio": 0.25}
for name, extra in (("dense", []), ("snapkv", ["--additional-config", json.dumps({"casakv": SNAP})]),
                    ("snapkv+prefill", ["--additional-config",
                                        json.dumps({"casakv": {**SNAP, "prefill_compression": True}})])):
    with VllmServer(model=demo_model_path(), attention_backend="casakv", extra_args=["--max-model-len", "8192"] + extra,
                    env=cpu_env()) as server:
        with Sampler(server) as s:
            r = timed_completion(server, text, 64)
        late = [u for t, u, _ in s.samples if r["prefill_s"] + r["decode_s"] / 2 <= t <= r["prefill_s"] + r["decode_s"]]
        print(f"{name}: {r['prompt_tokens']} prompt tokens; vllm:kv_cache_usage_perc during decode: median {statistics.median(late):.5f} over {len(late)} samples; peak {max(u for _, u, _ in s.samples):.5f}", flush=True)
