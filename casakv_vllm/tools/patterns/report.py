"""``casakv eval patterns`` results: summaries, Markdown, JSON and a plot.

A summary covers the per-head results of one (mode, variant): every (prompt, chunk, layer, KV head)
counts once.  ``recall_p10`` is the 10th percentile of per-head recall (the pessimistic view), the
target is met when the mean recall reaches ``TARGET_RECALL`` at a mean density at most ``TARGET_DENSITY``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from casakv_vllm.observe.estimate import PROGRAMS

TARGET_RECALL = 0.95
TARGET_DENSITY = 0.3
HEAD_FIELDS = ("mode", "variant", "prompt", "chunk", "layer", "head", "program", "recall", "density", "est_recall")


def _stats(rows: list[dict]) -> dict:
    rec = torch.tensor([r["recall"] for r in rows], dtype=torch.float64)
    den = torch.tensor([r["density"] for r in rows], dtype=torch.float64)
    return {"heads": len(rows), "recall": round(float(rec.mean()), 4),
            "recall_p10": round(float(torch.quantile(rec, 0.1)), 4), "recall_min": round(float(rec.min()), 4),
            "density": round(float(den.mean()), 4), "density_p90": round(float(torch.quantile(den, 0.9)), 4)}


def _programs(rows: list[dict]) -> dict[str, int]:
    counts = Counter(r["program"] for r in rows)
    return {p: counts[p] for p in [*PROGRAMS, *sorted(set(counts) - set(PROGRAMS))] if counts[p]}


def summarize(heads: list[dict]) -> list[dict]:
    """One summary per (mode, variant), in order of appearance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in heads:
        groups.setdefault((r["mode"], r["variant"]), []).append(r)
    out = []
    for (mode, variant), rows in groups.items():
        s = {"mode": mode, "variant": variant, **_stats(rows), "programs": _programs(rows)}
        seen = [r["est_recall"] for r in rows if not math.isnan(r["est_recall"])]  # NaN: not estimated
        s["est_recall"] = round(sum(seen) / len(seen), 4) if seen else None
        s["share_recall_ge_target"] = round(sum(r["recall"] >= TARGET_RECALL for r in rows) / len(rows), 4)
        s["meets_target"] = s["recall"] >= TARGET_RECALL and s["density"] <= TARGET_DENSITY
        by_prog: dict[str, list[dict]] = {}
        for r in rows:
            by_prog.setdefault(r["program"], []).append(r)
        s["per_program"] = {p: _stats(by_prog[p]) for p in s["programs"]}
        layers = sorted({r["layer"] for r in rows})
        s["per_layer"] = [{"layer": la, **_stats(lr), "programs": _programs(lr)}
                          for la in layers for lr in [[r for r in rows if r["layer"] == la]]]
        out.append(s)
    return out


def verdict(s: dict) -> str:
    met = "**met**" if s["meets_target"] else "**missed**"
    gaps = []
    if s["recall"] < TARGET_RECALL:
        gaps.append(f"recall short by {TARGET_RECALL - s['recall']:.3f}")
    if s["density"] > TARGET_DENSITY:
        gaps.append(f"density over by {s['density'] - TARGET_DENSITY:.3f}")
    return (f"Target (held-out recall >= {TARGET_RECALL} at density <= {TARGET_DENSITY}): {met}: recall "
            f"{s['recall']:.3f} at density {s['density']:.3f}" + (f" ({'; '.join(gaps)})" if gaps else "") + ".")


def _progs(counts: dict[str, int]) -> str:
    return ", ".join(f"{p} {n}" for p, n in counts.items())


def markdown(obj: dict, plot: str | None = None) -> str:
    st, head = obj["settings"], headline_of(obj)
    lines = ["# Pattern estimator: held-out attention recall and density", "",
             "Command:", "", "```bash", obj["command"], "```", "",
             f"Wall time {obj['wall_seconds']:.0f} s on {obj['machine']}. Model: `{obj['model']}`. "
             "Versions: " + ", ".join(f"{k} {v}" for k, v in obj["versions"].items()) + ".", "",
             f"Held-out prompts: {len(obj['prompts'])} from the quality suite's offline tasks, seeds "
             f"{st['held_out_seed']}+i (evaluation uses 0, the static-heads calibration 1000+i); about "
             f"{st['context']} tokens each. The estimator sees each chunk's last {st['last_q']} queries (the block "
             "program also the chunk's queries pooled per block of 64); recall and density are measured on "
             f"{'all' if not st['rows'] else 'up to ' + str(st['rows']) + ' evenly spaced'} earlier queries of "
             "the chunk (held out), with the kernels' mask (`pattern_mask`). Recall: share of a query's attention "
             "(mean over the GQA group) on allowed keys; density: allowed / causal (query, key) pairs. "
             "Means are over every (prompt, chunk, layer, KV head); p10 is the 10th percentile of per-head recall. "
             "Variants: `t=x` is the estimator at threshold x as the `casakv` policy calls it (no block program); "
             "`+block` adds the block program; `a-shape (static)` gives every head sinks + the longest window "
             f"within density {TARGET_DENSITY}. Mode `prompt`: the whole prompt estimated once; `chunk`: per "
             "prefill chunk.",
             "", f"Headline: mode `{head['mode']}`, `{head['variant']}` (the estimator as the `casakv` policy calls "
             "it at the end of a prompt). " + verdict(head), "",
             "`heads >= 0.95`: the share of heads whose held-out recall reaches 0.95; `recall on seen rows`: the "
             "estimator's own recall on the last queries it chose from.", ""]
    lines += ["| mode | variant | recall | recall p10 | recall min | density | recall on seen rows | "
              "heads >= 0.95 | target | programs |", "|" + "---|" * 10]
    for s in obj["summaries"]:
        est = "–" if s["est_recall"] is None else f"{s['est_recall']:.3f}"
        lines.append(f"| {s['mode']} | {s['variant']} | {s['recall']:.3f} | {s['recall_p10']:.3f} | "
                     f"{s['recall_min']:.3f} | {s['density']:.3f} | {est} | {s['share_recall_ge_target']:.2f} | "
                     f"{'met' if s['meets_target'] else 'missed'} | {_progs(s['programs'])} |")
    lines += ["", f"Programs of the headline ({head['variant']}):", "",
              "| program | heads | recall | recall p10 | density |", "|---|---|---|---|---|"]
    for p, s in head["per_program"].items():
        lines.append(f"| {p} | {s['heads']} | {s['recall']:.3f} | {s['recall_p10']:.3f} | {s['density']:.3f} |")
    lines += ["", "Per layer (headline):", "", "| layer | recall | recall min | density | programs |",
              "|---|---|---|---|---|"]
    for s in head["per_layer"]:
        lines.append(f"| {s['layer']} | {s['recall']:.3f} | {s['recall_min']:.3f} | {s['density']:.3f} | "
                     f"{_progs(s['programs'])} |")
    lines += ["", "Prompts:", "", "| id | task | tokens | seconds (model) |", "|---|---|---|---|"]
    lines += [f"| {p['id']} | {p['task']} | {p['tokens']} | {p['seconds']} ({p['model_seconds']}) |"
              for p in obj["prompts"]]
    if plot:
        lines += ["", f"![held-out recall vs density]({plot})"]
    return "\n".join(lines) + "\n"


def write_plot(obj: dict, heads: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = headline_of(obj)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    ax.add_patch(plt.Rectangle((0, TARGET_RECALL), TARGET_DENSITY, 1.02 - TARGET_RECALL, color="tab:green",
                               alpha=0.12, label=f"target (recall >= {TARGET_RECALL}, density <= {TARGET_DENSITY})"))
    rows = [r for r in heads if r["mode"] == head["mode"] and r["variant"] == head["variant"]]
    for p in head["programs"]:
        pts = [(r["density"], r["recall"]) for r in rows if r["program"] == p]
        ax.scatter(*zip(*pts), s=9, alpha=0.5, label=f"{p} ({len(pts)})")
    variants = {v["name"]: v for v in obj["settings"]["variants"]}
    for mode, color in zip(dict.fromkeys(s["mode"] for s in obj["summaries"]), ("black", "tab:purple")):
        mine = [s for s in obj["summaries"] if s["mode"] == mode]
        sweep = sorted((s for s in mine if not variants.get(s["variant"], {"block": True})["block"]),
                       key=lambda s: variants[s["variant"]]["threshold"])
        ax.plot([s["density"] for s in sweep], [s["recall"] for s in sweep], "*-", color=color, ms=13, zorder=5,
                label=f"{mode}: means, threshold " + " / ".join(f"{variants[s['variant']]['threshold']:g}"
                                                                  for s in sweep))
        for s in mine:
            if s["variant"] not in variants:  # the static reference
                ax.scatter([s["density"]], [s["recall"]], marker="X", s=90, color=color, zorder=5,
                           label=f"{mode}: {s['variant']}, density {TARGET_DENSITY}")
            elif variants[s["variant"]]["block"]:
                ax.scatter([s["density"]], [s["recall"]], marker="D", s=50, color=color, zorder=5,
                           label=f"{mode}: {s['variant']}")
    ax.set(xlabel="density (allowed / causal pairs)", ylabel="held-out attention recall", xlim=(0, 1.02),
           ylim=(min(0.0, min(r["recall"] for r in rows)), 1.02),
           title=f"per KV head ({head['mode']}, {head['variant']}) and means")
    ax.legend(fontsize=7, loc="lower right")
    layers = [s["layer"] for s in head["per_layer"]]
    bx.plot(layers, [s["recall"] for s in head["per_layer"]], "o-", label="recall (mean)")
    bx.plot(layers, [s["recall_min"] for s in head["per_layer"]], "v:", label="recall (min head)")
    bx.plot(layers, [s["density"] for s in head["per_layer"]], "s-", label="density (mean)")
    bx.axhline(TARGET_RECALL, color="tab:green", ls="--", lw=1)
    bx.axhline(TARGET_DENSITY, color="tab:red", ls="--", lw=1)
    bx.set(xlabel="layer", ylim=(0, 1.02), title=f"per layer, {head['variant']}")
    bx.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def result(heads: list[dict], headline: tuple[str, str], **facts) -> dict:
    """The JSON object: ``facts`` (command, settings, ...), summaries, the headline summary and every head."""
    summaries = summarize(heads)
    head = headline_of({"headline": {"mode": headline[0], "variant": headline[1]}, "summaries": summaries})
    cols = [[_num(r[f]) for f in HEAD_FIELDS] for r in heads]
    return {**facts, "target": {"recall": TARGET_RECALL, "density": TARGET_DENSITY, "met": head["meets_target"]},
            "headline": {"mode": headline[0], "variant": headline[1]}, "summaries": summaries,
            "head_fields": list(HEAD_FIELDS), "heads": cols}


def headline_of(obj: dict) -> dict:
    """The summary the JSON names as its headline."""
    key = (obj["headline"]["mode"], obj["headline"]["variant"])
    return next(s for s in obj["summaries"] if (s["mode"], s["variant"]) == key)


def _num(x):
    if not isinstance(x, float):
        return x
    return None if math.isnan(x) else round(x, 4)  # NaN (not estimated) -> null


def write(obj: dict, heads: list[dict], json_path: str | None, md: str | None, png: str | None) -> None:
    if png:
        write_plot(obj, heads, Path(png))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**obj, "heads": "@HEADS@"}, indent=1, allow_nan=False)  # one line a head
        rows = ",\n  ".join(json.dumps(r, allow_nan=False) for r in obj["heads"])
        Path(json_path).write_text(text.replace('"@HEADS@"', "[\n  " + rows + "\n ]") + "\n")
    if md:
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        rel = Path(png).name if png and Path(png).parent == Path(md).parent else png
        Path(md).write_text(markdown(obj, rel))
