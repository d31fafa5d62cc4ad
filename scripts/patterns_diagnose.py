"""Why held-out recall of `vertical` heads falls short (docs/benchmarks/patterns-cpu.md): one held-out prompt.

For each layer, the estimator (threshold 0.95, no block program, as ``casakv eval patterns`` headlines it)
picks every KV head's program from the prompt's last 64 queries.  For the heads it gives ``vertical``:
where their columns lie (share in the last 256 positions, i.e. next to the queries that chose them), their
held-out recall per quarter of the prompt's query positions, and the recall / density of the same columns
plus a local window of 64 (what a slash program would add).

    PYTHONPATH=. python scripts/patterns_diagnose.py [--prompt I] [--context N] > out.txt
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from casakv_vllm.observe.estimate import PROGRAMS, VERTICAL, EstimatorConfig, estimate_patterns
from casakv_vllm.tools.patterns.measure import recall_density
from casakv_vllm.tools.patterns.run import LAST_Q, held_out_texts, load
from casakv_vllm.tools.quality.search_heads import capture_qk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", type=int, default=0, help="index of the held-out prompt (seed 5000 + i)")
    ap.add_argument("--context", type=int, default=7168)
    ap.add_argument("--rows", type=int, default=256, help="held-out rows measured per quarter")
    args = ap.parse_args()
    if args.model is None:
        from casakv_vllm.tools.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    prompt = held_out_texts(args.prompt + 1, args.context)[args.prompt]
    model, tok, scale = load(args.model)
    ids = tok(prompt["text"], return_tensors="pt").input_ids[:, :args.context]
    length = ids.shape[1]
    quarters = [(i * (length - LAST_Q) // 4, (i + 1) * (length - LAST_Q) // 4) for i in range(4)]
    print(f"prompt {prompt['id']} ({length} tokens); vertical heads at threshold 0.95, no block program")
    print("layer head | columns  in last 256 | held-out recall per quarter of positions | all   density | "
          "+window 64: recall density")
    for layer, (q, k) in enumerate(capture_qk(model, ids)):
        est = estimate_patterns(q[:, -LAST_Q:], k, 0, scale, EstimatorConfig(threshold=0.95))
        pb = est.patterns
        local = replace(pb, window=torch.where(est.program == VERTICAL, 64, pb.window[0]).view(1, -1).int())
        per_quarter = []
        for lo, hi in quarters:
            pos = torch.linspace(lo, hi - 1, args.rows).round().long().unique()
            per_quarter.append(recall_density(q[:, pos], k, pos, scale, [pb])[0][0])
        pos = torch.linspace(0, length - LAST_Q - 1, 4 * args.rows).round().long().unique()
        (rec, rec_local), (den, den_local) = recall_density(q[:, pos], k, pos, scale, [pb, local])
        for h, prog in enumerate(est.program.tolist()):
            if prog != VERTICAL:
                print(f"{layer:5d} {h:4d} | {PROGRAMS[prog]}")
                continue
            cols = pb.vertical[0, h][pb.vertical[0, h] >= 0]
            recent = float((cols >= length - 256).float().mean())
            quarter = " ".join(f"{float(r[h]):.3f}" for r in per_quarter)
            print(f"{layer:5d} {h:4d} | {len(cols):7d}  {recent:11.2f} | {quarter:40s} | {float(rec[h]):.3f} "
                  f"{float(den[h]):.4f} | {float(rec_local[h]):.3f} {float(den_local[h]):.4f}")


if __name__ == "__main__":
    main()
