#!/usr/bin/env python
"""Draw the Grafana dashboard's panels from recorded /metrics scrapes, as one PNG.

    .venv/bin/python scripts/render_dashboard_preview.py \
        --dashboard deploy/helm/casakv-vllm/dashboards/casakv-vllm.json \
        --scrapes docs/assets/metrics-scrape.txt --out docs/assets/dashboard-preview.png

Each panel's PromQL runs through scripts/promql_lite.py at every scrape
(``$__rate_interval`` = 4 scrape intervals, as Grafana picks it), so the
picture shows what the dashboard itself would show for that run.  Panels
whose series the server does not export yet say so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promql_lite import Parser, evaluate, parse_scrapes  # noqa: E402

TARGET_LABELS = {"namespace": "default", "pod": "casakv-vllm-0"}  # what Prometheus adds when scraping a pod


def series_for(expr: str, legend: str, scrapes, variables) -> dict[str, list[tuple[float, float]]]:
    tree = Parser(expr, variables).parse()
    out: dict[str, list[tuple[float, float]]] = {}
    for i, (t, _) in enumerate(scrapes):
        value = evaluate(tree, scrapes, i)
        items = {frozenset(): value}.items() if isinstance(value, float) else value.items()
        for labels, v in items:
            if math.isnan(v):
                continue
            name = legend
            for k, lv in dict(labels).items():
                name = name.replace("{{" + k + "}}", lv)
            out.setdefault(name, []).append((t, v))
    return out


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p.get("type") == "timeseries"]


def render(dashboard: dict, scrapes, out: Path, title: str) -> dict[str, int]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    interval = (scrapes[-1][0] - scrapes[0][0]) / max(1, len(scrapes) - 1)
    variables = {"$__rate_interval": f"{max(4 * interval, 1):.0f}s"}
    shown = panels(dashboard)
    cols = 3
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.3 * rows), squeeze=False)
    counts = {}
    for ax, panel in zip(axes.flat, shown):
        unit = panel["fieldConfig"]["defaults"].get("unit")
        n = 0
        for target in panel["targets"]:
            for name, points in series_for(target["expr"], target["legendFormat"], scrapes, variables).items():
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
                    n += 1
        counts[panel["title"]] = n
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("seconds into the run", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if n:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data yet\n(series not exported by this build)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="gray")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=80)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dashboard", type=Path, required=True)
    ap.add_argument("--scrapes", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dashboard = json.loads(args.dashboard.read_text())
    text = args.scrapes.read_text()
    scrapes = parse_scrapes(text, TARGET_LABELS)
    headline = text.splitlines()[0].lstrip("# ")
    counts = render(dashboard, scrapes, args.out, f"{dashboard['title']} dashboard, from a real run: {headline}")
    for title, n in counts.items():
        print(f"  {title}: {n} series")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
