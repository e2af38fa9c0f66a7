"""Before/after: the same merges with two source trees of mergelab, alternating, in one run.

Uses ``vs_mergekit.py``'s synthetic checkpoints and recipes (same ``--size``, cached under
``--workdir``) and runs ``python -m mergelab merge RECIPE OUT --force --quiet [--compat mergekit]`` as a
fresh process with ``PYTHONPATH=OLD_SRC`` and with this checkout's ``src``, in turn, ``--rounds``
times after a warm-up read of the inputs; prints the median wall time of each and the median of the
per-round ratios old/new (machine load mostly cancels in a ratio taken within one round), for the
whole process and for the merge alone (timed inside the process, imports excluded).

    git archive COMMIT src | tar -x -C /tmp/old        # the "before" tree
    PYTHONPATH=src python benchmarks/before_after.py --old /tmp/old/src --size 100mb \\
        --methods task_arithmetic,dare_ties --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the merge alone, timed inside the process (imports excluded), as the CLI runs it
_MERGE = r"""
import json, sys, time
from mergelab.cli.merge import _tune_for_streaming
from mergelab import merge
rec, out, compat, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
_tune_for_streaming(threads)
t0 = time.perf_counter()
merge(rec, out, force=True, compat=compat if compat != "-" else None, threads=threads)
print("MERGE_SECONDS", time.perf_counter() - t0)
"""


def _vs():
    spec = importlib.util.spec_from_file_location("vs_mergekit", HERE / "vs_mergekit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vs_mergekit"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    vs = _vs()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="src folder of the 'before' tree")
    ap.add_argument("--size", default="100mb")
    ap.add_argument("--methods", default="task_arithmetic,dare_ties")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=vs.REPO / ".cache" / "vs_mergekit")
    args = ap.parse_args()
    log = lambda m: print(f"[before_after] {m}", file=sys.stderr, flush=True)  # noqa: E731
    wd = args.workdir.resolve()
    ck = vs.generate(wd, args.size, 3, "dense", 0.002, 0.1, "float32", 0, log)
    inputs = [ck["base"], *ck["models"]]
    trees = {"old": args.old.resolve(), "new": (vs.REPO / "src").resolve()}
    cases = [c for c in vs.CASES if c.key in args.methods.split(",")]
    run_dir = wd / "before_after" / args.size
    times: dict[tuple[str, str], list[float]] = {}
    for case in cases:
        rec = vs.write_recipe(run_dir / f"{case.key}.yaml", vs.recipe_dict(case, ck, "float32", True))
        for r in range(args.rounds):
            for tree, src in trees.items():
                env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(args.threads),
                           HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
                out = run_dir / f"out-{case.key}-{tree}"
                cmd = [sys.executable, "-c", _MERGE, str(rec), str(out), "mergekit" if case.compat else "-",
                       str(args.threads)]
                vs.warm_read(inputs)
                res = vs.run_measured(cmd, env, run_dir / f"{case.key}-{tree}-{r}.log")
                shutil.rmtree(out, ignore_errors=True)
                if res["rc"] != 0:
                    log(f"{case.key} {tree} failed:\n{vs.tail(res['log'])}")
                    return 1
                merge_s = float(next(line.split()[1] for line in Path(res["log"]).read_text().splitlines()
                                     if line.startswith("MERGE_SECONDS")))
                times.setdefault((case.key, tree), []).append(res["wall_s"])
                times.setdefault((case.key, tree + " merge"), []).append(merge_s)
                log(f"{case.key} {tree} round {r}: {res['wall_s']:.2f}s (merge {merge_s:.2f}s), "
                    f"peak {res['peak_rss_mb']:.0f} MB, load {os.getloadavg()[0]:.1f}")
    print(f"\n{args.size} ({ck['n_params']:,} params/model, base + 3), {args.threads} threads, "
          f"{args.rounds} rounds, median wall s\n")
    print("| method | timed | old s | new s | old / new (median of per-round ratios) |\n|---|---|---|---|---|")
    for case in cases:
        for what, suffix in (("process", ""), ("merge alone", " merge")):
            old, new = times[(case.key, "old" + suffix)], times[(case.key, "new" + suffix)]
            ratio = statistics.median(o / n for o, n in zip(old, new))
            print(f"| {case.key} | {what} | {statistics.median(old):.2f} | {statistics.median(new):.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
