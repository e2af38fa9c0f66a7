"""Benchmark builders for the leaderboard methods: RegMean, RegMean++, Fisher, WUDI, LiNeS, EMR, WEMoE.

Each ``*_builder(models, tasks, params)`` has the signature of ``bench.adapt_methods.adapt_builder`` and
``bench.smile_methods.bench_builder``: ``models`` is the bench ModelPool (``base`` encoder, ``base_sd``,
``finetuned`` task -> state dict, ``heads`` task -> frozen Linear on the mean-pooled embedding, ``pad_id``,
``encoder(state_dict)``), ``tasks`` the TaskPool (``names``, ``inputs(task, split)`` token ids,
``labels(task, split)``). They return an encoder, or a mapping task -> encoder where the method needs
the task id (EMR) or batches of one task at a time (WEMoE routes on the batch). Register them later as
rows, e.g. ``[MethodSpec(name, builder=b, params=p) for name, (b, p, data) in ROWS.items()]``; ``data``
says what each row needs (none / labelled / unlabelled, and how many examples per task).
Each build appends its cost (wall seconds, peak RSS of the process during the build) to ``STATS``.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch

from mergelab.adapt.text import LabelledBatches, PooledEncoder, ShuffledBatches, prefixed, unprefixed
from mergelab.errors import MergelabError

STATS: list[dict] = []


def rss_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Cost:
    def __init__(self, label: str, extra: dict | None = None):
        self.label, self.extra = label, dict(extra or {})

    def __enter__(self):
        self.rss0 = rss_kb("VmRSS")
        self.reset = reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            STATS.append({"label": self.label, "seconds": time.perf_counter() - self.t0,
                          "rss_before_mb": self.rss0 / 1024,
                          "peak_rss_mb": rss_kb("VmHWM") / 1024 if self.reset else None,
                          "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          **self.extra})
        return False


def _pop(p: dict, known: dict[str, Any], who: str) -> dict:
    unknown = sorted(set(p) - set(known))
    if unknown:
        raise MergelabError(f"{who} builder: unknown parameter {unknown[0]!r} (parameters: {', '.join(known)})")
    return {k: p.get(k, v) for k, v in known.items()}


def _loaders(models, tasks, split, batch_size, seed):
    return [ShuffledBatches(tasks.inputs(n, split), batch_size, seed + i, models.pad_id)
            for i, n in enumerate(tasks.names)]


def regmean_builder(models, tasks, params: dict):
    """RegMean / RegMean++ on each task's ``split`` inputs (unlabelled; FusionBench: 256 train examples)."""
    from mergelab.databased.regmean import regmean
    p = _pop(params, {"alpha": 0.95, "num_examples": 256, "plus_plus": False, "split": "train", "batch_size": 32,
                      "seed": 0, "exclude": None, "label": None}, "RegMean")
    label = p["label"] or ("regmean++" if p["plus_plus"] else "regmean")
    loaders = _loaders(models, tasks, p["split"], p["batch_size"], p["seed"])
    with _Cost(label, {"examples_per_task": p["num_examples"], "data": f"unlabelled {p['split']}"}):
        sd = regmean(models.base, [models.finetuned[n] for n in tasks.names], loaders, alpha=p["alpha"],
                     num_examples=p["num_examples"], plus_plus=p["plus_plus"], exclude=p["exclude"])
    return models.encoder(sd)


def fisher_builder(models, tasks, params: dict):
    """Fisher merging; ``labels`` true uses the ``split`` labels (empirical Fisher), else the model's own
    predictive distribution through each task's head (unlabelled)."""
    from mergelab.databased.fisher import fisher_merging
    p = _pop(params, {"num_examples": 256, "estimator": "per_example", "labels": False, "normalize": True,
                      "eps": 1e-6, "split": "train", "batch_size": 32, "seed": 0, "label": None}, "Fisher")
    names = tasks.names
    if p["labels"]:
        loaders = [LabelledBatches(tasks.inputs(n, p["split"]), tasks.labels(n, p["split"]), p["batch_size"],
                                   p["seed"] + i, models.pad_id) for i, n in enumerate(names)]
    else:
        loaders = _loaders(models, tasks, p["split"], p["batch_size"], p["seed"])
    heads = [models.heads[n] for n in names]
    with _Cost(p["label"] or f"fisher_{p['estimator']}", {"examples_per_task": p["num_examples"],
                                                         "data": ("labelled " if p["labels"] else "unlabelled ")
                                                         + p["split"]}):
        sd = fisher_merging(PooledEncoder(models.base), [prefixed(models.finetuned[n]) for n in names], loaders,
                            heads, num_examples=p["num_examples"], estimator=p["estimator"], labeled=p["labels"],
                            normalize=p["normalize"], eps=p["eps"])
    return models.encoder(unprefixed(sd))


def registry_builder(models, tasks, params: dict):
    """A registry merge (e.g. ``wudi``), optionally with LiNeS: params ``method``, ``params`` (the
    method's), ``lines`` (e.g. {"beta": 0.5}) and ``device``."""
    from mergelab.engine.streaming import merge_state_dicts
    p = _pop(params, {"method": "wudi", "params": {}, "lines": None, "device": "cpu", "label": None}, "registry")
    label = p["label"] or (p["method"] + ("+lines" if p["lines"] else ""))
    with _Cost(label, {"data": "none", "examples_per_task": 0}):
        sd = merge_state_dicts(models.base_sd, [models.finetuned[n] for n in tasks.names], p["method"],
                               dict(p["params"]), device=p["device"], lines=p["lines"])
    return models.encoder(sd)


def emr_builder(models, tasks, params: dict):
    """EMR-Merging: a mapping task -> its encoder (theta0 + lam_t M_t tau_uni); needs the task id."""
    from mergelab.upscale.emr import emr_from_state_dicts
    p = _pop(params, {"label": None}, "EMR")
    names = tasks.names
    with _Cost(p["label"] or "emr", {"data": "none (task id at inference)", "examples_per_task": 0}) as cost:
        r = emr_from_state_dicts(models.base_sd, [models.finetuned[n] for n in names])
        built = {n: models.encoder(r.task_state_dict(models.base_sd, t)) for t, n in enumerate(names)}
    numel = sum(m.numel() for m in r.masks[0].values())
    cost.extra.update({"extra_bytes_per_task": sum((m.numel() + 7) // 8 for m in r.masks[0].values()) + 4,
                       "mask_entries_per_task": numel, "rescalers": r.rescalers})
    if STATS and STATS[-1]["label"] == cost.label:
        STATS[-1].update(cost.extra)
    return built


def wemoe_builder(models, tasks, params: dict):
    """WEMoE adapted on the unlabelled ``split`` inputs (the paper: test); one shared model, returned
    per task so that every evaluation batch holds one task (the router merges per batch)."""
    from mergelab.adapt.wemoe import parameter_counts, upscale_to_wemoe, wemoe_adapt
    p = _pop(params, {"steps": 1000, "lr": 1e-4, "init_lambda": 0.3, "router_hidden_layers": 2,
                      "batch_reduce": True, "split": "test", "batch_size": 16, "seed": 0, "label": None}, "WEMoE")
    names = tasks.names
    loaders = _loaders(models, tasks, p["split"], p["batch_size"], p["seed"])
    with _Cost(p["label"] or "wemoe", {"data": f"unlabelled {p['split']}", "steps": p["steps"]}) as cost:
        moe = upscale_to_wemoe(models.base, [models.finetuned[n] for n in names], init_lambda=p["init_lambda"],
                               router_hidden_layers=p["router_hidden_layers"], batch_reduce=p["batch_reduce"],
                               seed=p["seed"])
        hist = wemoe_adapt(PooledEncoder(moe), loaders, [models.heads[n] for n in names], steps=p["steps"],
                           lr=p["lr"])
    moe.eval()
    counts = parameter_counts(moe)
    if STATS and STATS[-1]["label"] == cost.label:
        STATS[-1].update({"parameter_counts": counts, "entropy_first": hist[0]["entropy"] if hist else None,
                          "entropy_last": hist[-1]["entropy"] if hist else None,
                          "seconds_per_step": sorted(h["seconds"] for h in hist)[len(hist) // 2] if hist else None})
    return {n: moe for n in names}


# name -> (builder, params, data it needs). Schedules are the papers' / FusionBench's defaults;
# CPU_OVERRIDES shortens the slow ones for a shared 2-core machine.
ROWS: dict[str, tuple] = {
    "regmean": (regmean_builder, {"alpha": 0.95, "num_examples": 256}, "unlabelled train, 256 per task"),
    "regmean++": (regmean_builder, {"alpha": 0.95, "num_examples": 256, "plus_plus": True},
                  "unlabelled train, 256 per task"),
    "fisher": (fisher_builder, {"num_examples": 256}, "unlabelled train (model's own predictions), 256 per task"),
    "fisher_labels": (fisher_builder, {"num_examples": 256, "labels": True}, "labelled train, 256 per task"),
    "wudi": (registry_builder, {"method": "wudi", "params": {"iter_num": 400, "lr": 1e-5}}, "none"),
    "ties+lines": (registry_builder, {"method": "ties", "params": {"lambda": 1.0}, "lines": {"beta": 0.5}},
                   "none (beta on validation)"),
    "emr": (emr_builder, {}, "none; task id at inference"),
    "wemoe": (wemoe_builder, {"steps": 1000, "lr": 1e-4}, "unlabelled test (all of it, batches of 16)"),
}
CPU_OVERRIDES = {"wemoe": {"steps": 50, "lr": 2e-3}, "fisher": {"num_examples": 64},
                 "fisher_labels": {"num_examples": 64}}
