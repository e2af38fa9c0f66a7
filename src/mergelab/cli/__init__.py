"""Command line: a thin layer over the library that adds progress bars and summaries."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from mergelab.errors import MergelabError

# command groups living in their own modules; each exposes add_parser(subparsers)
PLUGIN_COMMANDS: tuple[str, ...] = ("mergelab.cli_smile", "mergelab.cli_adapt", "mergelab.cli_recycle",
                                     "mergelab.cli_lora", "mergelab.cli_bench")


class TqdmProgress:
    """Progress callback ``(stage, done, total)`` drawing one tqdm bar per stage on stderr.

    Bars are shown on a terminal only (``quiet`` hides them everywhere) and closed before any error
    message, so that the error stands on its own line.
    """

    def __init__(self, quiet: bool = False, unit: str = "tensor"):
        self.disable = True if quiet else None      # None: tqdm shows bars only on a TTY
        self.unit = unit
        self.bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=self.unit, disable=self.disable,
                                          dynamic_ncols=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _tune_for_streaming(threads: int) -> None:
    """Keep the merge's freed blocks in the heap for reuse, and keep the garbage collector off torch's
    objects.

    A merge allocates and frees blocks of the same few sizes (tens of MB) over and over. glibc's default
    serves them with fresh ``mmap`` pages, each zeroed by a page fault when first touched: that kernel
    time was more than half of a merge's CPU time. Served from the heap instead (blocks up to 32 MiB;
    no trimming), freed blocks are reused, and since blocks are bounded in size the heap stays
    bounded too; larger buffers (a few stacked task vectors) still get their own maps, which keeps
    the heap from fragmenting. Few arenas (one per merge thread) keep worker threads from each
    holding their own peak. ``gc.freeze`` moves the ~10^5 objects of the torch import out of the
    collector's sight.
    """
    import ctypes
    import ctypes.util
    import gc
    gc.freeze()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 << 20)               # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)                # M_TRIM_THRESHOLD
        libc.mallopt(-8, max(1, threads))        # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from mergelab.engine import merge
    _tune_for_streaming(args.threads or 2)
    if args.threads != 1:
        # the engine parallelises over tensors; one intra-op thread per worker avoids oversubscribing
        torch.set_num_threads(1)
    progress = TqdmProgress(args.quiet)
    try:
        summary = merge(args.recipe, args.out_dir, force=args.force, compat=args.compat, device=args.device,
                        threads=args.threads, shard_size=args.shard_size, progress=progress)
    finally:
        progress.close()
    gb = summary.bytes_written / 1e9
    print(f"merged {summary.merged} tensors ({summary.parameters / 1e6:.1f} M parameters, "
          f"{summary.copied} copied from the base) with {summary.method} [{summary.compat}] "
          f"in {summary.seconds:.1f} s -> {summary.out_dir} ({summary.shards} shard(s), {gb:.2f} GB)")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from mergelab.methods import list_methods
    for m in list_methods():
        alias = f" (alias: {', '.join(m.aliases)})" if m.aliases else ""
        base = "needs base" if m.needs_base else "no base needed"
        print(f"{m.name}{alias} - {m.summary}  [{base}; {m.reference}]")
        for p in m.params_for(args.compat):
            scope = "per model" if p.per_model else "global"
            extra = f" one of {'|'.join(p.choices)}" if p.choices else ""
            rng = f" in [{p.low}, {p.high}]" if p.low is not None else ""
            names = "/".join((p.name, *p.aliases))
            print(f"    {names:<22} {p.kind.__name__:<5} default {p.default_for(args.compat)!r:<8} {scope:<9}"
                  f"{rng}{extra} - {p.help}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mergelab.demo import run_demo
    return run_demo(args.out, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergelab", description="Merge fine-tunings of one foundation model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge checkpoints as a recipe says")
    p.add_argument("recipe", help="YAML recipe (mergekit layout)")
    p.add_argument("out_dir", help="output folder (a Hugging Face model folder)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--compat", choices=("paper", "mergekit"), default=None,
                   help="semantics: the papers' (default) or mergekit 0.1.5's")
    p.add_argument("--device", default=None, help="where the per-tensor math runs: cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="tensors merged in parallel")
    p.add_argument("--shard-size", default=None, help="largest output shard, e.g. 2GB")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("methods", help="list merge methods with their parameters and defaults")
    p.add_argument("--compat", choices=("paper", "mergekit"), default="paper")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("demo", help="build small real checkpoints, merge them with every method, print a table")
    p.add_argument("--out", default=None, help="keep the demo's files here (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)

    for module in PLUGIN_COMMANDS:
        importlib.import_module(module).add_parser(sub)
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
