"""Before/after by CPU time: one recipe merged in-process by two source trees, alternating, repeatedly.

Each round starts one process per tree that imports mergelab once, tunes itself as the CLI does and runs
``merge()`` ``--reps`` times with ``threads=1``, timing each call by process CPU time and wall time (imports
excluded). On a shared machine the minimum and the median CPU time are steadier than ``before_after.py``'s
whole-process wall time; the ratio old/new of each is printed.

    PYTHONPATH=src python benchmarks/before_after_cpu.py --old /tmp/old/src RECIPE.yaml --compat mergekit \\
        --reps 3 --rounds 3
(recipes: the ones ``before_after.py`` or ``vs_mergekit.py`` wrote, e.g. WORKDIR/before_after/100mb/dare_ties.yaml)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CODE = r"""
import json, resource, sys, time
from mergelab.cli.merge import _tune_for_streaming
_tune_for_streaming(1)
import torch
torch.set_num_threads(1)
from mergelab import merge
rec, out, compat, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
times = []
for _ in range(reps):
    c0, t0 = time.process_time(), time.perf_counter()
    merge(rec, out, force=True, compat=None if compat == "-" else compat, threads=1)
    times.append((time.process_time() - c0, time.perf_counter() - t0))
print("RESULT", json.dumps({"times": times, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--old", type=Path, required=True, help="src folder of the 'before' tree")
    ap.add_argument("--compat", default="-", help="paper or mergekit (default: the recipe's)")
    ap.add_argument("--reps", type=int, default=3, help="merges per process")
    ap.add_argument("--rounds", type=int, default=3, help="processes per tree, alternating")
    args = ap.parse_args()
    trees = {"old": args.old.resolve(), "new": (Path(__file__).resolve().parent.parent / "src")}
    got = {tree: {"cpu": [], "wall": []} for tree in trees}
    with tempfile.TemporaryDirectory(prefix="before_after_cpu_") as tmp:
        for r in range(args.rounds):
            for tree, src in trees.items():
                env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                           HF_HUB_OFFLINE="1")
                cmd = [sys.executable, "-c", _CODE, str(args.recipe), str(Path(tmp) / tree), args.compat,
                       str(args.reps)]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                if p.returncode or line is None:
                    print(p.stderr[-3000:], file=sys.stderr)
                    return 1
                res = json.loads(line[len("RESULT "):])
                got[tree]["cpu"] += [c for c, _ in res["times"]]
                got[tree]["wall"] += [w for _, w in res["times"]]
                print(f"[before_after_cpu] {tree} round {r}: cpu/wall s "
                      + " ".join(f"{c:.2f}/{w:.2f}" for c, w in res["times"])
                      + f", maxrss {res['maxrss_mb']:.0f} MB, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    print(f"\n{args.recipe.name}: {args.rounds} rounds x {args.reps} merges per tree, 1 thread\n")
    print("| time | old min | new min | old / new (min) | old median | new median | old / new (median) |")
    print("|---|---|---|---|---|---|---|")
    for what in ("cpu", "wall"):
        old, new = got["old"][what], got["new"][what]
        print(f"| {what} s | {min(old):.3f} | {min(new):.3f} | {min(old) / min(new):.2f}x | "
              f"{statistics.median(old):.3f} | {statistics.median(new):.3f} | "
              f"{statistics.median(old) / statistics.median(new):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
