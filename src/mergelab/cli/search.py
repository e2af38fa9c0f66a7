"""``mergelab search SEARCH.yaml OUT_DIR``: find the best merge on validation data, trials in parallel on Ray."""
from __future__ import annotations

import argparse
import sys


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, event: str, **info) -> None:
        if self.quiet:
            return
        if event == "stage":
            print(f"[{info['name']}]", file=sys.stderr, flush=True)
        elif event == "trial":
            rec, outputs = info["record"], info["outputs"]
            if rec.get("state") == "complete":
                vals = "  ".join(f"{n} {v:.4g}" for (n, _), v in zip(outputs, rec["values"]))
            else:
                vals = f"failed: {rec.get('error', '')}"
            params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in rec["params"].items())
            print(f"  trial {rec['number']:>3} ({info['done']}/{info['total']}, {rec.get('seconds', 0):.1f} s): "
                  f"{vals}   {params}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from mergelab.search.config import load_search_config
    from mergelab.search.runner import run_search

    cfg = load_search_config(args.search)
    s = run_search(cfg, args.out_dir, ray_address=args.ray_address, trials=args.trials, resume=args.resume,
                   executor=args.executor, workers=args.workers, progress=_Progress(args.quiet))
    b, t = s["best"], s["timing"]
    vals = ", ".join(f"{k} {v:.4g}" for k, v in b["values"].items())
    print(f"best trial {b['number']} of {s['trials_planned']} ({s['algorithm']}): {vals}")
    print(f"  method {b['merge']['method']}, parameters {b['merge']['params']}")
    if "pareto_front" in s:
        print(f"  Pareto front: trials {', '.join(str(r['number']) for r in s['pareto_front'])}")
    if t["cached_seconds_per_trial"] is not None:
        line = f"  seconds per trial: cached {t['cached_seconds_per_trial']:.2f}"
        if t["naive_seconds_per_trial"] is not None:
            line += f", naive (merge to disk + reload) {t['naive_seconds_per_trial']:.2f}"
        print(line)
    if t.get("naive_errors"):
        print(f"  the naive reference failed: {t['naive_errors'][0]}")
    print(f"  {s['trials_run_now']} trials run now, {s['trials_reused']} reused; "
          f"{s['executor']} with {s['workers']} worker(s); wrote {args.out_dir}/best_model, best_recipe.yaml, "
          "trials.csv, plots/")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search merge parameters (method, lambda, weights, per-layer "
                                      "coefficients) on validation data, trials on Ray",
                       description="Find the best merge of a recipe's models on validation data.")
    p.add_argument("search", help="search YAML (recipe template, space, objective, algorithm, budget)")
    p.add_argument("out_dir", help="output folder: best_model, best_recipe.yaml, trials.csv/json, plots")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (host:port or auto); without it an "
                                                       "embedded local Ray runtime starts")
    p.add_argument("--trials", type=int, default=None, help="number of trials (overrides the file's 'trials')")
    p.add_argument("--resume", action="store_true", help="continue a killed or shorter search in OUT_DIR; "
                                                         "finished trials are not run again")
    p.add_argument("--executor", choices=("ray", "local"), default=None,
                   help="where trials run (default: the file's 'executor', ray)")
    p.add_argument("--workers", type=int, default=None, help="trials at a time on the embedded Ray runtime")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")
    p.set_defaults(func=run)
