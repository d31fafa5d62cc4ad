"""A/B of casakv's keep order on the quality suite: ``vote_share`` (the share of a head's budget its
most-voted tokens take before its pattern's tokens), side by side with snapkv, both protocols.

    python scripts/casakv_keep_order_ab.py --shares 0,0.5,1 --samples 8 | tee docs/benchmarks/casakv-keep-order-ab-cpu.txt

One server; every variant runs over the same samples (same seed).  Prints each cell's per-task scores
and average; the defaults for ``vote_share`` come from this run, not from the eval's seeds alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

from casakv_vllm.tools.quality.cli import _model, _server
from casakv_vllm.tools.quality.runner import PROTOCOLS, EvalConfig
from casakv_vllm.tools.quality.runner import run_quality
from casakv_vllm.tools.quality.tasks import TASKS, make_samples, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shares", default="0,0.5,1")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--budget", default="4x")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="{}", help="JSON policy_params every casakv variant adds, e.g. '{\"floor\": 1}'")
    ap.add_argument("--skip-snapkv", action="store_true")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset of aware,agnostic")
    ap.add_argument("--variants", default=None, help="JSON list of policy_params, one casakv variant each (instead "
                    "of --shares), e.g. '[{\"across_layers\": true}]'")
    args = ap.parse_args()
    extra = json.loads(args.extra)
    model = _model(None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    protocols = tuple(p for p in PROTOCOLS if p in args.protocols.split(","))
    flags = (f" --extra '{args.extra}'" if extra else "") + (" --skip-snapkv" if args.skip_snapkv else "") + (
        f" --protocols {','.join(protocols)}" if protocols != PROTOCOLS else "")
    chosen = f"--variants '{args.variants}'" if args.variants else f"--shares {args.shares}"
    print(f"$ python scripts/casakv_keep_order_ab.py {chosen} --samples {args.samples}{flags} "
          f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, commit {commit})", flush=True)
    samples = {t: make_samples(t, args.samples, args.seed, None) for t in TASKS}
    variants = [] if args.skip_snapkv else [("snapkv", EvalConfig("snapkv", args.budget))]
    sets = json.loads(args.variants) if args.variants else [{"vote_share": float(s)} for s in args.shares.split(",")]
    for one in sets:
        params = {**extra, **one}
        label = "casakv " + " ".join(f"{k}={v}" for k, v in params.items())
        variants.append((label, EvalConfig("casakv", args.budget, tuple(sorted(params.items())))))
    server = _server(None, model)
    try:
        for label, cfg in variants:
            t0 = time.monotonic()
            records, _ = run_quality(server, samples, [EvalConfig("full", "full"), cfg], 8, None, None, protocols,
                                     tokenizer(model))
            for protocol in protocols:
                mine = [r for r in records if r["policy"] == cfg.policy and r["protocol"] == protocol
                        and not r["task"].endswith("_kl")]
                tasks = " ".join(f"{r['task']}={r['score']:.2f}" for r in mine)
                avg = sum(r["score"] for r in mine) / max(1, len(mine))
                kl = [r["score"] for r in records if r["policy"] == cfg.policy and r["task"] == "longdoc_kl"
                      and r["protocol"] == protocol]
                print(f"{label:34s} {protocol:8s} avg {avg:.3f}  {tasks}  longdoc_kl "
                      f"{kl[0] if kl else float('nan'):.4f}", flush=True)
            print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
