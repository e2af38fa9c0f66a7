"""Benchmark orchestration: task pool -> model pool (frozen zero-shot or probe heads, cached
fine-tunes per seed) -> reference rows (zero-shot, individual, ensemble, multi-task) and every
method's paper-default row and validation search with one test evaluation -> a result dict that
``report`` renders.

Nothing here prints: stages report through ``progress(desc, total)`` factories (the CLI passes
tqdm bars) and their wall-clock times land in the result.  A method that raises becomes a failed
row with its one-line error; ``partial_path`` receives the result after every row.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mergelab.bench import data, train
from mergelab.bench.evalcache import EvalCache
from mergelab.bench.evaluate import EvalResult, mean_se
from mergelab.bench.suite import MethodSpec, Protocol, Suite
from mergelab.errors import MergelabError


class _Timer(dict):
    """Wall-clock seconds per stage, plus this process's CPU seconds under ``cpu/<stage>``
    (CPU time does not grow when other processes share the cores)."""

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def stop(self, name: str, t0: tuple[float, float]) -> None:
        self[name] = time.perf_counter() - t0[0]
        self.cpu[name] = time.process_time() - t0[1]

    def __init__(self):
        super().__init__()
        self.cpu: dict[str, float] = {}


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


ProgressFactory = Callable[[str, int], Any]


def _null_progress(desc: str, total: int) -> _NullBar:
    return _NullBar()


def default_cache_dir() -> Path:
    """``$MERGELAB_CACHE`` or ``~/.cache/mergelab/bench``."""
    env = os.environ.get("MERGELAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mergelab" / "bench"


# ----------------------------------------------------------------------------- pools
@dataclass
class TaskPool:
    """Loaded tasks and their token ids per split (``inputs`` are unlabelled, for adaptive methods)."""

    tasks: dict[str, data.TaskData]
    seqs: dict[str, dict[str, list[list[int]]]]

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def inputs(self, task: str, split: str) -> list[list[int]]:
        return self.seqs[task][split]

    def labels(self, task: str, split: str) -> list[int]:
        return getattr(self.tasks[task], split).labels


@dataclass
class ModelPool:
    """Base encoder, one fine-tuned encoder state dict and one frozen head per task."""

    base: nn.Module
    tokenizer: Any
    base_sd: dict[str, torch.Tensor]
    finetuned: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, nn.Linear]
    paths: dict[str, str] = field(default_factory=dict)
    eval_cache: EvalCache | None = None   # scored encoders' logits, reused when nothing they depend on changed

    def encoder(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A fresh copy of the base encoder, with ``state_dict`` loaded when given."""
        enc = copy.deepcopy(self.base)
        if state_dict is not None:
            enc.load_state_dict(dict(state_dict), strict=False)
        enc.eval()
        return enc

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0


def prepare_tasks(names: Sequence[str], protocol: Protocol, tokenizer,
                  progress: ProgressFactory = _null_progress,
                  specs: Mapping[str, data.TaskSpec] | None = None) -> TaskPool:
    """Load every task's splits (``specs``: a suite's own task definitions) and tokenize them once."""
    bar = progress("load + tokenize tasks", len(names))
    tasks, seqs = {}, {}
    specs = specs or {}
    for name in names:
        td = data.load_task(name, protocol.n_train, protocol.n_val, protocol.n_test, seed=protocol.seed,
                            spec=specs.get(name))
        tasks[name] = td
        seqs[name] = {s: train.tokenize(tokenizer, getattr(td, s).texts, protocol.max_len)
                      for s in ("train", "val", "test")}
        bar.update(1)
    bar.close()
    return TaskPool(tasks, seqs)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def finetune_cache_key(task: data.TaskData, protocol: Protocol, base_id: str, seed: int | None = None) -> str:
    """Everything that changes a fine-tune: base model, protocol, head prompts, fine-tuning seed and
    the exact training texts."""
    seed = protocol.finetune_seeds[0] if seed is None else seed
    key = {"base": base_id, "task": task.name, "classes": task.classes, "protocol": protocol.training_key(),
           "finetune_seed": seed, "train": hashlib.sha256("\n".join(task.train.texts).encode()).hexdigest()}
    if protocol.head == "zero_shot":
        key["prompts"] = task.prompts
    return _digest(key)


def save_finetuned(folder: Path, encoder: nn.Module, tokenizer, head: nn.Linear,
                   meta: dict[str, Any]) -> None:
    """Write a Hugging Face folder (encoder + tokenizer) with ``head.safetensors`` and ``meta.json``
    beside it; written into a temporary folder and renamed, so a folder is complete or absent."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_head(tmp / "head.safetensors", head)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    from mergelab.io import fix_modes
    fix_modes(tmp)          # safetensors writes 0600: a shared MERGELAB_CACHE must be readable by others
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def save_head(path: Path, head: nn.Linear) -> None:
    """``weight`` [classes, hidden] and ``bias``; metadata ``head`` = zero_shot (the input is
    L2-normalised before the linear map) or linear."""
    from safetensors.torch import save_file

    kind = "zero_shot" if isinstance(head, train.ZeroShotHead) else "linear"
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(path), metadata={"head": kind})


def load_head(folder: Path) -> nn.Linear:
    """The frozen task head stored beside a fine-tuned encoder (``head.safetensors``)."""
    from safetensors import safe_open

    path = Path(folder) / "head.safetensors"
    if not path.exists():
        raise MergelabError(f"{path} not found: a fine-tuned model for the benchmark needs its task "
                            "head (weight [classes, hidden], bias [classes]) beside it")
    from mergelab.io.head import load_head_file   # also reads the older 'head.weight' keys of recycle
    weight, bias = load_head_file(path)
    if bias is None:
        raise MergelabError(f"{path}: expected tensors 'weight' [classes, hidden] and 'bias'")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise MergelabError(f"{path}: not a readable safetensors file ({exc})") from exc
    cls = train.ZeroShotHead if meta.get("head") == "zero_shot" else nn.Linear
    head = cls(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    head.requires_grad_(False)
    return head


def load_finetuned_state(folder: Path) -> dict[str, torch.Tensor]:
    """Encoder state dict of a Hugging Face folder (loaded with transformers, eager attention)."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(folder), attn_implementation="eager")
    except Exception as exc:  # transformers raises many types for a bad folder
        raise MergelabError(f"{folder}: cannot load a Hugging Face encoder ({exc})") from exc
    return {k: v.detach() for k, v in model.state_dict().items()}


def build_heads(protocol: Protocol, tasks: TaskPool, encoder: nn.Module, tokenizer,
                progress: ProgressFactory = _null_progress, timings: dict | None = None) -> dict[str, nn.Linear]:
    """One frozen head per task from the *base* encoder: zero-shot (prompts only, no label) or a
    linear probe on the train split's base embeddings (``protocol.head``)."""
    timings = timings if timings is not None else _Timer()
    heads = {}
    pad = tokenizer.pad_token_id or 0
    for name in tasks.names:
        td = tasks.tasks[name]
        t0 = timings.start()
        if protocol.head == "zero_shot":
            heads[name] = train.zero_shot_head(encoder, tokenizer, td.prompts, scale=protocol.head_scale,
                                               max_len=protocol.max_len, pad_id=pad)
            timings.stop(f"zero-shot head {name}", t0)
        else:
            bar = progress(f"probe {name}", len(tasks.seqs[name]["train"]))
            z = train.embed(encoder, tasks.seqs[name]["train"], pad_id=pad, progress=bar.update)
            bar.close()
            heads[name] = train.train_linear_probe(z, td.train.labels, len(td.classes),
                                                   weight_decay=protocol.probe_weight_decay, seed=protocol.seed)
            timings.stop(f"probe {name}", t0)
    dev = next(encoder.parameters()).device
    return {n: h.to(dev) for n, h in heads.items()}


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def prepare_models(suite: Suite, tasks: TaskPool, cache_dir: Path | None = None,
                   base: tuple[nn.Module, Any] | None = None, base_id: str = "all-MiniLM-L6-v2",
                   user_models: Mapping[str, str] | None = None,
                   progress: ProgressFactory = _null_progress,
                   timings: dict[str, float] | None = None, seed: int | None = None,
                   heads: Mapping[str, nn.Linear] | None = None) -> ModelPool:
    """Heads (built once from the base) and fine-tuned encoders of one fine-tuning ``seed``, from
    cache when present.

    ``user_models`` maps a task to a Hugging Face folder the user fine-tuned (with its
    ``head.safetensors``); those are used as they are.  Everything else is trained with the suite's
    protocol and cached under ``cache_dir/<task>-<key>/``: a second run does not retrain.
    """
    timings = timings if timings is not None else _Timer()
    p = suite.protocol
    seed = p.finetune_seeds[0] if seed is None else seed
    tag = "" if seed == p.finetune_seeds[0] else f" (seed {seed})"
    encoder, tokenizer = base if base is not None else train.load_base_encoder()
    encoder.eval()
    base_sd = _cpu_state(encoder)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    user_models = dict(user_models or {})
    heads = dict(heads) if heads is not None else build_heads(p, tasks, encoder, tokenizer, progress, timings)
    finetuned, paths = {}, {}
    pad = tokenizer.pad_token_id or 0
    dev = next(encoder.parameters()).device
    todo = []
    for name in tasks.names:
        if name in user_models:
            folder = Path(user_models[name])
            t0 = timings.start()
            heads[name] = load_head(folder).to(dev)
            finetuned[name] = load_finetuned_state(folder)
            paths[name] = str(folder)
            timings.stop(f"load fine-tune {name}", t0)
            continue
        folder = cache_dir / f"{name}-{finetune_cache_key(tasks.tasks[name], p, base_id, seed)}"
        paths[name] = str(folder)
        if (folder / "meta.json").exists():
            t0 = timings.start()
            finetuned[name] = load_finetuned_state(folder)
            timings.stop(f"load cached fine-tune {name}{tag}", t0)
        else:
            todo.append(name)
    for name in todo:
        td, seqs = tasks.tasks[name], tasks.seqs[name]
        folder = Path(paths[name])
        t0 = timings.start()
        work = copy.deepcopy(encoder)
        bar = progress(f"fine-tune {name}{tag}", p.steps)
        train.finetune(work, heads[name], seqs["train"], td.train.labels, steps=p.steps, lr=p.lr,
                       batch_size=p.batch_size, weight_decay=p.weight_decay, warmup=p.warmup,
                       seed=seed, pad_id=pad, progress=bar.update, schedule=p.schedule,
                       freeze_embeddings=p.freeze_embeddings)
        bar.close()
        timings.stop(f"fine-tune {name}{tag}", t0)
        dt = timings[f"fine-tune {name}{tag}"]
        save_finetuned(folder, work, tokenizer, heads[name],
                       {"task": name, "classes": td.classes, "prompts": td.prompts, "protocol": asdict(p),
                        "finetune_seed": seed, "sizes": td.sizes(), "base": base_id, "train_seconds": round(dt, 1)})
        finetuned[name] = _cpu_state(work)
        del work
    return ModelPool(encoder, tokenizer, base_sd, finetuned, heads, paths)


def multitask_finetune(suite: Suite, models: ModelPool, tasks: TaskPool, cache_dir: Path | None,
                       base_id: str, seed: int, progress: ProgressFactory = _null_progress,
                       timings: dict | None = None) -> dict[str, torch.Tensor]:
    """The multi-task reference: one encoder fine-tuned on every task's train split at once
    (``protocol.mtl_steps`` steps, batches drawn from the union), each example through its own
    task's frozen head; cached like the individual fine-tunes."""
    timings = timings if timings is not None else _Timer()
    p = suite.protocol
    names = tasks.names
    key = _digest({"mtl_steps": p.mtl_steps, "tasks": [finetune_cache_key(tasks.tasks[n], p, base_id, seed)
                                                        for n in names]})
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"multitask-{key}"
    tag = "" if seed == p.finetune_seeds[0] else f" (seed {seed})"
    t0 = timings.start()
    if (folder / "meta.json").exists():
        sd = load_finetuned_state(folder)
        timings.stop(f"load cached multi-task{tag}", t0)
        return sd
    seqs, labels, tids = [], [], []
    for i, n in enumerate(names):
        seqs += tasks.inputs(n, "train")
        labels += tasks.labels(n, "train")
        tids += [i] * len(tasks.inputs(n, "train"))
    work = models.encoder()
    bar = progress(f"fine-tune multi-task{tag}", p.mtl_steps)
    train.finetune(work, None, seqs, labels, steps=p.mtl_steps, lr=p.lr, batch_size=p.batch_size,
                   weight_decay=p.weight_decay, warmup=p.warmup, seed=seed, pad_id=models.pad_id,
                   progress=bar.update, schedule=p.schedule, freeze_embeddings=p.freeze_embeddings,
                   tasks=tids, heads=[models.heads[n] for n in names])
    bar.close()
    timings.stop(f"fine-tune multi-task{tag}", t0)
    from safetensors.torch import save_file
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    work.save_pretrained(tmp)
    models.tokenizer.save_pretrained(tmp)
    for n in names:
        save_head(tmp / f"head_{n}.safetensors", models.heads[n])
    (tmp / "meta.json").write_text(json.dumps({"tasks": names, "mtl_steps": p.mtl_steps, "finetune_seed": seed,
                                               "train_seconds": round(timings[f"fine-tune multi-task{tag}"], 1)}))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return _cpu_state(work)


# ----------------------------------------------------------------------------- evaluation
Built = nn.Module | Mapping[str, nn.Module]


def evaluate_built(model: Built, models: ModelPool, tasks: TaskPool, split: str,
                   names: Sequence[str] | None = None,
                   progress: ProgressFactory = _null_progress, desc: str = "") -> dict[str, EvalResult]:
    """Accuracy of a built model on ``split`` of every task, each task through its own head.

    A single encoder is run once over all tasks' inputs together (length-sorted batches across
    tasks); a mapping gives each task its own encoder.
    """
    names = list(names or tasks.names)
    total = sum(len(tasks.inputs(n, split)) for n in names)
    bar = progress(desc or f"evaluate {split}", total)
    groups: list[tuple[nn.Module, list[str]]] = []
    if isinstance(model, nn.Module):
        groups.append((model, names))
    else:
        for n in names:
            if n not in model:
                raise MergelabError(f"built model has no encoder for task {n!r}")
            groups.append((model[n], [n]))
    out: dict[str, EvalResult] = {}
    for enc, group in groups:
        for n, logits in task_logits(enc, models, tasks, split, group, bar).items():
            out[n] = _scored(logits, tasks.labels(n, split))
    bar.close()
    return out


EVAL_BATCH = 128   # embedding batch of every scored pass (part of the evaluation cache's key)


def task_logits(enc: nn.Module, models: ModelPool, tasks: TaskPool, split: str, names: Sequence[str],
                bar: Any = None) -> dict[str, torch.Tensor]:
    """Logits of each task's ``split`` inputs through its head, from one embedding pass of ``enc``
    over all of them (or from the evaluation cache when the same pass was scored before)."""
    def compute() -> dict[str, torch.Tensor]:
        seqs = [s for n in names for s in tasks.inputs(n, split)]
        z = train.embed(enc, seqs, batch_size=EVAL_BATCH, pad_id=models.pad_id,
                        progress=bar.update if bar is not None else None)
        out, start = {}, 0
        for n in names:
            k = len(tasks.inputs(n, split))
            head = models.heads[n]
            with torch.no_grad():
                out[n] = head(z[start:start + k].to(head.weight.device)).float().cpu()
            start += k
        return out

    if models.eval_cache is None:
        return compute()
    parts = [(n, tasks.inputs(n, split), models.heads[n]) for n in names]
    dev = next(enc.parameters()).device
    before = models.eval_cache.hits
    out = models.eval_cache.logits(enc, parts, compute, {"split": split, "pad_id": models.pad_id,
                                                         "batch_size": EVAL_BATCH, "device": str(dev)})
    if models.eval_cache.hits > before and bar is not None:
        bar.update(sum(len(tasks.inputs(n, split)) for n in names))
    return out


def count_params(model: Built) -> int:
    """Weights held: parameters plus floating-point buffers (WEMoE keeps its task vectors as buffers)."""
    mods = [model] if isinstance(model, nn.Module) else list({id(m): m for m in model.values()}.values())
    return sum(p.numel() for m in mods for p in m.parameters()) + \
        sum(b.numel() for m in mods for b in m.buffers() if b.is_floating_point())


def _summary(results: Mapping[str, EvalResult], individual: Mapping[str, EvalResult] | None) -> dict:
    avg, se = mean_se(list(results.values()))
    row = {"per_task": {n: r.accuracy for n, r in results.items()},
           "per_task_se": {n: r.se for n, r in results.items()},
           "n": {n: r.n for n, r in results.items()},
           "average": avg, "average_se": se}
    if individual:
        row["normalized"] = sum(results[n].accuracy / max(individual[n].accuracy, 1e-12)
                                for n in results) / len(results)
    return row


# Registry methods whose result is theta0 + lambda * tau(other params): a lambda grid needs one merge.
LAMBDA_LINEAR = {"task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear",
                 "tsv", "iso_c", "iso_cts"}   # the SVD methods' alpha (alias lambda) scales the merged delta


def merge_encoder_state(spec: MethodSpec, models: ModelPool, names: Sequence[str],
                        params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Merged encoder state dict of a registry method (paper semantics)."""
    from mergelab import merge_state_dicts  # the core; imported here so data/training work without it

    sds = [models.finetuned[n] for n in names]
    return merge_state_dicts(models.base_sd, sds, method=spec.method, params=dict(params),
                             compat="paper")


def rescale_lambda(base_sd: Mapping[str, torch.Tensor], merged_at_1: Mapping[str, torch.Tensor],
                   lam: float) -> dict[str, torch.Tensor]:
    """theta0 + lam * (merged(lambda=1) - theta0): exact for the LAMBDA_LINEAR methods."""
    return {k: (base_sd[k] + lam * (v - base_sd[k])) if v.is_floating_point() else v
            for k, v in merged_at_1.items()}


def build_method(spec: MethodSpec, models: ModelPool, tasks: TaskPool, params: dict,
                 _memo: dict | None = None) -> Built:
    """Turn one method setting into an evaluable model (a registry merge or a builder call).

    For LAMBDA_LINEAR methods the merge at lambda = 1 is memoised in ``_memo`` per setting of the
    other parameters, so a lambda sweep costs one merge.
    """
    if spec.builder is not None:
        return spec.builder(models, tasks, dict(params))
    if spec.method in LAMBDA_LINEAR and "lambda" in params and _memo is not None:
        rest = {k: v for k, v in params.items() if k != "lambda"}
        key = json.dumps(rest, sort_keys=True, default=str)
        if key not in _memo:
            _memo.clear()  # keep one merged state dict in memory at a time
            _memo[key] = merge_encoder_state(spec, models, tasks.names, {**rest, "lambda": 1.0})
        return models.encoder(rescale_lambda(models.base_sd, _memo[key], float(params["lambda"])))
    return models.encoder(merge_encoder_state(spec, models, tasks.names, params))


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".strip().rstrip(":")


def _scored(logits: torch.Tensor, labels: Sequence[int]) -> EvalResult:
    correct = (logits.argmax(-1).cpu() == torch.as_tensor(list(labels))).tolist()
    return EvalResult(sum(correct) / len(correct), len(correct), correct)


def _reference_rows(models: ModelPool, tasks: TaskPool, suite: Suite, progress: ProgressFactory,
                    timings: _Timer, tag: str, zero_shot: dict[str, EvalResult] | None):
    """zero-shot (or probe) base row, individual fine-tunes and their ensemble (mean of the
    models' class probabilities through the task's head), from one embedding pass per model."""
    names = tasks.names
    out: dict[str, dict[str, EvalResult]] = {}
    if zero_shot is None:
        t0 = timings.start()
        zero_shot = evaluate_built(models.base, models, tasks, "test", progress=progress, desc="test: zero-shot")
        timings.stop("test zero-shot", t0)
    out["base"] = zero_shot
    t0 = timings.start()
    individual, probs = {}, {n: None for n in names}
    for m in names:
        enc = models.encoder(models.finetuned[m])
        on = names if suite.protocol.ensemble else [m]
        bar = progress(f"test: fine-tune {m} on {'all tasks' if len(on) > 1 else m}{tag}",
                       sum(len(tasks.inputs(n, "test")) for n in on))
        z = task_logits(enc, models, tasks, "test", on, bar)
        bar.close()
        for n, logits in z.items():
            if n == m:
                individual[n] = _scored(logits, tasks.labels(n, "test"))
            p = logits.softmax(-1)
            probs[n] = p if probs[n] is None else probs[n] + p
        del enc
    timings.stop(f"test individual{' + ensemble' if suite.protocol.ensemble else ''}{tag}", t0)
    out["individual"] = individual
    if suite.protocol.ensemble:
        out["ensemble"] = {n: _scored(probs[n], tasks.labels(n, "test")) for n in names}
    return out


def method_rows(spec: MethodSpec) -> list[tuple[str, list[dict], str]]:
    """(row name, settings, kind) of a spec: ``NAME@paper`` (its paper default, no validation) when
    it has one, and ``NAME`` (searched on validation over the grid; a single setting = fixed)."""
    rows = []
    if spec.default is not None:
        rows.append((f"{spec.name}@paper", [{**spec.params, **spec.default}], "paper default"))
    settings = spec.settings()
    if spec.default is None or len(settings) > 1:
        rows.append((spec.name, settings, "validation-tuned" if len(settings) > 1 else "fixed"))
    return rows


def _mean_rows(runs: Mapping[str, dict], names: Sequence[str]) -> dict[str, dict]:
    """Rows averaged over fine-tuning seeds (accuracies, SEs, normalized); a row failed in any seed
    stays failed."""
    seeds = list(runs)
    first = runs[seeds[0]]["rows"]
    out = {}
    for r, row in first.items():
        per_seed = [runs[s]["rows"].get(r) for s in seeds]
        if len(seeds) == 1:
            out[r] = row
            continue
        if any(x is None or x.get("kind") == "failed" for x in per_seed):
            bad = next(x for x in per_seed if x is None or x.get("kind") == "failed")
            out[r] = bad or {"kind": "failed", "error": "missing in a seed"}
            continue
        m = {k: v for k, v in row.items() if k not in ("search",)}
        for key in ("per_task", "per_task_se"):
            m[key] = {t: sum(x[key][t] for x in per_seed) / len(seeds) for t in names}
        for key in ("average", "average_se", "normalized"):
            if key in row:
                m[key] = sum(x[key] for x in per_seed) / len(seeds)
        m["chosen_per_seed"] = [x.get("chosen") for x in per_seed]
        m["average_per_seed"] = [x["average"] for x in per_seed]
        out[r] = m
    return out


def run_benchmark(suite: Suite, cache_dir: Path | None = None, threads: int | None = 2,
                  user_models: Mapping[str, str] | None = None, base_path: str | None = None,
                  methods: Sequence[MethodSpec] | None = None,
                  progress: ProgressFactory = _null_progress,
                  base: tuple[nn.Module, Any] | None = None, seeds: Sequence[int] | None = None,
                  partial_path: str | Path | None = None, device: str | None = None,
                  resume: Sequence[Mapping[str, Any]] = (), eval_cache: bool = True) -> dict[str, Any]:
    """Run the whole benchmark and return a JSON-ready result dict (see report.write_report).

    ``seeds`` (default ``protocol.finetune_seeds``) are the fine-tuning seeds: each gets its own
    fine-tunes and rows (``result["runs"][seed]``); ``result["rows"]`` is their mean.  A method row
    that raises is recorded as ``{"kind": "failed", "error": ...}`` and the run goes on;
    ``partial_path`` is rewritten (JSON) after every row.

    ``resume``: earlier results (partial or complete, e.g. one per seed run side by side) of the
    same suite; a row they hold for the same seed, fine-tunes, protocol and method settings is
    taken from them instead of being measured again (failed rows are measured again).

    ``eval_cache``: keep every scored encoder's logits under ``cache_dir/evals`` (see
    ``bench.evalcache``) and take them from there when the same encoder, inputs and heads come
    again (the reference rows and unchanged merges of a re-run); ``result["eval_cache"]`` counts
    the hits.
    """
    if threads:
        torch.set_num_threads(threads)
    timings = _Timer()
    t_all = timings.start()
    methods = list(methods if methods is not None else suite.methods)
    p = suite.protocol
    seeds = list(seeds if seeds is not None else p.finetune_seeds)
    if seeds != list(p.finetune_seeds):
        suite = copy.copy(suite)
        suite.protocol = p = dataclasses.replace(p, finetune_seeds=seeds)

    t0 = timings.start()
    if base is None:
        base = train.load_base_encoder(base_path)
    if device:
        base = (base[0].to(device), base[1])
    base_id = base_path or "all-MiniLM-L6-v2"
    timings.stop("load base model", t0)
    t0 = timings.start()
    tasks = prepare_tasks(suite.tasks, p, base[1], progress, suite.task_specs)
    timings.stop("load + tokenize data", t0)
    t0 = timings.start()
    heads = build_heads(p, tasks, base[0], base[1], progress, timings)
    timings.stop("heads", t0)
    base_name = "zero_shot" if p.head == "zero_shot" else "base"
    prior = _prior_runs(resume, tasks, p, base_id)
    result: dict[str, Any] = {
        "suite": suite.name, "description": suite.description, "tasks": tasks.names,
        "task_info": {n: {"classes": td.classes, "sizes": td.sizes(), "available": td.available,
                          "description": td.description, "prompts": td.prompts} for n, td in tasks.tasks.items()},
        "protocol": asdict(p), "threads": threads, "device": device or "cpu", "base": base_id,
        "seeds": seeds, "finetuned_paths": {}, "finetuned_paths_per_seed": {}, "runs": {}, "rows": {}, "correct": {},
        "timings": timings, "cpu_timings": timings.cpu, "base_row": base_name, "complete": False,
        "resumed_rows": {}}

    def publish():
        result["rows"] = _mean_rows(result["runs"], tasks.names) if result["runs"] else {}
        if cache is not None:
            result["eval_cache"] = cache.stats()
        result["correct"] = result["runs"][str(seeds[0])]["correct"] if result["runs"] else {}
        if partial_path is not None:
            tmp = Path(str(partial_path) + ".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(result, default=_jsonable))
            tmp.replace(partial_path)

    cache = EvalCache((Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "evals",
                      stable=(train.ZeroShotHead,)) if eval_cache else None
    result["eval_cache"] = cache.stats() if cache else None
    zero_shot = None
    for seed in seeds:
        tag = "" if seed == seeds[0] else f" (seed {seed})"
        models = prepare_models(suite, tasks, cache_dir, base=base, base_id=base_id, user_models=user_models,
                                progress=progress, timings=timings, seed=seed, heads=heads)
        models.eval_cache = cache
        result["finetuned_paths_per_seed"][str(seed)] = dict(models.paths)
        if seed == seeds[0]:
            result["finetuned_paths"] = dict(models.paths)
        run = {"rows": {}, "correct": {}}
        result["runs"][str(seed)] = run
        rows, correct = run["rows"], run["correct"]
        reused = result["resumed_rows"].setdefault(str(seed), [])
        before = _prior_for_seed(prior, seed, models.paths)
        n_base = count_params(models.base)
        ref_names = [base_name, "individual"] + (["ensemble"] if p.ensemble else [])
        if all(r in before["correct"] for r in ref_names):
            ref = {("base" if r == base_name else r): _eval_results(before["correct"][r]) for r in ref_names}
            reused += ref_names
        else:
            ref = _reference_rows(models, tasks, suite, progress, timings, tag, zero_shot)
        zero_shot = ref["base"]
        individual = ref["individual"]
        rows[base_name] = {**_summary(ref["base"], individual), "params": n_base, "kind": "reference"}
        rows["individual"] = {**_summary(individual, individual), "params": n_base * len(tasks.names),
                              "kind": "reference"}
        correct[base_name] = {n: r.correct for n, r in ref["base"].items()}
        correct["individual"] = {n: r.correct for n, r in individual.items()}
        if "ensemble" in ref:
            rows["ensemble"] = {**_summary(ref["ensemble"], individual), "params": n_base * len(tasks.names),
                                "kind": "reference"}
            correct["ensemble"] = {n: r.correct for n, r in ref["ensemble"].items()}
        publish()
        if p.mtl_steps and "multitask" in before["correct"]:
            rows["multitask"], correct["multitask"] = before["rows"]["multitask"], before["correct"]["multitask"]
            reused.append("multitask")
        elif p.mtl_steps:
            t0 = timings.start()
            try:
                sd = multitask_finetune(suite, models, tasks, cache_dir, base_id, seed, progress, timings)
                t1 = timings.start()
                test = evaluate_built(models.encoder(sd), models, tasks, "test", progress=progress,
                                      desc=f"test: multi-task{tag}")
                timings.stop(f"test multi-task{tag}", t1)
                rows["multitask"] = {**_summary(test, individual), "params": n_base, "kind": "reference"}
                correct["multitask"] = {n: r.correct for n, r in test.items()}
            except Exception as exc:  # a failing row must not cost the run
                rows["multitask"] = {"kind": "failed", "error": _one_line(exc)}
            publish()

        for spec in methods:
            tested: dict[str, Any] = {}  # setting -> test results: a tuned row that picks the paper default reuses them
            for row_name, settings, how in method_rows(spec):
                old = before["rows"].get(row_name)
                if row_name in before["correct"] and _same_settings(old, spec, how):
                    rows[row_name], correct[row_name] = old, before["correct"][row_name]
                    reused.append(row_name)
                    publish()
                    continue
                t0 = timings.start()
                try:
                    row, corr = _method_row(spec, settings, models, tasks, progress, f"{row_name}{tag}", tested)
                    row.update(_summary(row.pop("_test"), individual))
                    row["how"] = how
                    rows[row_name] = row
                    correct[row_name] = corr
                except Exception as exc:  # a failing method is a failed row, not a failed run
                    rows[row_name] = {"kind": "failed", "error": _one_line(exc), "method": spec.method or "builder",
                                      "how": how}
                timings.stop(f"{row_name}{tag}", t0)
                publish()
    timings.stop("total", t_all)
    result["complete"] = True
    publish()
    result["timings"] = {k: round(v, 2) for k, v in timings.items()}
    result["cpu_timings"] = {k: round(v, 2) for k, v in timings.cpu.items()}
    return result


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _prior_runs(resume: Sequence[Mapping[str, Any]], tasks: TaskPool, p: Protocol,
                base_id: str) -> list[Mapping[str, Any]]:
    """The earlier results that may lend rows; one that measured something else is refused in one line."""
    want = {k: v for k, v in asdict(p).items() if k != "finetune_seeds"}
    out = []
    for i, prev in enumerate(resume):
        where = prev.get("_source", f"resume result {i + 1}")
        got = {k: v for k, v in (prev.get("protocol") or {}).items() if k != "finetune_seeds"}
        if prev.get("tasks") != tasks.names:
            raise MergelabError(f"{where}: tasks {prev.get('tasks')} differ from this run's {tasks.names}")
        if _normal(got) != _normal(want):
            diff = sorted(k for k in set(got) | set(want) if _normal(got.get(k)) != _normal(want.get(k)))
            raise MergelabError(f"{where}: protocol differs from this run's ({', '.join(diff)})")
        if prev.get("base") != base_id:
            raise MergelabError(f"{where}: base {prev.get('base')!r} differs from this run's {base_id!r}")
        for n, td in tasks.tasks.items():
            info = (prev.get("task_info") or {}).get(n, {})
            if _normal(info.get("prompts")) != _normal(td.prompts) or info.get("sizes") != td.sizes():
                raise MergelabError(f"{where}: task {n!r} has other prompts or split sizes than in this run")
        out.append(prev)
    return out


def _prior_for_seed(prior: Sequence[Mapping[str, Any]], seed: int, paths: Mapping[str, str]) -> dict:
    """Rows and per-example outcomes the earlier results hold for this seed and these fine-tunes
    (the same cache entries: compared by folder name, so a moved cache still matches)."""
    rows: dict[str, Any] = {}
    correct: dict[str, Any] = {}
    mine = {t: Path(x).name for t, x in paths.items()}
    for prev in prior:
        theirs = {t: Path(x).name for t, x in (prev.get("finetuned_paths_per_seed") or {}).get(str(seed), {}).items()}
        run = (prev.get("runs") or {}).get(str(seed))
        if run is None or theirs != mine:
            continue
        for name, row in run.get("rows", {}).items():
            if row.get("kind") != "failed" and name in run.get("correct", {}) and name not in rows:
                rows[name], correct[name] = row, run["correct"][name]
    return {"rows": rows, "correct": correct}


def _eval_results(correct: Mapping[str, Sequence[bool]]) -> dict[str, EvalResult]:
    return {n: EvalResult(sum(map(bool, c)) / len(c), len(c), [bool(x) for x in c]) for n, c in correct.items()}


def _same_settings(row: Mapping[str, Any] | None, spec: MethodSpec, how: str) -> bool:
    """Whether an earlier row measured this spec's row: same method, grid, fixed parameters and kind."""
    if row is None or row.get("how") != how:
        return False
    if row.get("method") != (spec.method or "builder") or _normal(row.get("fixed")) != _normal(spec.params):
        return False
    if how == "paper default":  # one setting, no search: the grid does not matter
        return _normal(row.get("chosen")) == _normal({**spec.params, **(spec.default or {})})
    return _normal(row.get("grid")) == _normal(spec.grid)


def _jsonable(o):
    if isinstance(o, dict):
        return dict(o)
    return str(o)


def _method_row(spec: MethodSpec, settings: list[dict], models: ModelPool, tasks: TaskPool,
                progress: ProgressFactory, label: str, tested: dict | None = None) -> tuple[dict, dict]:
    """Validation search over ``settings`` (skipped for a single one), then one test evaluation
    (taken from ``tested`` when the same setting of the same method was already tested)."""
    search = []
    best, best_score, best_model = None, -1.0, None
    memo: dict = {}
    bar = progress(f"search {label} (val, {len(settings)} settings)", len(settings))
    for params in settings:
        t1 = time.perf_counter()
        model = build_method(spec, models, tasks, params, memo)
        t_build = time.perf_counter() - t1
        if len(settings) == 1:
            score, per_task = float("nan"), {}
        else:
            val = evaluate_built(model, models, tasks, "val")
            score = sum(r.accuracy for r in val.values()) / len(val)
            per_task = {n: r.accuracy for n, r in val.items()}
        search.append({"params": params, "val_average": score, "val_per_task": per_task,
                       "build_seconds": round(t_build, 2)})
        if best is None or score > best_score:
            best, best_score, best_model = params, score, model
        else:
            del model
        bar.update(1)
    bar.close()
    memo.clear()
    key = json.dumps(best, sort_keys=True, default=str)
    if tested is not None and key in tested:
        test = tested[key]
    else:
        test = evaluate_built(best_model, models, tasks, "test", progress=progress, desc=f"test: {label}")
        if tested is not None:
            tested[key] = test
    row = {"_test": test, "params": count_params(best_model), "kind": "method",
           "method": spec.method or "builder", "chosen": best, "grid": spec.grid, "fixed": spec.params,
           "search": search}
    info = getattr(best_model, "bench_info", None)   # a builder may describe what it built (e.g. a learned mask)
    if isinstance(info, dict):
        row["info"] = info
    del best_model
    return row, {n: r.correct for n, r in test.items()}
