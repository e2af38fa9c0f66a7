"""Where a merge's time goes: ``mergelab.merge`` under cProfile, one thread, in-process (imports excluded).

cProfile sees only the calling thread, so the merge runs with ``threads=1``; the process is tuned as
the CLI tunes it (``cli.merge._tune_for_streaming``). Prints the top functions by own time per recipe.
(``vs_mergekit.py --profile mergelab`` samples all threads with py-spy where py-spy is installed.)

    PYTHONPATH=src python benchmarks/profile_merge.py RECIPE.yaml [...] [--compat mergekit] [--out DIR] [--top 16]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipes", nargs="+", type=Path)
    ap.add_argument("--compat", default=None, help="paper or mergekit (default: the recipe's)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one, deleted)")
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args()
    from mergelab import merge
    from mergelab.cli.merge import _tune_for_streaming
    _tune_for_streaming(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="mergelab-profile-")) / "out"
    try:
        for rec in args.recipes:
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            summary = merge(rec, out, force=True, compat=args.compat, threads=1)
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
            print(f"## {rec.name}: {time.perf_counter() - t0:.1f} s (1 thread, under cProfile), stages {summary.stages}")
            print("\n".join(line for line in text.getvalue().splitlines()
                            if line.strip() and "Ordered by" not in line and "List reduced" not in line))
    finally:
        if args.out is None:
            shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
