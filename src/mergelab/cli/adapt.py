"""`mergelab adapt adamerging|concrete RECIPE OUT_DIR --data DIR`: test-time adaptation of a merge
of Hugging Face text encoders (mean-pooled, one linear head per task)."""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from mergelab.cli.common import finite_float, nonnegative_int, positive_float, positive_int, tqdm_bar
from mergelab.errors import MergelabError

COMMON = {"steps": int, "lr": float, "batch_size": int, "batches_per_task": int, "max_length": int,
          "eval_every": int, "seed": int, "granularity": str, "clamp": bool}
ADAMERGING = {**COMMON, "init": float, "ties_trim": float}
CONCRETE = {**COMMON, "inner": str, "temperature": float, "init_logits": float, "lam": float, "inner_lr": float,
            "tta_steps": int, "tta_lr": float, "mask": str, "inner_optimizer": str, "init_mask": str}
DEFAULTS = {
    "adamerging": {"granularity": "layer", "steps": 500, "lr": 1e-3, "init": 0.3, "clamp": True, "ties_trim": None,
                   "batch_size": 16, "batches_per_task": 2, "max_length": 64, "eval_every": None, "seed": 0},
    "concrete": {"inner": "task_arithmetic", "granularity": "layer", "steps": None, "lr": 1e-3, "temperature": 0.5,
                 "init_logits": 0.0, "lam": 0.3, "inner_lr": 1e-3, "tta_steps": 1000, "tta_lr": 1e-3,
                 "mask": "continuous", "clamp": True, "batch_size": 16, "batches_per_task": 1, "max_length": 64,
                 "eval_every": None, "seed": 0, "inner_optimizer": "adam", "init_mask": None},
}


POSITIVE = {"lr", "tta_lr", "inner_lr", "temperature", "batch_size", "batches_per_task", "max_length"}
NONNEGATIVE = {"steps", "tta_steps", "eval_every"}


def _arg_type(opt: str, typ):
    if typ is float:
        return positive_float if opt in POSITIVE else finite_float
    if typ is int:
        return positive_int if opt in POSITIVE else nonnegative_int if opt in NONNEGATIVE else int
    return typ


def _check_value(k: str, v, where: str = "") -> None:
    """The ranges of the flags, for recipe values too (NaN, Inf, negative rates, zero batch sizes)."""
    import math
    if v is None or isinstance(v, (bool, str)):
        return
    if isinstance(v, float) and not math.isfinite(v):
        raise MergelabError(f"{where}{k} must be a finite number, got {v}")
    if k in POSITIVE and v <= 0:
        raise MergelabError(f"{where}{k} must be > 0, got {v}")
    if k in NONNEGATIVE and v < 0:
        raise MergelabError(f"{where}{k} must be >= 0, got {v}")
    if k == "ties_trim" and not 0 < v <= 1:
        raise MergelabError(f"{where}ties_trim must be in (0, 1], got {v}")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("adapt", help="learn merge coefficients / a mask on unlabelled data (AdaMerging, Concrete)",
                              description=__doc__)
    sub = p.add_subparsers(dest="adapt_method", metavar="{adamerging,concrete}", required=True)
    for name, kinds, helptext in (("adamerging", ADAMERGING, "task-wise or layer-wise AdaMerging (++ with --ties-trim)"),
                                  ("concrete", CONCRETE, "Concrete subspace mask with task arithmetic or AdaMerging inside")):
        q = sub.add_parser(name, help=helptext, description=helptext + ". Options override the recipe's `parameters:`.")
        q.add_argument("recipe", help="mergekit-style YAML: base_model, models: [{model: PATH}], parameters")
        q.add_argument("out_dir", help="output folder (a merged Hugging Face checkpoint)")
        q.add_argument("--data", required=True, help="folder with one sub-folder per task (inputs.txt, "
                       "head.safetensors, optional val.tsv), in the order of the recipe's models")
        q.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
        q.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        q.add_argument("--device", default=None, help="e.g. cuda; default cpu")
        for opt, typ in kinds.items():
            flag = "--" + opt.replace("_", "-")
            d = DEFAULTS[name].get(opt)
            if typ is bool:
                q.add_argument(flag, type=_bool, default=None, metavar="BOOL", help=f"default {d}")
            else:
                choices = {"granularity": ["layer", "task"], "inner": ["task_arithmetic", "adamerging"],
                           "mask": ["continuous", "discrete", "threshold"], "inner_optimizer": ["adam", "sgd"]}.get(opt)
                q.add_argument(flag, type=_arg_type(opt, typ), default=None, choices=choices, help=f"default {d}")
        q.set_defaults(func=run, adapt_kinds=kinds)


def _options(args, recipe_params: dict) -> dict:
    method = args.adapt_method
    kinds = args.adapt_kinds
    opts = dict(DEFAULTS[method])
    for k, v in recipe_params.items():
        k = {"lambda": "lam", "scaling_factor": "lam"}.get(k, k) if method == "concrete" else k
        if k not in kinds:
            raise MergelabError(f"recipe parameter '{k}' is not an option of 'adapt {method}' "
                                f"(known: {', '.join(sorted(kinds))})")
        try:
            opts[k] = None if v is None else (_bool(str(v)) if kinds[k] is bool else kinds[k](v))
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise MergelabError(f"recipe parameter '{k}': {exc}") from exc
    for k in kinds:
        v = getattr(args, k, None)
        if v is not None:
            opts[k] = v
    if method == "concrete" and opts["steps"] is None:
        opts["steps"] = 2000 if opts["inner"] == "task_arithmetic" else 1000
    for k, v in opts.items():
        _check_value(k, v)
    for k, choices in (("granularity", ("layer", "task")), ("inner", ("task_arithmetic", "adamerging")),
                       ("mask", ("continuous", "discrete", "threshold"))):
        if k in kinds and opts.get(k) not in choices:
            raise MergelabError(f"{k} must be one of {', '.join(choices)}, got {opts.get(k)!r}")
    return opts


def _init_mask(path: str | None) -> dict | None:
    """Mask logits of an earlier Concrete run (its OUT_DIR or adapt_result.safetensors), in encoder names."""
    if path is None:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    p = Path(path).expanduser()
    f = p / "adapt_result.safetensors" if p.is_dir() else p
    try:
        tensors = load_file(str(f))
    except (OSError, SafetensorError) as e:
        raise MergelabError(f"{f}: cannot read mask logits ({e})") from None
    logits = {"encoder." + k[len("mask_logits."):]: v for k, v in tensors.items() if k.startswith("mask_logits.")}
    if not logits:
        raise MergelabError(f"{f}: holds no mask logits (written by 'mergelab adapt concrete' of this version)")
    return logits


def _read_recipe(path: str):
    """(base path, [model paths], parameters) from a mergekit-layout recipe (merge_method is ignored)."""
    from mergelab.engine.recipe import load_recipe
    r = load_recipe(path, method_required=False, validate=False)
    if not r.base_model:
        raise MergelabError(f"{path}: adapt needs base_model")
    if not r.models:
        raise MergelabError(f"{path}: no models")
    return str(r.base_model), [str(m.path) for m in r.models], dict(r.params or {})


def _load_encoder(path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    if not Path(path).exists():
        raise MergelabError(f"{path}: no such checkpoint folder")
    from mergelab.io import open_checkpoint
    open_checkpoint(path).close()      # our reader first: strict headers, pickles refused with a clear line
    try:
        return AutoModel.from_pretrained(path, attn_implementation="eager")
    except Exception as exc:
        raise MergelabError(f"{path}: cannot load as a Hugging Face encoder ({type(exc).__name__}: {exc})") from exc


def _stored(model_sd: dict, path: str) -> dict:
    """The model's tensors that the checkpoint really stores (transformers initialises the others
    at random, e.g. a pooler the checkpoint lacks: those must be neither merged nor written)."""
    from mergelab.io import open_checkpoint
    with open_checkpoint(path) as ck:
        disk = set(ck.keys())
    ends = {d.split(".", 1)[1] for d in disk if "." in d}  # "bert.encoder..." stored for "encoder..."
    kept = {k: v for k, v in model_sd.items() if k in disk or k in ends}
    if not kept:
        raise MergelabError(f"{path}: none of the checkpoint's tensor names match the loaded model's")
    return kept


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def pairing_warnings(task_names: list[str], model_paths: list[str]) -> list[str]:
    """Warnings when the --data task folders and the recipe's models (paired by position) do not line up:
    a task whose name is not in its own model's path but is in another model's path."""
    models = [_norm(str(Path(p).expanduser().resolve())) for p in model_paths]
    out = []
    for i, task in enumerate(task_names):
        t = _norm(task)
        if not t or t in models[i]:
            continue
        others = [j for j, m in enumerate(models) if j != i and t in m]
        if others:
            out.append(f"task '{task}' (task folder {i + 1}) is paired with models[{i}] ({model_paths[i]}), but its "
                       f"name is in models[{others[0]}] ({model_paths[others[0]]}): tasks pair with models by "
                       "position (tasks.txt, else sorted folder names); check the order")
    return out


def stage_entropies(history: list[dict]) -> list[tuple[str, float, float]]:
    """(stage, first entropy, last entropy) for each stage of the run, in order (Concrete: mask, then tta)."""
    out: list[tuple[str, float, float]] = []
    for h in history:
        if "entropy" not in h:
            continue
        stage = h.get("stage", "")
        if out and out[-1][0] == stage:
            out[-1] = (stage, out[-1][1], h["entropy"])
        else:
            out.append((stage, h["entropy"], h["entropy"]))
    return out


def run(args) -> int:
    import sys

    import torch

    from mergelab.cli.common import check_device
    from mergelab.io import claim_output

    t_start = time.perf_counter()
    args.device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_path, model_paths, rparams = _read_recipe(args.recipe)
    opts = _options(args, rparams)
    with claim_output(args.out_dir, [base_path, *model_paths, args.data], force=args.force) as out:
        return _run(args, out, base_path, model_paths, opts, t_start)


def _run(args, out: Path, base_path: str, model_paths: list, opts: dict, t_start: float) -> int:
    import torch
    from mergelab.io import atomic_output_dir, check_finite_state, copy_model_files, save_state_dict
    from mergelab.io.model_card import write_model_card
    from tqdm import tqdm
    from mergelab.adapt import adamerging, concrete_merge, plot_history, task_vectors_from
    from mergelab.adapt.functional import FunctionalModel
    from mergelab.adapt.text import (PooledEncoder, ShuffledBatches, accuracy_fn, prefixed, read_data_dir, tokenize,
                                     unprefixed)
    method = args.adapt_method

    from transformers import AutoTokenizer
    base = _load_encoder(base_path)
    try:
        tok = AutoTokenizer.from_pretrained(base_path)
    except Exception as exc:
        raise MergelabError(f"{base_path}: no usable tokenizer ({exc})") from exc
    pad_id = tok.pad_token_id or 0
    hidden = getattr(base.config, "hidden_size", None)
    tasks = read_data_dir(args.data, len(model_paths), hidden, model_paths)
    for w in pairing_warnings([t.name for t in tasks], model_paths):
        print(f"warning: {w}", file=sys.stderr)
    for t, p in zip(tasks, model_paths):
        if t.head_path and Path(t.head_path).parent != Path(args.data) / t.name:
            print(f"note: {Path(args.data) / t.name / 'head.safetensors'} is missing: task '{t.name}' uses the head "
                  f"of its model folder, {t.head_path}", file=sys.stderr)
    base_sd = {k: v.detach().clone() for k, v in _stored(base.state_dict(), base_path).items()}
    check_finite_state(base_sd, base_path)
    tvs = []
    for p in model_paths:
        ft = _stored(_load_encoder(p).state_dict(), p)
        check_finite_state(ft, p)
        try:
            tvs.append(prefixed(task_vectors_from(base_sd, [ft])[0]))
        except MergelabError as exc:
            raise MergelabError(f"{p}: {exc}") from exc
        del ft
    model = PooledEncoder(base)
    heads = [t.head.to(args.device) if args.device else t.head for t in tasks]
    loaders = [ShuffledBatches(tokenize(tok, t.texts, opts["max_length"]), opts["batch_size"], opts["seed"] + i, pad_id)
               for i, t in enumerate(tasks)]
    eval_fn = None
    if all(t.val_texts for t in tasks):
        vseqs = [tokenize(tok, t.val_texts, opts["max_length"]) for t in tasks]
        eval_fn = accuracy_fn(FunctionalModel(model, device=args.device), heads, vseqs,
                              [t.val_labels for t in tasks], pad_id=pad_id)
    total = opts["steps"] + (opts["tta_steps"] if method == "concrete" and opts["inner"] == "adamerging" else 0)
    eval_every = opts["eval_every"] if opts["eval_every"] is not None else max(1, total // 10)
    bar = tqdm_bar(args.quiet, total=total, desc=f"{method}", unit="step")

    def progress(rec):
        bar.update(1)
        post = {"entropy": f"{rec['entropy']:.4f}"}
        if "val_accuracy" in rec:
            post["val_acc"] = f"{rec['val_accuracy']:.4f}"
        bar.set_postfix(post)

    common = dict(steps=opts["steps"], lr=opts["lr"], clamp=opts["clamp"], batches_per_task=opts["batches_per_task"],
                  progress=progress, eval_fn=eval_fn, eval_every=eval_every, device=args.device)
    try:
        if method == "adamerging":
            res = adamerging(model, prefixed(base_sd), tvs, loaders, heads, granularity=opts["granularity"],
                             init=opts["init"], ties_trim=opts["ties_trim"], **common)
        else:
            res = concrete_merge(model, prefixed(base_sd), tvs, loaders, heads, inner=opts["inner"],
                                 granularity=opts["granularity"], temperature=opts["temperature"],
                                 init_logits=opts["init_logits"], lam=opts["lam"], inner_lr=opts["inner_lr"],
                                 tta_steps=opts["tta_steps"], tta_lr=opts["tta_lr"], mask=opts["mask"],
                                 seed=opts["seed"], inner_optimizer=opts["inner_optimizer"],
                                 init_mask_logits=_init_mask(opts["init_mask"]), **common)
    finally:
        bar.close()
    for warning in res.config.get("warnings", []):
        print(f"mergelab: warning: {warning}", file=sys.stderr)
    res.config.update({"recipe": str(args.recipe), "base_model": base_path, "models": model_paths,
                       "data": str(args.data), "tasks": [t.name for t in tasks], "batch_size": opts["batch_size"],
                       "max_length": opts["max_length"]})
    res.keys = [k[len("encoder."):] for k in res.keys]
    if res.mask is not None:
        res.mask = unprefixed(res.mask)
    if res.mask_logits is not None:
        res.mask_logits = unprefixed(res.mask_logits)
    if not bool(torch.isfinite(res.coefficients).all()):
        raise MergelabError(f"{method}: the learned coefficients are not finite; nothing written")
    check_finite_state(res.mask or {}, f"{method}: learned mask")
    check_finite_state(res.merged_state_dict, f"{method}: merged model")

    with atomic_output_dir(out, force=args.force, command="adapt") as tmp:
        save_state_dict(unprefixed(res.merged_state_dict), tmp)
        copy_model_files(Path(base_path), tmp)
        res.save_side_files(tmp)
        plot_history(res.history, tmp / "history.png", title=res.config["method"])
        write_model_card(tmp, method=res.config["method"], base_model=base_path, models=model_paths, kind="merge",
                         tags=["test-time-adaptation"], recipe={k: v for k, v in res.config.items() if k != "warnings"},
                         extra="Coefficients and mask learned by entropy minimisation on unlabelled inputs "
                               "(adapt_result.json, adapt_result.safetensors).")
    secs = [h["seconds"] for h in res.history if "seconds" in h]
    stages = stage_entropies(res.history)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    c = res.coefficients
    per_task = c.tolist() if c.dim() == 1 else c.mean(0).tolist()
    entropy = "; ".join(f"{stage + ' ' if len(stages) > 1 else ''}entropy {a:.4f} -> {b:.4f}"
                        for stage, a, b in stages)
    print(f"{res.config['method']}: {len(tasks)} tasks, {total} steps, {entropy}"
          if stages else f"{res.config['method']}: 0 steps")
    print("coefficients" + (" (mean over tensors)" if c.dim() == 2 else "") + ": "
          + ", ".join(f"{t.name}={v:.3f}" for t, v in zip(tasks, per_task)))
    accs = [h["val_accuracy"] for h in res.history if "val_accuracy" in h]
    if accs:
        print(f"average validation accuracy: {accs[0]:.4f} (start) -> {accs[-1]:.4f} (end)")
    if secs:
        print(f"seconds per step: {statistics.median(secs):.3f} (median); peak memory {peak_mb:.0f} MB; "
              f"total {time.perf_counter() - t_start:.0f} s")
    print(f"wrote {out}")
    return 0
