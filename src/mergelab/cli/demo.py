"""`mergelab demo`: merge small synthetic checkpoints with every method and print a table."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from mergelab.bench.synthetic import run_demo
    return run_demo(args.out, quiet=args.quiet)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="build small real checkpoints, merge them with every method, print a table")
    p.add_argument("--out", default=None, help="keep the demo's files here (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
