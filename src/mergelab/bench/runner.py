"""Benchmark orchestration: task pool -> model pool (probe heads, cached fine-tunes) -> every
method's validation search and one test evaluation -> a result dict that ``report`` renders.

Nothing here prints: stages report through ``progress(desc, total)`` factories (the CLI passes
tqdm bars) and their wall-clock times land in the result.
"""
from __future__ import annotations

import copy
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
                  progress: ProgressFactory = _null_progress) -> TaskPool:
    """Load every task's splits and tokenize them once."""
    bar = progress("load + tokenize tasks", len(names))
    tasks, seqs = {}, {}
    for name in names:
        td = data.load_task(name, protocol.n_train, protocol.n_val, protocol.n_test, seed=protocol.seed)
        tasks[name] = td
        seqs[name] = {s: train.tokenize(tokenizer, getattr(td, s).texts, protocol.max_len)
                      for s in ("train", "val", "test")}
        bar.update(1)
    bar.close()
    return TaskPool(tasks, seqs)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def finetune_cache_key(task: data.TaskData, protocol: Protocol, base_id: str) -> str:
    """Everything that changes a fine-tune: base model, protocol, and the exact training texts."""
    return _digest({"base": base_id, "task": task.name, "classes": task.classes,
                    "protocol": protocol.training_key(),
                    "train": hashlib.sha256("\n".join(task.train.texts).encode()).hexdigest()})


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
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(tmp / "head.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    from mergelab.io import fix_modes
    fix_modes(tmp)          # safetensors writes 0600: a shared MERGELAB_CACHE must be readable by others
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_head(folder: Path) -> nn.Linear:
    """The frozen task head stored beside a fine-tuned encoder (``head.safetensors``)."""
    path = Path(folder) / "head.safetensors"
    if not path.exists():
        raise MergelabError(f"{path} not found: a fine-tuned model for the benchmark needs its task "
                            "head (weight [classes, hidden], bias [classes]) beside it")
    from mergelab.io.head import load_head_file   # also reads the older 'head.weight' keys of recycle
    weight, bias = load_head_file(path)
    if bias is None:
        raise MergelabError(f"{path}: expected tensors 'weight' [classes, hidden] and 'bias'")
    head = nn.Linear(weight.shape[1], weight.shape[0])
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


def prepare_models(suite: Suite, tasks: TaskPool, cache_dir: Path | None = None,
                   base: tuple[nn.Module, Any] | None = None, base_id: str = "all-MiniLM-L6-v2",
                   user_models: Mapping[str, str] | None = None,
                   progress: ProgressFactory = _null_progress,
                   timings: dict[str, float] | None = None) -> ModelPool:
    """Heads (linear probes on the frozen base) and fine-tuned encoders, from cache when present.

    ``user_models`` maps a task to a Hugging Face folder the user fine-tuned (with its
    ``head.safetensors``); those are used as they are.  Everything else is trained with the suite's
    protocol and cached under ``cache_dir/<task>-<key>/``: a second run does not retrain.
    """
    timings = timings if timings is not None else _Timer()
    p = suite.protocol
    encoder, tokenizer = base if base is not None else train.load_base_encoder()
    encoder.eval()
    base_sd = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    user_models = dict(user_models or {})
    finetuned, heads, paths = {}, {}, {}
    pad = tokenizer.pad_token_id or 0
    todo = []
    for name in tasks.names:
        if name in user_models:
            folder = Path(user_models[name])
            t0 = timings.start()
            heads[name] = load_head(folder)
            finetuned[name] = load_finetuned_state(folder)
            paths[name] = str(folder)
            timings.stop(f"load fine-tune {name}", t0)
            continue
        folder = cache_dir / f"{name}-{finetune_cache_key(tasks.tasks[name], p, base_id)}"
        paths[name] = str(folder)
        if (folder / "meta.json").exists():
            t0 = timings.start()
            heads[name] = load_head(folder)
            finetuned[name] = load_finetuned_state(folder)
            timings.stop(f"load cached fine-tune {name}", t0)
        else:
            todo.append(name)
    for name in todo:
        td, seqs = tasks.tasks[name], tasks.seqs[name]
        folder = Path(paths[name])
        t0 = timings.start()
        bar = progress(f"probe {name}", len(seqs["train"]))
        z = train.embed(encoder, seqs["train"], pad_id=pad, progress=bar.update)
        bar.close()
        head = train.train_linear_probe(z, td.train.labels, len(td.classes),
                                        weight_decay=p.probe_weight_decay, seed=p.seed)
        timings.stop(f"probe {name}", t0)
        t0 = timings.start()
        work = copy.deepcopy(encoder)
        epochs = p.steps / max(1, -(-len(seqs["train"]) // p.batch_size))
        bar = progress(f"fine-tune {name}", p.steps)
        train.finetune(work, head, seqs["train"], td.train.labels, epochs=epochs, lr=p.lr,
                       batch_size=p.batch_size, weight_decay=p.weight_decay, warmup=p.warmup,
                       seed=p.seed, pad_id=pad, progress=bar.update)
        bar.close()
        timings.stop(f"fine-tune {name}", t0)
        dt = timings[f"fine-tune {name}"]
        save_finetuned(folder, work, tokenizer, head,
                       {"task": name, "classes": td.classes, "protocol": asdict(p),
                        "sizes": td.sizes(), "base": base_id, "train_seconds": round(dt, 1)})
        heads[name] = head
        finetuned[name] = {k: v.detach().clone() for k, v in work.state_dict().items()}
        del work
    return ModelPool(encoder, tokenizer, base_sd, finetuned, heads, paths)


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
    pad = models.pad_id
    out: dict[str, EvalResult] = {}
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
    for enc, group in groups:
        seqs = [s for n in group for s in tasks.inputs(n, split)]
        z = train.embed(enc, seqs, pad_id=pad, progress=bar.update)
        start = 0
        for n in group:
            k = len(tasks.inputs(n, split))
            head = models.heads[n]
            with torch.no_grad():
                pred = head(z[start:start + k].to(head.weight.device)).argmax(-1).cpu()
            y = torch.as_tensor(tasks.labels(n, split))
            correct = (pred == y).tolist()
            out[n] = EvalResult(sum(correct) / k, k, correct)
            start += k
    bar.close()
    return out


def count_params(model: Built) -> int:
    mods = [model] if isinstance(model, nn.Module) else list({id(m): m for m in model.values()}.values())
    return sum(p.numel() for m in mods for p in m.parameters())


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


def run_benchmark(suite: Suite, cache_dir: Path | None = None, threads: int | None = 2,
                  user_models: Mapping[str, str] | None = None, base_path: str | None = None,
                  methods: Sequence[MethodSpec] | None = None,
                  progress: ProgressFactory = _null_progress,
                  base: tuple[nn.Module, Any] | None = None) -> dict[str, Any]:
    """Run the whole benchmark and return a JSON-ready result dict (see report.write_report)."""
    if threads:
        torch.set_num_threads(threads)
    timings = _Timer()
    t_all = timings.start()
    methods = list(methods if methods is not None else suite.methods)

    t0 = timings.start()
    if base is None:
        base = train.load_base_encoder(base_path)
    base_id = base_path or "all-MiniLM-L6-v2"
    timings.stop("load base model", t0)
    t0 = timings.start()
    tasks = prepare_tasks(suite.tasks, suite.protocol, base[1], progress)
    timings.stop("load + tokenize data", t0)
    models = prepare_models(suite, tasks, cache_dir, base=base, base_id=base_id,
                            user_models=user_models, progress=progress, timings=timings)

    rows: dict[str, dict] = {}
    n_base = count_params(models.base)
    t0 = timings.start()
    base_test = evaluate_built(models.base, models, tasks, "test", progress=progress,
                               desc="test: base")
    timings.stop("test base", t0)
    t0 = timings.start()
    individual: dict[str, EvalResult] = {}
    bar_desc = "test: individual"
    for n in tasks.names:
        enc = models.encoder(models.finetuned[n])
        individual.update(evaluate_built(enc, models, tasks, "test", [n], progress=progress,
                                         desc=f"{bar_desc} {n}"))
        del enc
    timings.stop("test individual", t0)
    rows["base"] = {**_summary(base_test, individual), "params": n_base, "kind": "reference"}
    rows["individual"] = {**_summary(individual, individual), "params": n_base * len(tasks.names),
                          "kind": "reference"}
    correct = {"base": {n: r.correct for n, r in base_test.items()},
               "individual": {n: r.correct for n, r in individual.items()}}

    for spec in methods:
        settings = spec.settings()
        search = []
        best, best_score, best_model = None, -1.0, None
        memo: dict = {}
        t0 = timings.start()
        bar = progress(f"search {spec.name} (val, {len(settings)} settings)", len(settings))
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
        timings.stop(f"search {spec.name}", t0)
        t0 = timings.start()
        test = evaluate_built(best_model, models, tasks, "test", progress=progress,
                              desc=f"test: {spec.name}")
        timings.stop(f"test {spec.name}", t0)
        rows[spec.name] = {**_summary(test, individual), "params": count_params(best_model),
                           "kind": "method", "method": spec.method or "builder",
                           "chosen": best, "grid": spec.grid, "fixed": spec.params,
                           "search": search}
        correct[spec.name] = {n: r.correct for n, r in test.items()}
        del best_model
    timings.stop("total", t_all)
    return {
        "suite": suite.name, "description": suite.description, "tasks": tasks.names,
        "task_info": {n: {"classes": td.classes, "sizes": td.sizes(), "available": td.available,
                          "description": td.description} for n, td in tasks.tasks.items()},
        "protocol": asdict(suite.protocol), "threads": threads, "base": base_id,
        "finetuned_paths": models.paths, "rows": rows, "correct": correct,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "cpu_timings": {k: round(v, 2) for k, v in timings.cpu.items()},
    }
