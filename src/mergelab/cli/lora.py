"""``mergelab lora-merge RECIPE OUT_DIR --rank R``: merge PEFT LoRA adapters into one adapter."""

from __future__ import annotations

import argparse

from mergelab.cli.common import positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lora-merge", help="merge LoRA adapters (any method) into one PEFT LoRA adapter of a chosen rank",
        description="Merge the PEFT LoRA adapters listed under 'models' of a recipe (all on the recipe's "
                    "base_model) with the recipe's merge_method, on their dense deltas B@A, and write the "
                    "result as a PEFT adapter whose every module is the best rank-R approximation (SVD) of "
                    "its merged delta. Load it with peft.PeftModel.from_pretrained(base, OUT_DIR).")
    p.add_argument("recipe", help="recipe YAML (mergekit layout) whose models are adapter folders")
    p.add_argument("out_dir", help="output adapter folder (written atomically)")
    p.add_argument("--rank", type=positive_int, required=True,
                   help="rank R of the merged adapter (clipped to each module's min(d_out, d_in))")
    p.add_argument("--warn-error", type=float, default=None, metavar="E",
                   help="warn when a module's truncation error ||dW - dW_R||/||dW|| exceeds E (default 0.05)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--compat", choices=("paper", "mergekit"), default=None, help="method semantics")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--threads", type=positive_int, default=None, help="tensors merged in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import sys

    from mergelab.cli.common import TqdmProgress, check_device
    from mergelab.engine.lora_export import WARN_ERROR, merge_to_adapter

    args.device = check_device(args.device)
    from mergelab.engine.recipe import load_recipe
    from mergelab.io import claim_output
    recipe = load_recipe(args.recipe, compat=args.compat)
    progress = TqdmProgress(args.quiet)
    try:
        with claim_output(args.out_dir, recipe.input_paths(), force=args.force):
            s = merge_to_adapter(recipe, args.out_dir, args.rank, force=args.force,
                                 device=args.device, threads=args.threads, progress=progress,
                                 warn_error=WARN_ERROR if args.warn_error is None else args.warn_error)
    finally:
        progress.close()
    print(f"merged adapter with {s.method}: {s.modules} modules at rank {s.rank} in {s.seconds:.1f} s -> "
          f"{s.out_dir} ({s.bytes_written / 1e6:.2f} MB); rank-{s.rank} truncation error "
          f"||dW - dW_r||/||dW||: overall {s.overall_relative_error:.2e}, mean {s.mean_relative_error:.2e}, "
          f"max {s.max_relative_error:.2e}")
    worst = sorted(s.layer_errors.items(), key=lambda kv: -kv[1])
    if not args.quiet:
        for name, err in worst[:5]:
            print(f"  {err:.2e}  {name}")
        if len(worst) > 5:
            print(f"  ... {len(worst) - 5} more modules (mergelab_recipe.yaml: truncation_errors)")
    for w in s.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0
