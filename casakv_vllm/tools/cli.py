"""The ``casakv`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from casakv_vllm import __version__


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from casakv_vllm.tools.demo_model import ensure_demo_model

    path = ensure_demo_model(Path(args.cache_dir) if args.cache_dir else None, force=args.force)
    print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from casakv_vllm.tools.demo_model import demo_model_path
    from casakv_vllm.tools.serving import VllmServer, cpu_env

    model = args.model or demo_model_path()
    extra = ["--max-model-len", "8192", "--dtype", "bfloat16"]
    if args.casakv_config:
        extra += ["--additional-config", json.dumps({"casakv": json.loads(args.casakv_config)})]
    print(f"[demo] model: {model}")
    print(f"[demo] starting: vllm serve <model> --attention-backend casakv (127.0.0.1) ...", flush=True)
    t0 = time.monotonic()
    with VllmServer(model=model, extra_args=extra, env=cpu_env()) as server:
        print(f"[demo] server ready in {time.monotonic() - t0:.0f}s at {server.url} (log: {server.log_path})")
        print(f"[demo] request: {args.prompt!r}")
        t1 = time.monotonic()
        reply = server.chat(args.prompt, max_tokens=args.max_tokens)
        text = reply["choices"][0]["message"]["content"]
        print(f"[demo] reply ({time.monotonic() - t1:.1f}s): {text}")
        print("[demo] casakv metrics:")
        lines: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # workers publish every 0.1 s: wait until settled
            now = server.casakv_metrics()
            if now == lines and any(ln.startswith("casakv_info") for ln in now):
                break
            lines = now
            time.sleep(0.5)
        for line in lines or ["(no casakv_ series on /metrics)"]:
            print("   ", line)
        if args.compression:
            _demo_compression(server)
    print("[demo] server stopped")
    return 0


def _demo_compression(server) -> None:
    """One long request dense, then under snapkv at 4x: the KV pool share each holds while decoding."""
    from casakv_vllm.tools.bench.cpu import prompts
    from casakv_vllm.tools.bench.memory import one_request

    text = prompts(1, 2000, seed=7)[0]
    print("[demo] compression: one ~2000-token request dense, then with vllm_xargs "
          '{"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25} ...', flush=True)
    held = {}
    for label, xargs in (("dense", None), ("snapkv 4x", {"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25})):
        # a different first line: no prefix-cache hit on the other request (a shared prefix stays dense)
        cell = one_request(server, f"({label})\n\n" + text, 32, xargs, pool=10**6)  # usage in millionths
        held[label] = cell["steady_blocks"] / 10**4
        print(f"[demo]   {label:>9}: {cell['prompt_tokens']} prompt tokens, KV cache usage while decoding "
              f"{held[label]:.3f}% of the pool")
    if held["dense"]:
        print(f"[demo]   snapkv at 4x holds {held['snapkv 4x'] / held['dense']:.2f}x the KV blocks of dense "
              "(its emptied blocks went back to vLLM's pool)")


def build_parser() -> argparse.ArgumentParser:
    from casakv_vllm.tools.bench.memory import POLICIES as MEMORY_POLICIES

    parser = argparse.ArgumentParser(
        prog="casakv",
        description="casakv-vllm: CASAK-V sparse attention and KV-cache compression for vLLM "
        "(serve with: vllm serve MODEL --attention-backend casakv).",
    )
    parser.add_argument("--version", action="version", version=f"casakv-vllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo-model", help="make the bundled SmolLM2-135M-Instruct available offline; print its path")
    p.add_argument("--cache-dir", help="where to put the HF folder (default: $CASAKV_CACHE or ~/.cache/casakv)")
    p.add_argument("--force", action="store_true", help="convert again even if present")
    p.set_defaults(func=_cmd_demo_model)

    p = sub.add_parser("demo", help="serve the demo model with casakv on loopback, send one chat request, print reply and metrics")
    p.add_argument("--model", help="model path (default: the demo model)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--casakv-config", help='JSON object of casakv settings, e.g. \'{"policy": "dense"}\'')
    p.add_argument("--no-compression", dest="compression", action="store_false",
                   help="skip the long request that shows KV compression")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks: `casakv bench kernels` (GPU), `casakv bench cpu` (CPU serving)")
    bench_sub = p.add_subparsers(dest="bench_target", metavar="TARGET", required=True)
    pk = bench_sub.add_parser("kernels", help="sparse prefill/decode kernels vs SDPA and FlexAttention (needs a CUDA GPU)")
    pk.add_argument("--json", required=True, help="where to write the results JSON")
    pk.add_argument("--md", help="also write a Markdown summary here")
    pk.add_argument("--quick", action="store_true", help="one size per kind (smoke run)")
    pk.add_argument("--vllm-kernel", metavar="DIR",
                    help="time vLLM's Triton kernel from a folder staged by scripts/stage_vllm_kernel.py "
                         "(default: the installed vLLM, if any)")
    pk.add_argument("--sections", default="decode,prefill,compacted,layer",
                    help="comma-separated: decode, prefill, compacted (decode over 4x-compacted caches), layer "
                         "(casakv's builder and impl with compaction; needs vLLM's Python layer), estimated "
                         "(prefill under estimated patterns, estimator included), served (casakv's sparse "
                         "prefill through its builder and impl; needs vLLM's Python layer)")
    pk.set_defaults(func=_cmd_bench_kernels)
    pc = bench_sub.add_parser("cpu", help="casakv's CPU path vs vLLM's CPU backend through two real servers, side by side")
    pc.add_argument("--json", help="where to write the results JSON")
    pc.add_argument("--md", help="also write a Markdown summary here")
    pc.add_argument("--runs", type=int, default=5, help="prompts per server, alternating between them (median reported)")
    pc.add_argument("--prompt-tokens", type=int, default=4450)
    pc.add_argument("--decode-tokens", type=int, default=64)
    pc.add_argument("--policy", default="snapkv", help="also time this policy at 4x on casakv ('' for none)")
    pc.add_argument("--model", help="model folder (default: the demo model)")
    pc.set_defaults(func=_cmd_bench_cpu)

    pm = bench_sub.add_parser("memory", help="KV blocks held per request, dense vs evicting policies, on a real server")
    pm.add_argument("--json", help="where to write the results JSON")
    pm.add_argument("--md", help="also write a Markdown summary here")
    pm.add_argument("--plot", help="also write a PNG of KV usage over time during the bursts")
    pm.add_argument("--lengths", default="2000,4000,7000", help="prompt lengths in tokens, comma-separated")
    pm.add_argument("--policies", default=",".join(MEMORY_POLICIES),
                    help="evicting policies, comma-separated; the first is the headline and the burst's")
    pm.add_argument("--ratio", type=float, default=0.25, help="kv_ratio of every policy (default 0.25: 4x)")
    pm.add_argument("--decode-tokens", type=int, default=48)
    pm.add_argument("--pool-blocks", type=int, default=1400, help="KV pool size in blocks of 16 tokens")
    pm.add_argument("--burst", type=int, default=12, help="concurrent requests in each burst")
    pm.add_argument("--burst-decode-tokens", type=int, default=1024,
                    help="tokens each burst request generates (long enough that requests pile up while decoding)")
    pm.add_argument("--no-prefill", dest="prefill", action="store_false",
                    help="leave out the main policy with prefill compression (by default it runs as <policy>+prefill "
                         "and is the one the burst and the quality suite measure)")
    pm.add_argument("--model", help="model folder (default: the demo model)")
    pm.set_defaults(func=_cmd_bench_memory)

    from casakv_vllm.tools.quality.cli import add_parser as add_eval_parser

    add_eval_parser(sub)

    p = sub.add_parser("check-config", help="validate casakv settings (CASAKV_CONFIG and/or a JSON object) and print them")
    p.add_argument("json", nargs="?", help='JSON object as given to --additional-config under "casakv"')
    p.set_defaults(func=_cmd_check_config)
    return parser


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    from casakv_vllm.tools.bench.kernels import SECTIONS, run

    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown or not sections:
        print(f"casakv bench kernels: --sections takes {', '.join(SECTIONS)} (got {args.sections!r})", file=sys.stderr)
        return 2
    run(Path(args.json), Path(args.md) if args.md else None, quick=args.quick, progress=lambda m: print(m, flush=True),
        vllm_kernel=args.vllm_kernel, sections=sections)
    return 0


def _cmd_bench_cpu(args: argparse.Namespace) -> int:
    from casakv_vllm.tools.bench.cpu import markdown, run

    if args.runs < 1 or args.prompt_tokens < 16 or args.decode_tokens < 1:
        print("casakv bench cpu: --runs, --prompt-tokens (>= 16) and --decode-tokens must be positive", file=sys.stderr)
        return 2
    result = run(Path(args.json) if args.json else None, Path(args.md) if args.md else None, args.runs,
                 args.prompt_tokens, args.decode_tokens, args.policy or None, lambda m: print(m, flush=True), args.model)
    print(markdown(result))
    return 0


def _cmd_bench_memory(args: argparse.Namespace) -> int:
    from casakv_vllm.tools.bench.memory import markdown, run

    try:
        lengths = tuple(int(x) for x in args.lengths.split(","))
        policies = [p for p in args.policies.split(",") if p]
    except ValueError:
        print("casakv bench memory: --lengths takes comma-separated integers", file=sys.stderr)
        return 2
    if not policies or not 0 < args.ratio <= 1 or min(lengths) < 16 or args.burst < 1 or args.pool_blocks < 16:
        print("casakv bench memory: needs a policy, 0 < --ratio <= 1, lengths >= 16, --burst >= 1, "
              "--pool-blocks >= 16", file=sys.stderr)
        return 2
    result = run(Path(args.json) if args.json else None, Path(args.md) if args.md else None,
                 Path(args.plot) if args.plot else None, lengths, policies, args.ratio, args.decode_tokens,
                 args.pool_blocks, args.burst, lambda m: print(m, flush=True), args.model, args.prefill,
                 args.burst_decode_tokens)
    print(markdown(result))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from casakv_vllm.config import CasakvConfigError, load_config

    try:
        extra = json.loads(args.json) if args.json else None
    except json.JSONDecodeError as err:
        print(f"casakv config error (argument): not valid JSON: {err}", file=sys.stderr)
        return 2
    try:
        cfg = load_config({"casakv": extra} if extra is not None else None)
    except CasakvConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print(json.dumps(cfg.model_dump(), indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
