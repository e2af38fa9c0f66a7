"""``mergelab recycle RECIPE OUT_DIR``: Model Ratatouille with per-run progress and a final table."""
from __future__ import annotations

import argparse
import sys


class _Progress:
    """Per-run lines and a bar per stage on stderr (bars only on a terminal)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.stage = ""

    def _write(self, text: str) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm
        tqdm.write(text, file=sys.stderr)

    def __call__(self, event: str, **info) -> None:
        from tqdm.auto import tqdm
        if event == "stage":
            self.close()
            self.stage = info["name"]
            if "total" in info:
                self.bar = tqdm(total=info["total"], desc=self.stage, unit="run", file=sys.stderr,
                                disable=True if self.quiet else None, dynamic_ncols=True)
            else:
                self._write(f"[{self.stage}]")
        elif event == "run":
            rec = info["record"]
            how = "done before, reused" if rec.get("resumed") else f"{rec.get('seconds', 0):.0f} s"
            self._write(f"  {self.stage} {info['done']}/{info['total']}: {rec['id']:<22} "
                        f"val acc {100 * rec['val_acc']:.1f}%  ({how})")
            if self.bar is not None:
                self.bar.n = info["done"]
                self.bar.refresh()
        elif event == "reuse":
            self._write(f"reusing {info['runs']} finished run(s) of {info['source']} (retrained only if the "
                        "recipe changed them)")
        elif event == "method":
            r = info["row"]
            self._write(f"  {r['method']} [{r['selection']}]: ID {100 * r['test_id']:.1f}%  "
                        f"OOD {100 * r['test_ood']:.1f}%")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    from mergelab.recycle.config import load_config
    from mergelab.recycle.pipeline import run_recycle
    from mergelab.recycle.report import markdown

    cfg = load_config(args.recipe)
    progress = _Progress(args.quiet)
    try:
        results = run_recycle(cfg, args.out_dir, force=args.force, executor=args.executor,
                              ray_address=args.ray_address, progress=progress)
    finally:
        progress.close()
    table = markdown(results).split("\n\nPaired")[0].split("\n")
    print("\n".join(line for line in table if line.startswith("|")))
    print(f"recycle: {len(results['runs'])} runs ({results['trained_now']} trained now) in "
          f"{results['seconds']:.0f} s on executor {results['executor']} -> {args.out_dir} "
          "(report.md, results.json, plot.png, model/)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("recycle", help="Model Ratatouille: recycle auxiliary fine-tunings, average the runs",
                              description="Fine-tune the target task from the base and from auxiliary fine-tunings, "
                                          "average the runs (uniform and greedy soups), and compare with ERM, "
                                          "model soups, inter-training and fusing on ID and OOD test splits. "
                                          "An interrupted run resumes where it stopped.")
    p.add_argument("recipe", help="recycle recipe (YAML; see docs/recycle.md)")
    p.add_argument("out_dir", help="output folder: report.md, results.json, plot.png, runs/, model/")
    p.add_argument("--executor", choices=("local", "ray"), default=None,
                   help="run fine-tunings one after another here (local) or in parallel on Ray (overrides the recipe)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. ray://host:10001 or auto) instead of starting a local runtime")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
    return p
