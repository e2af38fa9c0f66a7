"""``mergelab bench``: run a benchmark suite (fine-tune, merge, evaluate) and write a report."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mergelab.cli.common import positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark merge methods on real fine-tunings (default suite: text6)",
        description="Fine-tune (cached) one encoder per task, merge with every method, choose "
                    "hyper-parameters on validation, evaluate once on test, write tables and plots.")
    p.add_argument("--suite", default="text6", help="built-in suite (text6, demo) or a suite .yaml")
    p.add_argument("--out", default=None, help="run folder (default runs/<suite>-<timestamp>)")
    p.add_argument("--cache-dir", default=None,
                   help="fine-tuned checkpoints cache (default $MERGELAB_CACHE or ~/.cache/mergelab/bench)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the suite's methods (e.g. ties,task_arithmetic)")
    p.add_argument("--model", action="append", default=[], metavar="TASK=DIR",
                   help="use your own fine-tuned Hugging Face folder (with head.safetensors) for TASK")
    p.add_argument("--base", default=None, help="base encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--seeds", default=None, help="fine-tuning seeds, e.g. 0,1 (default: the suite's)")
    p.add_argument("--device", default=None, help="torch device for fine-tuning and evaluation (e.g. cuda)")
    p.add_argument("--resume", action="append", default=[], metavar="RESULT_JSON",
                   help="take finished rows from an earlier run of the same suite (its OUT.result.json "
                        "partial file or OUT/results.json; repeatable, e.g. one file per seed run side by side)")
    p.add_argument("--no-eval-cache", action="store_true",
                   help="score every model again (default: logits of an encoder already scored on the same "
                        "inputs and heads are taken from CACHE_DIR/evals)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list suites and tasks, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _progress(quiet: bool):
    from tqdm.auto import tqdm

    def factory(desc: str, total: int):
        tty = sys.stderr.isatty()
        return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=tty,
                    mininterval=0.1 if tty else 10.0, file=sys.stderr)
    return factory


def select_methods(s, wanted: list[str]) -> list:
    """The rows ``--methods`` names: the suite's own, or any registry method at its paper defaults."""
    from mergelab.bench import suite as suites
    from mergelab.errors import MergelabError
    from mergelab.methods import REGISTRY
    known = {m.name: m for m in s.methods}
    for m in wanted:
        if m not in known and m in REGISTRY:
            known[m] = suites.MethodSpec(m, REGISTRY[m].name)
    bad = [m for m in wanted if m not in known]
    if bad:
        raise MergelabError(f"--methods: unknown {', '.join(bad)}; suite {s.name} has "
                            f"{', '.join(m.name for m in s.methods)}, and any merge method of 'mergelab methods'")
    return [known[m] for m in wanted]


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergelab.bench import data, report, suite as suites
    from mergelab.bench.runner import run_benchmark
    from mergelab.errors import MergelabError

    if args.list:
        print("suites:", ", ".join(sorted(suites.SUITES)))
        for name in sorted(suites.SUITES):
            s = suites.get_suite(name)
            print(f"  {name}: tasks {', '.join(s.tasks)}")
            print(f"  {' ' * len(name)}  methods {', '.join(m.name for m in s.methods)}")
        print("any registry method may be named with --methods (it runs at its paper defaults)")
        print("tasks:")
        for name in data.list_tasks():
            spec = data.TASKS[name]
            print(f"  {name:<14} {spec.description}  [packages: {' '.join(spec.packages)}]")
        return 0
    s = suites.get_suite(args.suite)
    methods = s.methods
    if args.methods:
        methods = select_methods(s, [m.strip() for m in args.methods.split(",") if m.strip()])
    user_models = {}
    for item in args.model:
        task, sep, folder = item.partition("=")
        if not sep or task not in s.tasks:
            raise MergelabError(f"--model {item!r}: expected TASK=DIR with TASK one of {', '.join(s.tasks)}")
        if not Path(folder).is_dir():
            raise MergelabError(f"--model {item!r}: {folder} is not a folder")
        user_models[task] = folder
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise MergelabError(f"--seeds {args.seeds!r}: expected integers separated by commas") from None
    resume = []
    for f in args.resume:
        try:
            prev = json.loads(Path(f).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MergelabError(f"--resume {f}: cannot read a benchmark result ({exc})") from None
        if not isinstance(prev, dict) or "runs" not in prev:
            raise MergelabError(f"--resume {f}: not a mergelab bench result (no 'runs')")
        prev["_source"] = f"--resume {f}"
        resume.append(prev)
    out = Path(args.out or f"runs/{s.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from mergelab.io import check_output_dir
    # before any training: a run folder never replaces an input, the working directory or a foreign folder
    check_output_dir(out, [*user_models.values(), args.base, args.cache_dir], force=True, label="--out")
    # the raw result, rewritten after every row (a partial run keeps its finished rows), is kept
    # until the report is written: a plotting failure must not cost the run
    raw = out.with_name(out.name + ".result.json")
    result = run_benchmark(s, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                           threads=args.threads, user_models=user_models, base_path=args.base,
                           methods=methods, progress=_progress(args.quiet), seeds=seeds,
                           partial_path=raw, device=args.device, resume=resume,
                           eval_cache=not args.no_eval_cache)
    raw.write_text(json.dumps(result, default=str))
    folder = report.write_report(result, out, plots=not args.no_plots)
    raw.unlink()
    print(report.markdown_table(result))
    print()
    print(report.order_text(report.order_check(result)))
    print()
    print(report.timings_table(result))
    print(f"\nrun folder: {folder} (results.md, results.csv, results.json"
          f"{'' if args.no_plots else ', per_task.png, normalized.png, lambda_sweep.png'})")
    return 0
