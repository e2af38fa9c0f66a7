"""TSV-M, Iso-C and Iso-CTS next to task arithmetic and TIES on the ``mergelab bench`` text6 suite.

Hyper-parameters are chosen on the validation split (alpha on ALPHAS, a subset of the papers' grid
0.1..3.0 that fits the CPU budget; task arithmetic and TIES on the suite's default grids); each chosen
setting is evaluated once on test.
Prints the table and, for every SVD method, its paired difference to TIES in normalized accuracy with
the standard error (same test examples; per task the per-example difference is divided by the
individual model's accuracy, which is held fixed).

    PYTHONPATH=src python benchmarks/svd_text6.py --out runs/svd-text6 [--threads 2] [--cache-dir DIR]

Needs the bench package (``mergelab.bench``) and its Debian data packages.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from mergelab.bench import report, runner, suite as suites

ALPHAS = [0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.6, 2.0]        # papers: linspace(0, 3, 31)[1:]; --full-grid
SVD_METHODS = ("tsv", "iso_c", "iso_cts")


def methods(defaults: list) -> list:
    keep = {m.name: m for m in defaults}
    rows = [keep["task_arithmetic"], keep["ties"]]
    # alias 'lambda' = alpha: the runner sweeps it with one merge per setting of the other params
    rows += [suites.MethodSpec(name, name, grid={"lambda": ALPHAS}) for name in SVD_METHODS]
    return rows


def normalized_diff(result: dict, a: str, b: str) -> tuple[float, float]:
    """Paired difference of normalized accuracy (a - b) and its standard error."""
    ind = result["rows"]["individual"]["per_task"]
    diffs, var = [], 0.0
    for task in result["tasks"]:
        ca, cb = result["correct"][a][task], result["correct"][b][task]
        d = [(float(x) - float(y)) / ind[task] for x, y in zip(ca, cb)]
        n = len(d)
        mu = sum(d) / n
        var += sum((x - mu) ** 2 for x in d) / max(1, n - 1) / n
        diffs.append(mu)
    t = len(diffs)
    return sum(diffs) / t, math.sqrt(var) / t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/svd-text6-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--suite", default="text6")
    ap.add_argument("--full-grid", action="store_true", help="alpha in 0.1, 0.2, ..., 3.0 as in the papers")
    args = ap.parse_args(argv)
    if args.full_grid:
        ALPHAS[:] = [round(0.1 * i, 1) for i in range(1, 31)]

    runner.LAMBDA_LINEAR |= set(SVD_METHODS)      # base + alpha * tau: exact rescaling of one merge
    suite = suites.get_suite(args.suite)
    rows = methods(suite.methods)

    def progress(desc, total):
        print(f"[{time.strftime('%H:%M:%S')}] {desc}", file=sys.stderr, flush=True)
        return runner._null_progress(desc, total)

    result = runner.run_benchmark(suite, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                                  threads=args.threads, methods=rows, progress=progress)
    folder = report.write_report(result, args.out, plots=False)
    lines = [report.markdown_table(result), ""]
    for name in SVD_METHODS:
        d, se = normalized_diff(result, name, "ties")
        verdict = "beats TIES by more than 1 SE" if d > se else "does not beat TIES by more than 1 SE"
        lines.append(f"- {name} - ties, normalized accuracy: {100 * d:+.2f} pt (paired SE {100 * se:.2f}, "
                     f"{d / se if se else float('inf'):+.1f} SE): {verdict}")
    text = "\n".join(lines)
    (Path(folder) / "svd_vs_ties.md").write_text(text + "\n")
    (Path(folder) / "svd_vs_ties.json").write_text(json.dumps(
        {name: dict(zip(("diff", "se"), normalized_diff(result, name, "ties"))) for name in SVD_METHODS}, indent=2))
    print(text)
    print(f"\nrun folder: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
