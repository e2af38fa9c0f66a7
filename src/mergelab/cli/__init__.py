"""Command line: a thin layer over the library that adds progress bars and summaries.

A new command is a new module here with ``add_parser(subparsers)`` plus its name in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from mergelab.errors import MergelabError

# one module per command (group); each exposes add_parser(subparsers) and imports nothing heavy at the top,
# so that --help and argument errors answer at once
COMMAND_MODULES: tuple[str, ...] = ("merge", "methods", "demo", "smile", "moe", "lora", "adapt", "recycle", "bench",
                                    "search", "emr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergelab", description="Merge fine-tunings of one foundation model.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name in COMMAND_MODULES:
        importlib.import_module(f"mergelab.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MergelabError as e:
        print(f"mergelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
