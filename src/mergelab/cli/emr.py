"""``mergelab emr RECIPE OUT_DIR``: EMR-Merging of Hugging Face model folders into a per-task folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mergelab.errors import MergelabError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("emr", help="EMR-Merging: one unified task vector + per-task masks and rescalers",
                              description="Elect a unified task vector and per-task masks and rescalers (Huang et "
                                          "al. 2024) from a recipe's base_model and models. The output folder holds "
                                          "the base, the unified task vector, bit-packed masks and emr_config.json; "
                                          "mergelab.upscale.emr.load_emr(OUT_DIR, task) builds one task's model. "
                                          "Task names are the model folders' names. Loads every model into memory.")
    p.add_argument("recipe", help="YAML recipe (mergekit layout; merge_method is ignored)")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mergelab.engine.recipe import load_recipe
    from mergelab.io import load_state_dict, model_folder
    from mergelab.upscale.emr import emr_from_state_dicts, save_emr
    t0 = time.perf_counter()
    recipe = load_recipe(args.recipe, method_required=False, validate=False)
    if recipe.base_model is None:
        raise MergelabError(f"{args.recipe}: EMR needs a 'base_model' (it elects over task vectors)")
    out = Path(args.out_dir).expanduser().resolve()
    if out.exists() and not args.force:
        raise MergelabError(f"{out}: already exists (use --force to replace it)")
    names = [Path(m.path).name for m in recipe.models]
    if len(set(names)) != len(names):
        names = [f"task{i}" for i in range(len(names))]
    base = load_state_dict(recipe.base_model)
    finetuned = [load_state_dict(m.path) for m in recipe.models]
    result = emr_from_state_dicts(base, finetuned)
    del finetuned
    folder = model_folder(recipe.base_model)
    model_class = None
    if folder is not None and (folder / "config.json").is_file():
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or [None]
        model_class = archs[0]
    info = save_emr(out, base, result, names, model_folder=folder, model_class=model_class, overwrite=args.force)
    print(f"wrote {info['out_dir']}: {len(names)} tasks, shared {info['shared_bytes'] / 2**20:.1f} MiB, "
          f"extra per task {info['extra_bytes_per_task'][0] / 2**20:.2f} MiB (mask bits + one float32), "
          f"rescalers {', '.join(f'{x:.3f}' for x in info['rescalers'])} in {time.perf_counter() - t0:.1f} s")
    return 0
