"""`mergelab merge RECIPE OUT_DIR`: a streaming merge as a recipe says."""

from __future__ import annotations

import argparse

from mergelab.cli.common import TqdmProgress, check_device, positive_int


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


SEMANTICS = {"mergekit": "mergekit 0.1.5 semantics (compat: paper for the papers')",
             "paper": "paper semantics (compat: paper)"}


def _run(args: argparse.Namespace) -> int:
    args.device = check_device(args.device)
    _tune_for_streaming(args.threads or 2)
    from mergelab.engine.multistage import is_multistage
    if is_multistage(args.recipe):
        return _run_stages(args)
    from mergelab.engine.linear_lane import merge_recipe
    from mergelab.engine.recipe import load_recipe
    from mergelab.io import claim_output
    recipe = load_recipe(args.recipe, compat=args.compat)
    progress = TqdmProgress(args.quiet)
    options = {"force": args.force, "threads": args.threads, "shard_size": args.shard_size, "progress": progress,
               "random_seed": args.random_seed}
    try:
        # OUT_DIR checked and locked before any tensor is read: a second run into it fails at once
        with claim_output(args.out_dir, recipe.input_paths(), force=args.force):
            # task arithmetic on numpy where the lane takes it (no torch import), else the torch engine
            summary = merge_recipe(recipe, args.out_dir, device=args.device,
                                   before_engine=lambda: _torch_threads(args.threads), **options)
    finally:
        progress.close()
    _print_summary(summary)
    return 0


def _torch_threads(threads: int | None) -> None:
    """The engine parallelises over tensors: one intra-op thread per worker avoids oversubscribing."""
    if threads != 1:
        import torch
        torch.set_num_threads(1)


def _run_stages(args: argparse.Namespace) -> int:
    """A file of several recipes (mergekit-multi): every stage in dependency order, unchanged ones reused."""
    import sys

    from mergelab.engine.multistage import merge_stages
    progress = TqdmProgress(args.quiet)

    def announce(i: int, n: int, stage) -> None:
        if not args.quiet:
            print(f"stage {i + 1}/{n}: {stage.name or '(final)'}", file=sys.stderr)

    try:
        results = merge_stages(args.recipe, args.out_dir, intermediate_dir=args.intermediate_dir, force=args.force,
                               merge_kwargs={"compat": args.compat, "device": args.device, "threads": args.threads,
                                             "shard_size": args.shard_size, "progress": progress,
                                             "random_seed": args.random_seed},
                               on_stage=announce, before_engine=lambda: _torch_threads(args.threads))
    finally:
        progress.close()
    for r in results:
        how = "reused (unchanged)" if r.reused else f"merged in {r.seconds:.1f} s"
        print(f"{r.name or '(final)'}: {how} -> {r.out_dir}")
    return 0


def _print_summary(summary) -> None:
    gb = summary.bytes_written / 1e9
    semantics = SEMANTICS[summary.compat]
    print(f"merged {summary.merged} tensors ({summary.parameters / 1e6:.1f} M parameters, "
          f"{summary.copied} copied from the base) with {summary.method}, {semantics}, "
          f"in {summary.seconds:.1f} s{' (numpy, without torch)' if summary.engine == 'numpy' else ''} "
          f"-> {summary.out_dir} ({summary.shards} shard(s), {gb:.2f} GB)")
    for note in summary.notes:
        print(f"note: ignored, as mergekit does: {note}")


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge checkpoints as a recipe says")
    p.add_argument("recipe", help="YAML recipe (mergekit layout)")
    p.add_argument("out_dir", help="output folder (a Hugging Face model folder)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--compat", choices=("paper", "mergekit"), default=None,
                   help="semantics: mergekit 0.1.5's (default, so mergekit recipes run unchanged) or the papers'; "
                        "wins over the recipe's 'compat'")
    p.add_argument("--device", default=None, help="where the per-tensor math runs: cpu (default) or cuda")
    p.add_argument("--threads", type=positive_int, default=None, help="tensors merged in parallel")
    p.add_argument("--shard-size", default=None, help="largest output shard, e.g. 2GB")
    p.add_argument("--intermediate-dir", default=None,
                   help="multi-document recipes: where named stages are kept (default: OUT_DIR.stages beside it)")
    p.add_argument("--random-seed", type=int, default=None, metavar="N",
                   help="DARE / DELLA masks entry for entry as 'mergekit-yaml --random-seed N' draws them on CPU "
                        "(mergekit semantics; 1.5-1.7x slower: mergekit's one generator stream is walked first); "
                        "without it, mergelab's masks from the recipe's 'seed' (reproducible, other draws)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
