"""``casakv eval quality`` and ``casakv eval search-heads``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

EVAL_SERVER_ARGS = ["--max-model-len", "8192", "--dtype", "float32", "--block-size", "16",
                    "--max-num-batched-tokens", "2048", "--max-num-seqs", "16", "--enable-prefix-caching"]


def add_parser(sub) -> None:
    from casakv_vllm.tools.quality.runner import BUDGETS, POLICIES
    from casakv_vllm.tools.quality.tasks import TASKS

    p = sub.add_parser("eval", help="quality evaluation: `casakv eval quality`, `casakv eval search-heads`, "
                                    "`casakv eval patterns`")
    ev = p.add_subparsers(dest="eval_target", metavar="TARGET", required=True)

    q = ev.add_parser("quality", help="every policy x budget on offline long-context tasks, through a real server")
    q.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated (default: {','.join(POLICIES)}); a name ending in +prefill also compresses "
                        "while the prompt is prefilled (e.g. snapkv+prefill; aware protocol only)")
    q.add_argument("--protocol", choices=("aware", "agnostic", "both"), default="both",
                   help="aware: the policy sees the question while it compresses (the whole prompt is prefilled); "
                        "agnostic: the context is compressed before the question arrives, which then attends "
                        "through the compressed cache; both (default): every policy under each, side by side")
    q.add_argument("--budgets", default=",".join(BUDGETS), help="token budgets and/or reduction factors, e.g. 256,4x")
    q.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default: {','.join(TASKS)})")
    q.add_argument("--samples", type=int, default=20, help="samples per task (at most, with --max-minutes)")
    q.add_argument("--max-minutes", type=float,
                   help="start no round (one sample of every task) after this many minutes: every task keeps the "
                        "same number of samples; outputs are rewritten after every round")
    q.add_argument("--context", type=int, help="context tokens per prompt (default: each task's calibrated length)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--model", help="model folder (default: the demo model)")
    q.add_argument("--url", help="use a running casakv server (prefix caching on) instead of starting one")
    q.add_argument("--heads", help="static-heads assignment JSON (default: searched now, written beside --json)")
    q.add_argument("--concurrency", type=int, default=8, help="requests in flight per sample")
    q.add_argument("--json", help="write results JSON here")
    q.add_argument("--md", help="write the Markdown table here")
    q.add_argument("--plot", help="write the Pareto plot (PNG) here")
    q.add_argument("--rows", help="write every sample's generation and score here (JSON lines)")
    q.set_defaults(func=cmd_quality)

    s = ev.add_parser("search-heads", help="offline search of the static per-head pattern assignment")
    s.add_argument("--out", required=True, help="assignment JSON to write")
    s.add_argument("--model", help="model folder (default: the demo model)")
    s.add_argument("--prompts", type=int, default=6, help="calibration prompts (seed 1000+, disjoint from eval)")
    s.add_argument("--context", type=int, default=2048)
    s.add_argument("--budget-fraction", type=float, default=0.125)
    s.set_defaults(func=cmd_search_heads)

    from casakv_vllm.tools.patterns.cli import add_parser as add_patterns_parser

    add_patterns_parser(ev)


def _fail(msg: str) -> int:
    print(f"casakv eval: {msg}", file=sys.stderr)
    return 2


def _model(arg: str | None) -> str:
    from casakv_vllm.tools.demo_model import model_folder

    return model_folder(arg)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)


def cmd_search_heads(args: argparse.Namespace) -> int:
    from casakv_vllm.tools.quality.search_heads import search, write_assignment
    from casakv_vllm.tools.quality.tasks import TASKS, make_samples

    if not 0 < args.budget_fraction < 1:
        return _fail("--budget-fraction must be in (0, 1)")
    try:
        model = _model(args.model)
    except ValueError as err:
        return _fail(str(err))
    texts = [s.prompt for i in range(args.prompts)
             for s in make_samples(TASKS[i % len(TASKS)], 1, seed=1000 + i, context_tokens=args.context)]
    with _progress(len(texts), "search-heads") as bar:
        result = search(model, texts, args.budget_fraction, progress=bar.update)
    path = write_assignment(result, args.out)
    counts = {t: sum(row.count(t) for row in result["heads"]) for t in result["types"]}
    print(f"wrote {path}: {counts}")
    return 0


def _parse_list(text: str, allowed, what: str, suffix: str = "") -> list[str]:
    """Comma-separated names from ``allowed`` (each may end in ``suffix``)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if allowed is not None and (x.removesuffix(suffix) if suffix else x) not in allowed]
    if not items or bad:
        raise ValueError(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
    return items


def cmd_quality(args: argparse.Namespace) -> int:
    from casakv_vllm.tools.quality import report
    from casakv_vllm.tools.quality.runner import (POLICIES, PREFILL, PROTOCOLS, budget_fields, eval_configs,
                                                  run_quality)
    from casakv_vllm.tools.quality.tasks import TASKS, make_samples, tokenizer

    try:
        policies = _parse_list(args.policies, POLICIES, "policy", PREFILL)
        if f"full{PREFILL}" in policies:
            raise ValueError(f"full{PREFILL}: full attention does not compress")
        tasks = _parse_list(args.tasks, TASKS, "task")
        if "longdoc" in tasks and "full" not in policies:  # longdoc is scored against full attention's output
            policies = ["full", *policies]
        budgets = _parse_list(args.budgets, None, "budget")
        for b in budgets:
            budget_fields(b)
        if args.samples < 1:
            raise ValueError("--samples must be >= 1")
        model = _model(args.model)
    except ValueError as err:
        return _fail(str(err))
    heads = args.heads
    if "static-heads" in policies and not heads:
        heads = str(Path(args.json or "quality.json").with_name("quality-static-heads.json"))
        rc = cmd_search_heads(argparse.Namespace(out=heads, model=model, prompts=6, context=2048, budget_fraction=0.125))
        if rc:
            return rc
    if heads and not Path(heads).is_file():
        return _fail(f"--heads {heads!r}: no such file")
    configs = eval_configs(policies, budgets, str(Path(heads).resolve()) if heads else None)
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    samples = {t: make_samples(t, args.samples, args.seed, args.context) for t in tasks}
    command = "casakv " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "casakv eval quality"
    t0 = time.monotonic()
    deadline = t0 + 60 * args.max_minutes if args.max_minutes else None
    settings = {"samples_per_task": args.samples, "seed": args.seed, "server_args": EVAL_SERVER_ARGS, "heads": heads,
                "protocols": list(protocols), "max_minutes": args.max_minutes}

    def write(records, rows, final: bool = False) -> None:
        done = {t: len({r["id"] for r in rows if r["task"] == t}) for t in tasks}
        extra = {**settings, "samples_done": done, "seconds": round(time.monotonic() - t0), "finished": final}
        _write(args, records, rows, command, model, extra)

    server = _server(args.url, model)
    try:
        with _progress(sum(len(v) for v in samples.values()), "eval quality") as bar:
            def done(task, recs):
                bar.write(f"[{task}] " + ", ".join(f"{r['policy']}@{r['budget']}/{r['protocol']}={r['score']:.2f}"
                                                    for r in recs if not r["task"].endswith("_kl")))
            records, rows = run_quality(server, samples, configs, args.concurrency, bar.update, done, protocols,
                                        tokenizer(model), deadline, write)
    finally:
        if not args.url:
            server.stop()
    write(records, rows, final=True)
    if not (args.json or args.md or args.plot):
        print(report.markdown(records, command=command, model=model))
    return 0


def _write(args, records, rows, command, model, settings) -> None:
    """The report (JSON with the run's settings beside the results, Markdown, plot) and the rows."""
    from casakv_vllm.tools.quality import report

    if not records:
        return
    report.write_report(records, md=args.md, json_path=args.json, png=args.plot, command=command, model=model)
    if args.json:
        obj = json.loads(Path(args.json).read_text())
        obj["settings"] = settings
        Path(args.json).write_text(json.dumps(obj, indent=1) + "\n")
    if args.rows:
        Path(args.rows).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _server(url: str | None, model: str):
    from casakv_vllm.tools.serving import VllmServer, cpu_env

    if url:
        from urllib.parse import urlparse

        return VllmServer(model=model, port=urlparse(url).port or 80)
    env = {**cpu_env(4), "VLLM_CPU_CI_ENV": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    print("[eval] starting vllm serve --attention-backend casakv (loopback) ...", file=sys.stderr, flush=True)
    return VllmServer(model=model, extra_args=EVAL_SERVER_ARGS, env=env).start()
