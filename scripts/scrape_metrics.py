#!/usr/bin/env python
"""Scrape a real casakv server's /metrics while it serves a short burst of requests.

    .venv/bin/python scripts/scrape_metrics.py --out docs/assets/metrics-scrape.txt

Starts `vllm serve <demo model> --attention-backend casakv` on 127.0.0.1 with
`--additional-config '{"casakv": {"policy": "snapkv", "kv_ratio": 0.25}}'`,
sends `--requests` long-prompt completions (`--concurrency` at a time; every
fourth asks for dense through vllm_xargs), scrapes /metrics every
`--interval` seconds from the first request until all are done plus one
interval, and writes the scrapes one after another, each headed by
`# scrape t=<seconds since the first>`.  Only the series the Grafana dashboard
reads are kept, which keeps the file small (`--from FILE` re-filters a file
written earlier, without a server).
scripts/render_dashboard_preview.py draws the dashboard's panels from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy/helm/casakv-vllm/dashboards/casakv-vllm.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def dashboard_metrics() -> set[str]:
    """Metric names (families and their samples) the dashboard's expressions select."""
    sys.path.insert(0, str(REPO / "scripts"))
    from promql_lite import Parser, metric_names

    names = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            names |= metric_names(Parser(target["expr"], {"$__rate_interval": "1m"}).parse())
    return names | {n.removesuffix(s) for n in names for s in SUFFIXES if n.endswith(s)}


def keep(text: str, names: set[str]) -> str:
    """The lines of a scrape that belong to ``names`` (HELP/TYPE lines included), ``*_created`` left out."""
    lines = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        name = parts[2] if line.startswith("# ") and len(parts) > 2 else line.split("{", 1)[0].split(" ", 1)[0]
        if name in names and not name.endswith("_created"):
            lines.append(line)
    return "\n".join(lines)


def refilter(path: Path, out: Path) -> None:
    import re

    names = dashboard_metrics()
    parts = re.split(r"^(# scrape t=[0-9.]+)\n", path.read_text(), flags=re.M)
    body = [parts[0].rstrip("\n")]
    for header, text in zip(parts[1::2], parts[2::2]):
        body += [header, keep(text, names)]
    out.write_text("\n".join(body) + "\n")


def main() -> int:
    from casakv_vllm.tools.bench.cpu import prompts
    from casakv_vllm.tools.demo_model import demo_model_path
    from casakv_vllm.tools.serving import VllmServer, cpu_env

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--from", dest="source", type=Path, help="re-filter this scrape file instead of running a server")
    args = ap.parse_args()
    if args.source:
        refilter(args.source, args.out)
        print(f"[scrape] {args.source} -> {args.out}")
        return 0
    names = dashboard_metrics()

    config = {"casakv": {"policy": "snapkv", "kv_ratio": 0.25}}
    extra = ["--max-model-len", "8192", "--dtype", "bfloat16", "--additional-config", json.dumps(config)]
    texts = prompts(args.requests, args.prompt_tokens, seed=11)
    with VllmServer(model=demo_model_path(), extra_args=extra, env=cpu_env()) as server:
        print(f"[scrape] server ready at {server.url}; {args.requests} requests, {args.concurrency} at a time",
              flush=True)
        scrapes: list[tuple[float, str]] = []
        done = threading.Event()
        t0 = time.monotonic()

        def scraper() -> None:
            while True:
                scrapes.append((time.monotonic() - t0, keep(server.get_text("/metrics"), names)))
                if done.is_set():
                    return
                done.wait(args.interval)

        def one(i: int) -> int:
            payload = {"model": server.served_name, "prompt": texts[i], "max_tokens": args.max_tokens,
                       "temperature": 0.0, "ignore_eos": True}
            if i % 4 == 3:
                payload["vllm_xargs"] = {"casakv_policy": "dense"}
            return server.post("/v1/completions", payload)["usage"]["completion_tokens"]

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        with ThreadPoolExecutor(args.concurrency) as pool:
            generated = sum(pool.map(one, range(args.requests)))
        time.sleep(args.interval)
        done.set()
        thread.join()
    body = "\n".join(f"# scrape t={t:.1f}\n{text}" for t, text in scrapes)
    args.out.write_text(f"# {len(scrapes)} scrapes of /metrics; casakv config {json.dumps(config)}; "
                        f"{args.requests} requests of ~{args.prompt_tokens} prompt tokens, {generated} tokens "
                        f"generated (scripts/scrape_metrics.py)\n{body}\n")
    print(f"[scrape] {len(scrapes)} scrapes over {scrapes[-1][0]:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
