"""The search driver: Optuna asks a batch of trials, the executor (this process or Ray) runs them, the
results are told back in trial order and stored as they finish.

Trials are asked ``batch`` at a time and told in trial order, so the sequence of trials depends on the
seed and the batch size only, not on how many workers run them or in which order they finish: the
local executor, an embedded Ray runtime and a cluster give the same trials and the same best one.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from mergelab.errors import MergelabError
from mergelab.search.config import SearchConfig, objectives_names
from mergelab.search.space import grid_points, layer_groups, suggest, to_merge
from mergelab.search.store import TrialStore

Progress = Callable[..., None]


def _sampler(cfg: SearchConfig):
    import optuna
    if cfg.algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(10, max(2, cfg.trials // 4)))
    if cfg.algorithm == "cmaes":
        try:
            import cmaes  # noqa: F401  (optuna's CmaEsSampler needs it)
        except ImportError:
            raise MergelabError("algorithm cmaes needs the 'cmaes' package: pip install 'mergelab[search]'") \
                from None
        return optuna.samplers.CmaEsSampler(seed=cfg.seed, warn_independent_sampling=False,
                                            n_startup_trials=0)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise MergelabError("mergelab search needs Optuna: pip install 'mergelab[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _same(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) or isinstance(y, float):
            if not math.isclose(float(x), float(y), rel_tol=1e-12, abs_tol=1e-15):
                return False
        elif x != y:
            return False
    return True


def make_context(cfg: SearchConfig, labels: list[str] | None, layer_of: dict | None) -> dict[str, Any]:
    objectives = []
    for o in cfg.objectives:
        o = dict(o)
        if o["type"] == "tasks":
            o["_model_paths"] = [m["model"] for m in cfg.recipe["models"]]
        objectives.append(o)
    return {"key": cfg.digest(), "recipe": cfg.recipe, "objectives": objectives, "layer_of": layer_of,
            "labels": labels, "threads": max(1, int(cfg.resources.get("cpus") or 1))}


def _executor(cfg: SearchConfig, kind: str, address: str | None, workers: int):
    from mergelab.recycle.executor import make_executor
    r = cfg.resources
    cpus = r.get("cpus") or 1
    return make_executor(kind, address, num_cpus=int(math.ceil(workers * cpus)), cpus_per_run=cpus,
                         gpus_per_run=r.get("gpus") or 0, memory_per_run=r.get("memory"))


def _ok(rec: dict, n: int) -> bool:
    v = rec.get("values")
    return rec.get("state") == "complete" and isinstance(v, list) and len(v) == n and all(
        isinstance(x, (int, float)) and math.isfinite(x) for x in v)


def pareto_front(records: list[dict], directions: list[str]) -> list[dict]:
    """The complete trials no other trial beats on every objective (at least as good, better on one)."""
    sign = [1.0 if d == "maximize" else -1.0 for d in directions]

    def better_or_equal(a, b):
        return all(s * x >= s * y for s, x, y in zip(sign, a, b))
    front = []
    for r in records:
        v = r["values"]
        if not any(better_or_equal(q["values"], v) and q["values"] != v for q in records):
            front.append(r)
    return front


def pick_best(records: list[dict], directions: list[str]) -> dict:
    """One objective: the best value (lowest trial number on ties). Several: among the Pareto front, the
    best mean of the objectives scaled to [0, 1] over all complete trials."""
    sign = [1.0 if d == "maximize" else -1.0 for d in directions]
    if len(directions) == 1:
        return max(records, key=lambda r: (sign[0] * r["values"][0], -r["number"]))
    front = pareto_front(records, directions)
    lo = [min(s * r["values"][i] for r in records) for i, s in enumerate(sign)]
    hi = [max(s * r["values"][i] for r in records) for i, s in enumerate(sign)]

    def score(r):
        return sum((s * v - a) / (b - a) if b > a else 1.0
                   for s, v, a, b in zip(sign, r["values"], lo, hi)) / len(sign)
    return max(front, key=lambda r: (score(r), -r["number"]))


def run_search(cfg: SearchConfig, out_dir: str | Path, *, ray_address: str | None = None,
               trials: int | None = None, resume: bool = False, executor: str | None = None,
               workers: int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) a search into ``out_dir``; returns the summary also written to summary.json."""
    optuna = _optuna()
    from optuna.trial import TrialState

    from mergelab.io import open_checkpoint
    progress = progress or (lambda *a, **k: None)
    out = Path(out_dir).expanduser().resolve()
    budget = trials if trials is not None else cfg.trials
    if budget < 1:
        raise MergelabError(f"--trials must be at least 1, got {budget}")
    kind = executor or ("ray" if ray_address else cfg.executor)
    workers = workers or cfg.workers
    outputs = objectives_names(cfg)
    directions = [d for _, d in outputs]

    labels, layer_of = None, None
    if cfg.layers is not None:
        with open_checkpoint(cfg.recipe["base_model"]) as base:
            names = [n for n in base.keys() if base.dtype(n).is_floating_point]
        labels, layer_of = layer_groups(names, cfg.layers.granularity, cfg.layers.other)
    points = grid_points(cfg, labels or []) if cfg.algorithm == "grid" else None
    planned = min(budget, len(points)) if points is not None else budget

    store = TrialStore(out, cfg.digest(), resume)
    reused = 0
    ctx = make_context(cfg, labels, layer_of)
    study = optuna.create_study(directions=directions, sampler=_sampler(cfg))
    for p in points or []:
        study.enqueue_trial(p)
    started = time.perf_counter()
    ran: list[dict] = []
    ex = None
    try:
        number = 0
        while number < planned:
            size = min(cfg.batch, planned - number)
            asked = [study.ask() for _ in range(size)]
            flat = {t.number: suggest(t, cfg, labels or []) for t in asked}
            jobs = []
            for t in asked:
                rec = store.records.get(t.number)
                if rec is not None:
                    if not _same(rec["params"], flat[t.number]):
                        raise MergelabError(f"{out}: --resume: trial {t.number} asks other parameters than the "
                                            "stored one (a different Optuna version?); use another OUT_DIR")
                    reused += 1
                    continue
                jobs.append({"number": t.number, "params": flat[t.number], "context": ctx,
                             "merge": to_merge(cfg, flat[t.number], labels or [])})
            if jobs:
                if ex is None:
                    progress("stage", name=f"{planned} trials on {kind}" + (f" ({ray_address})" if ray_address
                                                                              else ""))
                    ex = _executor(cfg, kind, ray_address, workers)
                for rec in ex.run(_trial_fn(), jobs):
                    rec["values"] = [float(v) for v in rec.get("values") or []]
                    store.add(rec)
                    ran.append(rec)
                    progress("trial", record=rec, done=len(store.records), total=planned, outputs=outputs)
            for t in asked:
                rec = store.records[t.number]
                if _ok(rec, len(outputs)):
                    study.tell(t, rec["values"] if len(outputs) > 1 else rec["values"][0])
                else:
                    study.tell(t, state=TrialState.FAIL)
            number += size
            done = [store.records[i] for i in range(number)]
            if number >= min(planned, cfg.batch) and not any(_ok(r, len(outputs)) for r in done):
                first = next((r.get("error") for r in done if r.get("error")), "no value")
                raise MergelabError(f"every trial failed; the first: {first}")
        naive = []
        complete = [r for r in ran if _ok(r, len(outputs))]
        if cfg.naive_probe and complete:
            if ex is None:
                ex = _executor(cfg, kind, ray_address, workers)
            progress("stage", name=f"naive reference: {min(cfg.naive_probe, len(complete))} trials merged to disk "
                                   "and reloaded")
            probe = complete[:cfg.naive_probe]
            jobs = [{"number": r["number"], "params": r["params"], "context": ctx, "naive": True,
                     "merge": to_merge(cfg, r["params"], labels or [])} for r in probe]
            for rec in ex.run(_trial_fn(), jobs):
                rec["values"] = [float(v) for v in rec.get("values") or []]
                store.add(rec)
                naive.append(rec)
    finally:
        if ex is not None:
            ex.close()
        store.close()
    wall = time.perf_counter() - started

    records = [store.records[i] for i in range(planned)]
    complete = [r for r in records if _ok(r, len(outputs))]
    if not complete:
        raise MergelabError(f"no trial completed; the first error: {records[0].get('error', 'no value')}")
    best = pick_best(complete, directions)
    front = pareto_front(complete, directions) if len(outputs) > 1 else [best]
    from mergelab.search.report import finish
    summary = finish(cfg, out, ctx, records, best, front, outputs, labels, naive, {
        "executor": kind, "ray_address": ray_address, "workers": workers, "trials_planned": planned,
        "trials_run_now": len(ran), "trials_reused": reused, "wall_seconds": wall})
    progress("done", summary=summary)
    return summary


def _trial_fn():
    from mergelab.search.worker import run_trial
    return run_trial
