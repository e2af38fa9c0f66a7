"""`mergelab adapt METHOD RECIPE OUT_DIR --data DIR`: merges of Hugging Face text encoders (mean-pooled,
one linear head per task) learned or computed from each task's data: test-time adaptation (AdaMerging,
Concrete), data-based closed forms and weightings (RegMean, RegMean++, Fisher) and WEMoE upscaling."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from mergelab.cli.common import finite_float, nonnegative_int, positive_float, positive_int, tqdm_bar
from mergelab.errors import MergelabError

COMMON = {"steps": int, "lr": float, "batch_size": int, "batches_per_task": int, "max_length": int,
          "eval_every": int, "seed": int, "granularity": str, "clamp": bool}
ADAMERGING = {**COMMON, "init": float, "ties_trim": float}
CONCRETE = {**COMMON, "inner": str, "temperature": float, "init_logits": float, "lam": float, "inner_lr": float,
            "tta_steps": int, "tta_lr": float, "mask": str, "inner_optimizer": str, "init_mask": str}
DATA = {"num_examples": int, "batch_size": int, "max_length": int, "seed": int}
REGMEAN = {**DATA, "alpha": float, "exclude": str}
FISHER = {**DATA, "estimator": str, "labels": bool, "normalize": bool, "eps": float}
WEMOE = {"steps": int, "lr": float, "init_lambda": float, "router_hidden_layers": int, "batch_reduce": bool,
         "batch_size": int, "max_length": int, "seed": int}
_REGMEAN_DEFAULTS = {"alpha": 0.95, "num_examples": 256, "exclude": None, "batch_size": 32, "max_length": 64,
                     "seed": 0}
DEFAULTS = {
    "adamerging": {"granularity": "layer", "steps": 500, "lr": 1e-3, "init": 0.3, "clamp": True, "ties_trim": None,
                   "batch_size": 16, "batches_per_task": 2, "max_length": 64, "eval_every": None, "seed": 0},
    "concrete": {"inner": "task_arithmetic", "granularity": "layer", "steps": None, "lr": 1e-3, "temperature": 0.5,
                 "init_logits": 0.0, "lam": 0.3, "inner_lr": 1e-3, "tta_steps": 1000, "tta_lr": 1e-3,
                 "mask": "continuous", "clamp": True, "batch_size": 16, "batches_per_task": 1, "max_length": 64,
                 "eval_every": None, "seed": 0, "inner_optimizer": "adam", "init_mask": None},
    # FusionBench's / the builders' (databased/builders.py) defaults
    "regmean": dict(_REGMEAN_DEFAULTS),
    "regmean++": dict(_REGMEAN_DEFAULTS),
    "fisher": {"num_examples": 256, "estimator": "per_example", "labels": False, "normalize": True, "eps": 1e-6,
               "batch_size": 32, "max_length": 64, "seed": 0},
    "wemoe": {"steps": 1000, "lr": 1e-4, "init_lambda": 0.3, "router_hidden_layers": 2, "batch_reduce": True,
              "batch_size": 16, "max_length": 64, "seed": 0},
}
METHODS = (
    ("adamerging", ADAMERGING, "task-wise or layer-wise AdaMerging (++ with --ties-trim)"),
    ("concrete", CONCRETE, "Concrete subspace mask with task arithmetic or AdaMerging inside"),
    ("regmean", REGMEAN, "RegMean: closed-form merge of every Linear layer from the Gram matrices of its inputs "
                         "(unlabelled inputs.txt; no head needed)"),
    ("regmean++", REGMEAN, "RegMean++: RegMean with each block's inputs computed through the already merged "
                           "earlier blocks"),
    ("fisher", FISHER, "Fisher merging: diagonal-Fisher-weighted average (the model's own predictions through "
                       "head.safetensors, or with --labels the labels of val.tsv)"),
    ("wemoe", WEMOE, "WEMoE: every MLP becomes a routed ensemble of the task vectors, routers trained by entropy "
                     "minimisation; an upscaled model, loaded with mergelab.adapt.wemoe.load_wemoe"),
)
CHOICES = {"granularity": ("layer", "task"), "inner": ("task_arithmetic", "adamerging"),
           "mask": ("continuous", "discrete", "threshold"), "inner_optimizer": ("adam", "sgd"),
           "estimator": ("per_example", "batch"), "router_hidden_layers": (0, 1, 2)}


POSITIVE = {"lr", "tta_lr", "inner_lr", "temperature", "batch_size", "batches_per_task", "max_length",
            "num_examples", "eps"}
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
    if k == "alpha" and not 0 <= v <= 1:
        raise MergelabError(f"{where}alpha must be in [0, 1], got {v}")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("adapt", help="merges learned or computed from task data (AdaMerging, Concrete, "
                              "RegMean, Fisher, WEMoE)", description=__doc__)
    sub = p.add_subparsers(dest="adapt_method", metavar="{" + ",".join(m[0] for m in METHODS) + "}", required=True)
    for name, kinds, helptext in METHODS:
        q = sub.add_parser(name, help=helptext, description=helptext + ". Options override the recipe's `parameters:`.")
        q.add_argument("recipe", help="mergekit-style YAML: base_model, models: [{model: PATH}], parameters")
        q.add_argument("out_dir", help="output folder (a merged Hugging Face checkpoint)" if name != "wemoe" else
                       "output folder (a WEMoE model: config.json, model.safetensors, wemoe_config.json)")
        q.add_argument("--data", required=True, help="folder with one sub-folder per task (inputs.txt, "
                       "head.safetensors, optional val.tsv), in the order of the recipe's models")
        q.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
        q.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        q.add_argument("--device", default=None, help="e.g. cuda; default cpu")
        for opt, typ in kinds.items():
            flag = "--" + opt.replace("_", "-")
            d = DEFAULTS[name].get(opt)
            if typ is bool:       # --labels alone means true; --clamp false
                q.add_argument(flag, type=_bool, nargs="?", const=True, default=None, metavar="BOOL",
                               help=f"default {d}")
            else:
                choices = CHOICES.get(opt)
                q.add_argument(flag, type=_arg_type(opt, typ), default=None,
                               choices=list(choices) if choices else None, help=f"default {d}")
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
    for k, choices in CHOICES.items():
        if k in kinds and opts.get(k) not in choices:
            raise MergelabError(f"{k} must be one of {', '.join(map(str, choices))}, got {opts.get(k)!r}")
    if opts.get("exclude") is not None:
        import re
        try:
            re.compile(opts["exclude"])
        except re.error as exc:
            raise MergelabError(f"exclude {opts['exclude']!r}: not a regular expression ({exc})") from None
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


def _tokens(name: str) -> list[str]:
    import re
    return re.findall(r"[a-z0-9]+", name.lower())


def _names(tokens: list[str], words: list[str]) -> bool:
    """Whether ``words`` occur as consecutive whole tokens of ``tokens`` ('t1' is not in 'ft1')."""
    k = len(words)
    return k > 0 and any(tokens[i:i + k] == words for i in range(len(tokens) - k + 1))


def pairing_warnings(task_names: list[str], model_paths: list[str]) -> list[str]:
    """Warnings when the --data task folders and the recipe's models (paired by position) do not line up:
    a task whose name is not in its own model's folder name (last two path parts) but is in another's.
    Whole tokens only, and never the folders above, so that a temporary or home path cannot match."""
    models = [_tokens("/".join(Path(p).expanduser().resolve().parts[-2:])) for p in model_paths]
    out = []
    for i, task in enumerate(task_names):
        t = _tokens(task)
        if not t or _names(models[i], t):
            continue
        others = [j for j, m in enumerate(models) if j != i and _names(m, t)]
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
    import torch

    from mergelab.cli.common import check_device
    from mergelab.io import claim_output

    t_start = time.perf_counter()
    args.device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_path, model_paths, rparams = _read_recipe(args.recipe)
    opts = _options(args, rparams)
    runner = {"adamerging": _run, "concrete": _run, "regmean": _run_regmean, "regmean++": _run_regmean,
              "fisher": _run_fisher, "wemoe": _run_wemoe}[args.adapt_method]
    with claim_output(args.out_dir, [base_path, *model_paths, args.data], force=args.force) as out:
        return runner(args, out, base_path, model_paths, opts, t_start)


# ---------------------------------------------------------------- what every method shares
def _prepare(args, base_path: str, model_paths: list, need_head: bool = True):
    """The base encoder, its tokenizer and stored tensors, and the --data task folders (checked against
    the models: count, hidden size; pairing warnings and head fallbacks said on stderr)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from mergelab.adapt.text import read_data_dir
    from mergelab.io import check_finite_state
    base = _load_encoder(base_path)
    try:
        tok = AutoTokenizer.from_pretrained(base_path)
    except Exception as exc:
        raise MergelabError(f"{base_path}: no usable tokenizer ({exc})") from exc
    hidden = getattr(base.config, "hidden_size", None)
    tasks = read_data_dir(args.data, len(model_paths), hidden, model_paths, need_head=need_head)
    for w in pairing_warnings([t.name for t in tasks], model_paths):
        print(f"warning: {w}", file=sys.stderr)
    for t in tasks:
        if t.head_path and Path(t.head_path).parent != Path(args.data) / t.name:
            print(f"note: {Path(args.data) / t.name / 'head.safetensors'} is missing: task '{t.name}' uses the head "
                  f"of its model folder, {t.head_path}", file=sys.stderr)
    base_sd = {k: v.detach().clone() for k, v in _stored(base.state_dict(), base_path).items()}
    check_finite_state(base_sd, base_path)
    if args.device:
        for t in tasks:
            if t.head is not None:
                t.head.to(args.device)
    return SimpleNamespace(base=base, tok=tok, pad_id=tok.pad_token_id or 0, tasks=tasks, base_sd=base_sd)


def _finetuned(model_paths: list):
    """(path, stored tensors) of each fine-tuned model in turn, checked finite: one in memory at a time."""
    from mergelab.io import check_finite_state
    for p in model_paths:
        ft = _stored(_load_encoder(p).state_dict(), p)
        check_finite_state(ft, p)
        yield p, ft


def _full_finetuned(w, model_paths: list) -> list[dict]:
    """Each fine-tune over every name of the loaded model (the methods load them strictly): its own stored
    tensors, the base's for the few that no checkpoint stores (e.g. a pooler), which are not written."""
    full = w.base.state_dict()
    out = []
    for p, ft in _finetuned(model_paths):
        for k, b in w.base_sd.items():
            if k not in ft:
                raise MergelabError(f"{p}: lacks tensor '{k}' of the base")
            if tuple(ft[k].shape) != tuple(b.shape):
                raise MergelabError(f"{p}: tensor '{k}' has shape {tuple(ft[k].shape)}, the base has {tuple(b.shape)}")
        out.append({k: ft[k] if k in ft and tuple(ft[k].shape) == tuple(v.shape) else v.detach().clone()
                    for k, v in full.items()})
    return out


def _unlabelled_loaders(w, opts: dict) -> list:
    """Task t's inputs.txt, tokenised, in batches shuffled with seed + t."""
    from mergelab.adapt.text import ShuffledBatches, tokenize
    return [ShuffledBatches(tokenize(w.tok, t.texts, opts["max_length"]), opts["batch_size"], opts["seed"] + i,
                            w.pad_id) for i, t in enumerate(w.tasks)]


def _note_few_examples(tasks, counts: list[int], num_examples: int, what: str) -> None:
    for t, n in zip(tasks, counts):
        if n < num_examples:
            print(f"note: task '{t.name}' has {n} {what}, fewer than --num-examples {num_examples}: all are used",
                  file=sys.stderr)


def _config(args, base_path: str, model_paths: list, tasks, opts: dict, method: str) -> dict:
    return {"method": method, **opts, "recipe": str(args.recipe), "base_model": base_path, "models": model_paths,
            "data": str(args.data), "tasks": [t.name for t in tasks]}


@contextmanager
def _writing(args, out: Path, base_path: str, model_paths: list, *, method: str, config: dict, tags: list,
             extra: str, state_dict=None, kind: str = "merge"):
    """OUT_DIR through a temporary folder beside it (renamed at the end): the merged checkpoint (when
    ``state_dict`` is given) with the base's config and tokenizer files, what the block adds, a model card."""
    from mergelab.io import atomic_output_dir, copy_model_files, save_state_dict
    from mergelab.io.model_card import write_model_card
    with atomic_output_dir(out, force=args.force, command="adapt") as tmp:
        if state_dict is not None:
            save_state_dict(state_dict, tmp)
            copy_model_files(Path(base_path), tmp)
        yield tmp
        write_model_card(tmp, method=method, base_model=base_path, models=model_paths, kind=kind, tags=tags,
                         recipe={k: v for k, v in config.items() if k != "warnings"}, extra=extra)


def _footer(t_start: float, secs: list[float] | None = None) -> str:
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    head = f"seconds per step: {statistics.median(secs):.3f} (median); " if secs else ""
    return f"{head}peak memory {peak_mb:.0f} MB; total {time.perf_counter() - t_start:.1f} s"


# ---------------------------------------------------------------- AdaMerging, Concrete
def _run(args, out: Path, base_path: str, model_paths: list, opts: dict, t_start: float) -> int:
    import torch

    from mergelab.adapt import adamerging, concrete_merge, plot_history, task_vectors_from
    from mergelab.adapt.functional import FunctionalModel
    from mergelab.adapt.text import PooledEncoder, accuracy_fn, prefixed, tokenize, unprefixed
    from mergelab.io import check_finite_state
    method = args.adapt_method

    w = _prepare(args, base_path, model_paths)
    tasks, base_sd, pad_id = w.tasks, w.base_sd, w.pad_id
    tvs = []
    for p, ft in _finetuned(model_paths):
        try:
            tvs.append(prefixed(task_vectors_from(base_sd, [ft])[0]))
        except MergelabError as exc:
            raise MergelabError(f"{p}: {exc}") from exc
        del ft
    model = PooledEncoder(w.base)
    heads = [t.head for t in tasks]
    loaders = _unlabelled_loaders(w, opts)
    eval_fn = None
    if all(t.val_texts for t in tasks):
        vseqs = [tokenize(w.tok, t.val_texts, opts["max_length"]) for t in tasks]
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

    with _writing(args, out, base_path, model_paths, method=res.config["method"], config=res.config,
                  tags=["test-time-adaptation"], state_dict=unprefixed(res.merged_state_dict),
                  extra="Coefficients and mask learned by entropy minimisation on unlabelled inputs "
                        "(adapt_result.json, adapt_result.safetensors).") as tmp:
        res.save_side_files(tmp)
        plot_history(res.history, tmp / "history.png", title=res.config["method"])
    secs = [h["seconds"] for h in res.history if "seconds" in h]
    stages = stage_entropies(res.history)
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
        print(_footer(t_start, secs))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- RegMean, RegMean++, Fisher
def _write_merged(args, out: Path, base_path: str, model_paths: list, w, merged: dict, config: dict,
                  extra: str) -> None:
    """The stored tensors of a data-based merge, checked finite, plus adapt_result.json (the configuration)."""
    from mergelab.io import check_finite_state
    sd = {k: merged[k] for k in w.base_sd}
    check_finite_state(sd, f"{config['method']}: merged model")
    with _writing(args, out, base_path, model_paths, method=config["method"], config=config, tags=["data-based"],
                  state_dict=sd, extra=extra) as tmp:
        (tmp / "adapt_result.json").write_text(json.dumps({"config": config}, indent=1))


def _unstored_linears(w) -> list[str]:
    """Linear modules of the loaded encoder whose weight no checkpoint stores (e.g. a pooler that
    transformers initialised): merged by the mean (they are equal) and not written."""
    import torch
    return [n for n, m in w.base.named_modules()
            if n and isinstance(m, torch.nn.Linear) and f"{n}.weight" not in w.base_sd]


def _run_regmean(args, out: Path, base_path: str, model_paths: list, opts: dict, t_start: float) -> int:
    import re

    from mergelab.cli.common import TqdmProgress
    from mergelab.databased import regmean
    method = args.adapt_method
    w = _prepare(args, base_path, model_paths, need_head=False)
    fts = _full_finetuned(w, model_paths)
    loaders = _unlabelled_loaders(w, opts)
    used = [min(len(t.texts), opts["num_examples"]) for t in w.tasks]
    _note_few_examples(w.tasks, [len(t.texts) for t in w.tasks], opts["num_examples"], "inputs")
    parts = ([f"(?:{opts['exclude']})"] if opts["exclude"] else []) + \
        [f"^{re.escape(n)}$" for n in _unstored_linears(w)]
    bar = TqdmProgress(args.quiet, unit="stage")
    try:
        merged = regmean(w.base, fts, loaders, alpha=opts["alpha"], num_examples=opts["num_examples"],
                         plus_plus=method == "regmean++", exclude="|".join(parts) or None, device=args.device,
                         progress=bar)
    finally:
        bar.close()
    config = {**_config(args, base_path, model_paths, w.tasks, opts, method), "examples_used": used}
    _write_merged(args, out, base_path, model_paths, w, merged, config,
                  extra=f"Every Linear layer merged in closed form from the Gram matrices of its inputs on "
                        f"{max(used)} unlabelled examples per task (alpha {opts['alpha']}); other tensors averaged.")
    print(f"{method}: {len(w.tasks)} tasks, examples per task " + ", ".join(f"{t.name}={n}" for t, n in
                                                                            zip(w.tasks, used))
          + f", alpha {opts['alpha']}" + (f", excluded {opts['exclude']!r}" if opts["exclude"] else ""))
    print(_footer(t_start))
    print(f"wrote {out}")
    return 0


def _run_fisher(args, out: Path, base_path: str, model_paths: list, opts: dict, t_start: float) -> int:
    from mergelab.adapt.text import LabelledBatches, PooledEncoder, prefixed, tokenize, unprefixed
    from mergelab.cli.common import TqdmProgress
    from mergelab.databased import fisher_merging
    w = _prepare(args, base_path, model_paths)
    if opts["labels"]:
        for t in w.tasks:
            if not t.val_texts:
                raise MergelabError(f"{Path(args.data) / t.name / 'val.tsv'}: missing or empty (--labels reads "
                                    "'label<TAB>text' lines from it)")
        loaders = [LabelledBatches(tokenize(w.tok, t.val_texts, opts["max_length"]), t.val_labels,
                                   opts["batch_size"], opts["seed"] + i, w.pad_id) for i, t in enumerate(w.tasks)]
        avail = [len(t.val_texts) for t in w.tasks]
    else:
        loaders = _unlabelled_loaders(w, opts)
        avail = [len(t.texts) for t in w.tasks]
    _note_few_examples(w.tasks, avail, opts["num_examples"], "labelled lines in val.tsv" if opts["labels"]
                       else "inputs")
    used = [min(n, opts["num_examples"]) for n in avail]
    fts = [prefixed(sd) for sd in _full_finetuned(w, model_paths)]
    bar = TqdmProgress(args.quiet, unit="task")
    try:
        merged = fisher_merging(PooledEncoder(w.base), fts, loaders, [t.head for t in w.tasks],
                                num_examples=opts["num_examples"], estimator=opts["estimator"],
                                labeled=opts["labels"], normalize=opts["normalize"], eps=opts["eps"],
                                device=args.device, progress=bar)
    finally:
        bar.close()
    source = "the labels of val.tsv (empirical Fisher)" if opts["labels"] else "the model's own predictions"
    config = {**_config(args, base_path, model_paths, w.tasks, opts, "fisher"), "examples_used": used}
    _write_merged(args, out, base_path, model_paths, w, unprefixed(merged), config,
                  extra=f"Fisher-weighted average; diagonal Fisher ({opts['estimator']}) of each model on "
                        f"{max(used)} examples of its task, from {source}.")
    print(f"fisher ({opts['estimator']}, {source}): {len(w.tasks)} tasks, examples per task "
          + ", ".join(f"{t.name}={n}" for t, n in zip(w.tasks, used)))
    print(_footer(t_start))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- WEMoE
def _run_wemoe(args, out: Path, base_path: str, model_paths: list, opts: dict, t_start: float) -> int:
    from mergelab.adapt import plot_history
    from mergelab.adapt.text import PooledEncoder
    from mergelab.adapt.wemoe import parameter_counts, upscale_to_wemoe, wemoe_adapt, write_wemoe
    from mergelab.io import check_finite_state
    w = _prepare(args, base_path, model_paths)
    base_params = sum(p.numel() for p in w.base.parameters())
    fts = _full_finetuned(w, model_paths)
    moe = upscale_to_wemoe(w.base, fts, init_lambda=opts["init_lambda"],
                           router_hidden_layers=opts["router_hidden_layers"], batch_reduce=opts["batch_reduce"],
                           seed=opts["seed"], inplace=True)
    del fts
    loaders = _unlabelled_loaders(w, opts)
    bar = tqdm_bar(args.quiet, total=opts["steps"], desc="wemoe", unit="step")

    def progress(rec):
        bar.update(1)
        bar.set_postfix({"entropy": f"{rec['entropy']:.4f}"})

    try:
        history = wemoe_adapt(PooledEncoder(moe), loaders, [t.head for t in w.tasks], steps=opts["steps"],
                              lr=opts["lr"], device=args.device, progress=progress)
    finally:
        bar.close()
    moe.requires_grad_(False)
    moe.eval()
    check_finite_state(moe.state_dict(), "wemoe: adapted model")
    counts = parameter_counts(moe)
    config = {**_config(args, base_path, model_paths, w.tasks, opts, "wemoe"), "parameter_counts": counts}
    with _writing(args, out, base_path, model_paths, method="wemoe", config=config, tags=["wemoe", "moe"],
                  kind="upscaling", extra="A WEMoE model (routed MLPs): load it with "
                  "`mergelab.adapt.wemoe.load_wemoe(OUT_DIR)`; it does not load with transformers alone.") as tmp:
        write_wemoe(moe, tmp, tokenizer_folder=base_path)
        (tmp / "adapt_result.json").write_text(json.dumps({"config": config, "history": history}, indent=1))
        plot_history(history, tmp / "history.png", title="wemoe")
    ent = [h["entropy"] for h in history]
    print(f"wemoe: {len(w.tasks)} tasks, {opts['steps']} steps"
          + (f", entropy {ent[0]:.4f} -> {ent[-1]:.4f}" if ent else ""))
    print(f"parameters: {counts['router'] / 1e6:.3f} M router (trained) in {counts['parameters'] / 1e6:.3f} M "
          f"parameters, + {counts['task_vector_buffers'] / 1e6:.3f} M task-vector entries = "
          f"{counts['total'] / 1e6:.3f} M, {counts['total'] / base_params:.2f}x the base ({base_params / 1e6:.3f} M)")
    print(_footer(t_start, [h["seconds"] for h in history]))
    print(f"wrote {out}")
    return 0
