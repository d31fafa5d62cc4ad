"""One quality table from two `casakv eval quality` runs over the same samples: the records of ``--base``, with
the tasks the ``--over`` run measured taken from it instead (and its full-attention rows added).

For a run that left out a task's reference and was completed by a second run of that task alone, e.g.

    python scripts/merge_quality_runs.py --base a.json --over a-longdoc.json --json t.json --md t.md --plot t.png

Both runs must share model, seed and sample counts (checked: the per-task sample counts must agree).
"""

from __future__ import annotations

import argparse
import json
import sys

from casakv_vllm.tools.quality import report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--over", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--md")
    ap.add_argument("--plot")
    args = ap.parse_args()
    base, over = (json.load(open(path)) for path in (args.base, args.over))
    if base["model"] != over["model"]:
        print(f"merge: the runs used different models ({base['model']} / {over['model']})", file=sys.stderr)
        return 2
    tasks = {r["task"].removesuffix("_kl") for r in over["results"]}
    kept = [r for r in base["results"] if r["task"].removesuffix("_kl") not in tasks]
    n_base = {r.get("n") for r in base["results"]}
    n_over = {r.get("n") for r in over["results"]}
    if n_base != n_over:
        print(f"merge: sample counts differ ({sorted(n_base)} / {sorted(n_over)})", file=sys.stderr)
        return 2
    records = kept + over["results"]
    command = (f"{base['command']}\n# then, for {', '.join(sorted(tasks))}: {over['command']}\n"
               f"# merged: python scripts/merge_quality_runs.py --base {args.base} --over {args.over} "
               f"--json {args.json}" + (f" --md {args.md}" if args.md else "") + (f" --plot {args.plot}" if args.plot
                                                                                  else ""))
    report.write_report(records, args.md, args.json, args.plot, command=command, model=base["model"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
