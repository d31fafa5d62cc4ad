"""``casakv eval patterns``: held-out attention recall and density of the online pattern estimator."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

NAME = "casakv eval patterns"


def add_parser(ev) -> None:
    """Register ``patterns`` under the ``eval`` subcommands ``ev``."""
    p = ev.add_parser("patterns", help="held-out attention recall and density of the online pattern "
                                       "estimator (the model in transformers on the CPU)")
    p.add_argument("--model", help="model folder (default: the demo model)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (quality tasks, seeds 5000+i)")
    p.add_argument("--context", type=int, default=7168, help="prompt tokens (at most the model's max positions)")
    p.add_argument("--chunk", type=int, help="also estimate per prefill chunk of this many tokens (default: "
                                             "only the whole prompt, estimated once from its last 64 queries)")
    p.add_argument("--threshold", type=float, default=0.95, help="the estimator's recall threshold of the headline")
    p.add_argument("--sweep", default="0.9,0.98", help="more thresholds to measure, comma-separated ('' for none)")
    p.add_argument("--no-block", dest="block", action="store_false",
                   help="leave out the variant whose block program sees the chunk's queries pooled per 64")
    p.add_argument("--rows", type=int, default=1024, help="held-out queries measured per chunk, evenly spaced (0: all)")
    p.add_argument("--json", help="write results JSON here")
    p.add_argument("--md", help="write the Markdown report here")
    p.add_argument("--plot", help="write the PNG plot here")
    p.set_defaults(func=cmd_patterns)

    def error(message: str) -> None:  # one line, no usage block
        print(f"{NAME}: {message}", file=sys.stderr)
        sys.exit(2)

    p.error = error


def _fail(msg: str) -> int:
    print(f"{NAME}: {msg}", file=sys.stderr)
    return 2


def _at_least(value: int, flag: str, low: int) -> int:
    if value < low:
        raise ValueError(f"{flag} must be >= {low} (got {value})")
    return value


def _thresholds(text: str, flag: str) -> list[float]:
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{flag} takes numbers in (0, 1] (got {item!r})") from None
        if not 0 < value <= 1:
            raise ValueError(f"{flag} takes numbers in (0, 1] (got {item})")
        out.append(value)
    return out


def parse(args: argparse.Namespace) -> dict:
    """Checked settings; ``ValueError`` with a one-line reason on bad input."""
    from casakv_vllm.tools.patterns.run import LAST_Q
    from casakv_vllm.tools.demo_model import model_folder

    prompts = _at_least(args.prompts, "--prompts", 1)
    context = _at_least(args.context, "--context", 2 * LAST_Q + 1)
    chunk = None if args.chunk is None else _at_least(args.chunk, "--chunk", LAST_Q + 1)
    if chunk is not None and chunk > context:
        raise ValueError(f"--chunk {chunk} is longer than --context {context}")
    rows = _at_least(args.rows, "--rows", 0)
    threshold = _thresholds(str(args.threshold), "--threshold")[0]
    sweep = [t for t in _thresholds(args.sweep, "--sweep") if t != threshold]
    model = model_folder(args.model)
    limit = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings")
    if limit and context > limit:
        raise ValueError(f"--context {context} is over the model's {limit} positions")
    return {"prompts": prompts, "context": context, "chunk": chunk, "rows": rows, "threshold": threshold,
            "sweep": sorted(set(sweep)), "block": args.block, "model": model}


def cmd_patterns(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from casakv_vllm.tools.patterns import report
    from casakv_vllm.tools.patterns.measure import Variant
    from casakv_vllm.tools.patterns.run import held_out_texts, measure, settings
    from casakv_vllm.tools.quality.report import versions

    try:
        cfg = parse(args)
    except ValueError as err:
        return _fail(str(err))
    command = "casakv " + shlex.join(sys.argv[1:]) if sys.argv[1:] else NAME
    variants = [Variant(t, block=False) for t in [cfg["threshold"], *cfg["sweep"]]]
    if cfg["block"]:
        variants.append(Variant(cfg["threshold"], block=True))
    t0 = time.monotonic()
    texts = held_out_texts(cfg["prompts"], cfg["context"])
    with tqdm(total=len(texts), desc="eval patterns", unit="prompt", dynamic_ncols=True) as bar:
        def done(info: dict) -> None:
            bar.set_postfix_str(f"{info['tokens']} tokens, {info['seconds']:.0f}s")
            bar.update()

        heads, info = measure(cfg["model"], texts, cfg["context"], variants, cfg["chunk"], cfg["rows"],
                              report.TARGET_DENSITY, done)
    obj = report.result(heads, ("prompt", variants[0].name), benchmark=NAME, command=command,
                        wall_seconds=round(time.monotonic() - t0, 1), versions=versions(),
                        machine=f"{platform.processor() or platform.machine()}, {_cpus()} CPUs", model=cfg["model"],
                        settings=settings(variants, **{k: cfg[k] for k in ("prompts", "context", "chunk", "rows")}),
                        prompts=info)
    report.write(obj, heads, args.json, args.md, args.plot)
    print(report.markdown(obj) if not args.md else report.verdict(report.headline_of(obj)))
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
