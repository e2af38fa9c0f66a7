#!/usr/bin/env python
"""Pool the data seeds of several ``ratatouille_experiment.py`` results (same target and settings) into one
table: every paired comparison's per-seed differences, their mean and a t-interval over all the seeds.

    python benchmarks/ratatouille_combine.py A.json B.json [--doc OUT.md]

The JSONs keep per-seed differences and their SEs, not the per-example outcomes, so the pooled bootstrap of
the experiment's own note is not repeated here; the t-interval over seeds is the one that includes training
variation. Settings that differ between the files (other than the seeds) are refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mergelab.recycle.seeds import t_interval  # noqa: E402

SAME = ("classes", "sizes", "checkpoints", "runs", "fusing_runs", "steps", "batch_size", "lr")


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        doc["meta"], doc["seeds"], doc["comparisons"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a ratatouille_experiment.py result ({exc})") from exc
    return doc


def combine(paths: list[Path]) -> str:
    docs = [_read(p) for p in paths]
    first = docs[0]["meta"]
    for p, d in zip(paths[1:], docs[1:]):
        differ = [k for k in SAME if d["meta"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"{p}: other settings than {paths[0]} ({', '.join(differ)})")
    seeds = [s for d in docs for s in d["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a data seed appears twice: {seeds}")
    lines = [f"Data seeds {', '.join(map(str, seeds))} from {', '.join(p.name for p in paths)}; "
             f"t-interval over the {len(seeds)} per-seed differences (df = {len(seeds) - 1}).", "",
             "| A | B | split | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | t-interval |",
             "|---|---|---|" + "---:|" * (len(seeds) + 2)]
    for i, c in enumerate(docs[0]["comparisons"]):
        per = []
        for d in docs:
            other = d["comparisons"][i]
            if (other["a"], other["b"], other["split"]) != (c["a"], c["b"], c["split"]):
                raise ValueError("the files list their comparisons in different orders")
            per.extend(x["diff"] for x in other["per_seed"])
        t = t_interval(per)
        lines.append(f"| {c['a']} | {c['b']} | {c['split']} | " + " | ".join(f"{100 * v:+.2f}" for v in per)
                     + f" | {100 * t['mean']:+.2f} | {100 * t['lo']:+.2f} .. {100 * t['hi']:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--doc", type=Path, help="write the table to this Markdown file")
    a = ap.parse_args()
    if a.doc is not None and any(a.doc.resolve() == p.resolve() for p in a.results):
        ap.error(f"--doc {a.doc} is one of the results it reads")
    try:
        text = combine(a.results)
    except ValueError as exc:
        print(f"ratatouille_combine: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if a.doc:
        a.doc.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
