"""Repeat the kernel benchmark's prefill cells at one length (the same code as
``casakv bench kernels``: ``bench_prefill``), to check how stable the ratios to
FlexAttention are from run to run.  GPU only.

Usage: python scripts/prefill_repeat.py [--n 32768] [--runs 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefill_repeat.py needs a CUDA GPU")
    from torch.nn.attention.flex_attention import flex_attention

    from casakv_vllm.tools.bench.kernels import bench_prefill

    torch._dynamo.config.recompile_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for run in range(a.runs):
        gen = torch.Generator(device="cuda").manual_seed(run)
        for r in bench_prefill(a.n, ("causal", "a-shape", "vertical-slash"), flex, gen, 200):
            rows.append(dict(run=run, **asdict(r)))
            print(f"run {run} N={a.n} {r.mask}: casakv {r.casakv_ms:.3f} ms, Flex {r.flex_ms:.3f} ms, "
                  f"casakv/Flex {r.casakv_ms / r.flex_ms:.3f}  rounds {r.casakv_rounds_ms} vs {r.flex_rounds_ms}",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
