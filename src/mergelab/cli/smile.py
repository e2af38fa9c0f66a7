"""``mergelab upscale smile RECIPE OUT_DIR``: SMILE upscaling of Hugging Face model folders."""

from __future__ import annotations

import argparse
import time
from typing import Any

from mergelab.errors import MergelabError

# recipe ``parameters`` accepted by SMILE, with their defaults (FusionBench's CLIP settings)
DEFAULTS: dict[str, Any] = {"k": 32, "gate_k": 16, "top_k": 1, "target_modules": None,
                            "average_experts": False, "routing_use_diff": True, "svd": "auto"}


def add_parser(subparsers) -> None:
    up = subparsers.add_parser("upscale", help="upscale fine-tunings of one base into a mixture model")
    sub = up.add_subparsers(dest="upscale_method", required=True)
    p = sub.add_parser("smile", help="SMILE: base + rank-k SVD experts of each task delta + data-free router",
                       description="Build a SMILE model (Tang et al. 2024) from a mergekit-style recipe: "
                                   "base_model, models, parameters {k, gate_k, top_k, target_modules, "
                                   "average_experts, routing_use_diff, svd}. Flags override the recipe.")
    p.add_argument("recipe", help="YAML recipe (mergekit layout; merge_method: smile is optional)")
    p.add_argument("out_dir", help="output folder (config.json, model.safetensors, smile_config.json)")
    p.add_argument("--k", type=int, default=None, help="rank of each expert, -1 = dense experts (default 32)")
    p.add_argument("--gate-k", type=int, default=None, help="right singular vectors per expert in the router "
                   "(default 16)")
    p.add_argument("--top-k", type=int, default=None, help="experts used per token (default 1)")
    p.add_argument("--target", nargs="+", default=None, metavar="PATTERN",
                   help="glob patterns of Linear module names to upscale, e.g. 'query' 'encoder.layer.*.output.dense'"
                        " (default: every nn.Linear)")
    p.add_argument("--average-experts", action=argparse.BooleanOptionalAction, default=None,
                   help="non-upscaled parameters = average of the fine-tunes (default: the base's)")
    p.add_argument("--routing-use-diff", action=argparse.BooleanOptionalAction, default=None,
                   help="router from the deltas (default) or, with --no-routing-use-diff, the fine-tuned weights")
    p.add_argument("--svd", choices=("auto", "full", "lowrank"), default=None,
                   help="SVD: exact, randomized (torch.svd_lowrank), or auto (randomized for small ranks)")
    p.add_argument("--device", default="cpu", help="where the model and the SVDs live: cpu (default) or cuda")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def resolve_options(recipe_params: dict[str, Any], args: argparse.Namespace, where: str) -> dict[str, Any]:
    """Recipe parameters over defaults, flags over both; unknown keys are errors."""
    params = dict(recipe_params)
    if "full_svd" in params:  # python-API spelling
        params["svd"] = {True: "full", False: "lowrank"}.get(params.pop("full_svd"), "auto")
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise MergelabError(f"{where}: unknown SMILE parameter {unknown[0]!r} (known: {', '.join(DEFAULTS)})")
    opts = {**DEFAULTS, **params}
    flags = {"k": args.k, "gate_k": args.gate_k, "top_k": args.top_k, "target_modules": args.target,
             "average_experts": args.average_experts, "routing_use_diff": args.routing_use_diff, "svd": args.svd}
    opts.update({key: v for key, v in flags.items() if v is not None})
    for key in ("k", "gate_k", "top_k"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int):
            raise MergelabError(f"{where}: parameters.{key} must be an integer, got {opts[key]!r}")
    if opts["k"] == 0 or opts["k"] < -1:
        raise MergelabError(f"{where}: k must be a positive rank or -1 (dense experts), got {opts['k']}")
    for key in ("gate_k", "top_k"):
        if opts[key] < 1:
            raise MergelabError(f"{where}: {key} must be at least 1, got {opts[key]}")
    for key in ("average_experts", "routing_use_diff"):
        if not isinstance(opts[key], bool):
            raise MergelabError(f"{where}: parameters.{key} must be true or false, got {opts[key]!r}")
    t = opts["target_modules"]
    if isinstance(t, str):
        opts["target_modules"] = [t]
    elif t is not None and (not isinstance(t, list) or not all(isinstance(x, str) for x in t)):
        raise MergelabError(f"{where}: parameters.target_modules must be a list of name patterns")
    if opts["svd"] not in ("auto", "full", "lowrank"):
        raise MergelabError(f"{where}: parameters.svd must be auto, full or lowrank, got {opts['svd']!r}")
    return opts


def check_inputs(base, checkpoints, base_label: str, labels: list[str]) -> None:
    """The structure check of ``merge`` for SMILE (names matched up to a wrapper prefix, as SMILE
    reads them): every floating-point tensor of the base is in each fine-tune with the same shape,
    and every tensor read is finite. One line naming the file and tensor otherwise."""
    from mergelab.io import check_finite
    from mergelab.upscale.smile import _Source

    names = [n for n in base.keys() if base.dtype(n).is_floating_point]
    for n in names:
        check_finite(base.get(n), base_label, n)
    for i, (ck, label) in enumerate(zip(checkpoints, labels)):
        src = _Source(ck, i, names)
        problems = []
        for n in names:
            key = src.key(n)
            if key is None:
                problems.append(f"tensor {n!r} missing")
            elif tuple(ck.shape(key)) != tuple(base.shape(n)):
                problems.append(f"tensor {key!r} has shape {list(ck.shape(key))}, {base_label} has "
                                f"{list(base.shape(n))}")
            if len(problems) >= 3:
                break
        if problems:
            raise MergelabError(f"inputs do not match: {label}: " + "; ".join(problems)
                                + (" ..." if len(problems) >= 3 else ""))
        for n in names:
            check_finite(ck.get(src.key(n)), label, src.key(n))


def run(args: argparse.Namespace) -> int:
    from mergelab.io import claim_output
    from mergelab.cli.common import check_device
    from mergelab.engine.recipe import load_recipe

    args.device = check_device(args.device)
    recipe = load_recipe(args.recipe, method_required=False, validate=False)
    with claim_output(args.out_dir, recipe.input_paths(), force=args.force):
        return _run(args, recipe)


def _run(args: argparse.Namespace, recipe) -> int:
    from mergelab.io import model_folder, open_checkpoint
    from mergelab.upscale.smile import (count_parameters, load_base_model, parameter_report, save_smile,
                                        upscale_to_smile)

    started = time.perf_counter()
    where = str(recipe.source or args.recipe)
    if recipe.method not in ("", "smile", "smile_upscaling"):
        raise MergelabError(f"{where}: merge_method is {recipe.method!r}; this command runs SMILE "
                            "(use 'mergelab merge' for other methods)")
    if recipe.base_model is None:
        raise MergelabError(f"{where}: SMILE needs a 'base_model'")
    for i, m in enumerate(recipe.models):
        if m.params:
            raise MergelabError(f"{where}: models[{i}].parameters: SMILE takes no per-model parameters")
    opts = resolve_options(recipe.params, args, where)
    if opts["top_k"] > len(recipe.models):
        raise MergelabError(f"{where}: top_k={opts['top_k']} is more than the {len(recipe.models)} experts "
                            "(one per fine-tuned model)")
    checkpoints = []
    bar = None
    try:
        with open_checkpoint(recipe.base_model) as base_ckpt:    # our reader first: strict headers, no pickles
            checkpoints.extend(open_checkpoint(m.path) for m in recipe.models)
            check_inputs(base_ckpt, checkpoints, recipe.base_model, [m.path for m in recipe.models])
        base = load_base_model(recipe.base_model, args.device)
        base_params = count_parameters(base)
        if not args.quiet:
            from mergelab.cli.common import TqdmProgress
            bar = TqdmProgress(unit="layer")
        model = upscale_to_smile(base, checkpoints, k=opts["k"], gate_k=opts["gate_k"], top_k=opts["top_k"],
                                 target_modules=opts["target_modules"], average_experts=opts["average_experts"],
                                 routing_use_diff=opts["routing_use_diff"], full_svd=opts["svd"], inplace=True,
                                 progress=bar)
    finally:
        if bar is not None:
            bar.close()
        for c in checkpoints:
            c.close()
    out = save_smile(model, args.out_dir, overwrite=args.force, tokenizer_folder=model_folder(recipe.base_model),
                     inputs=recipe.input_paths(), base_model=recipe.base_model,
                     models=[m.path for m in recipe.models])
    rep = parameter_report(model, base_params, len(recipe.models))
    info = model.smile_info
    print(f"SMILE: upscaled {len(info['layers'])} Linear layers with {info['num_experts']} experts "
          f"(k={opts['k']}, gate_k={opts['gate_k']}, top_k={opts['top_k']}, svd={opts['svd']}); "
          f"{len(info['skipped_zero_delta'])} left as Linear (zero deltas) in {time.perf_counter() - started:.1f} s "
          f"-> {out}")
    print(f"parameters: {rep['smile_params'] / 1e6:.2f} M = {rep['ratio_vs_base']:.2f}x the base "
          f"({rep['base_params'] / 1e6:.2f} M), {rep['ratio_vs_separate']:.2f}x {len(recipe.models)} separate "
          f"models ({rep['separate_params'] / 1e6:.2f} M)")
    return 0
