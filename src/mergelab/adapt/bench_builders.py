"""Benchmark rows for `mergelab bench`: AdaMerging and Concrete as builders.

Register them as rows of a suite, e.g.
    from mergelab.bench.suite import MethodSpec
    from mergelab.adapt.bench_builders import adapt_methods
    methods = adapt_methods(steps=40)            # 8 rows: 4 methods x {test, val} inputs
or run them alone: `python -m mergelab.adapt.bench_builders --steps 40 --out runs/adapt`.

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

STATS: list[dict] = []


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so that the next peak is this run's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


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
    rss0 = _rss_kb("VmRSS")
    reset = _reset_peak()
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
                  "peak_rss_mb": _rss_kb("VmHWM") / 1024 if reset else None,
                  "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "coefficients": res.coefficients.tolist() if res.coefficients.dim() == 1 else
                  res.coefficients.mean(0).tolist(),
                  "val_accuracy": [(h["step"], h["val_accuracy"]) for h in res.history if "val_accuracy" in h]})
    if plot_dir:
        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        plot_history(res.history, Path(plot_dir) / f"{label}.png", title=label)
        (Path(plot_dir) / f"{label}.json").write_text(json.dumps(res.history))
    return models.encoder(unprefixed(res.merged_state_dict))


def adapt_methods(steps: int = 40, tta_steps: int | None = None, splits=("test", "val"), batch_size: int = 16,
                  track_val: bool = False, plot_dir: str | None = None):
    """The benchmark's rows: AdaMerging task-/layer-wise, Concrete TA, Concrete (layer-wise)
    AdaMerging, each adapted on the unlabelled inputs of every split in `splits`."""
    from mergelab.bench.suite import MethodSpec
    tta = steps if tta_steps is None else tta_steps
    rows = {
        "adamerging_task": {"kind": "adamerging", "granularity": "task", "steps": steps},
        "adamerging_layer": {"kind": "adamerging", "granularity": "layer", "steps": steps},
        "concrete_ta": {"kind": "concrete", "inner": "task_arithmetic", "steps": steps},
        "concrete_adamerging": {"kind": "concrete", "inner": "adamerging", "granularity": "layer",
                                "steps": steps, "tta_steps": tta},
    }
    out = []
    for split in splits:
        for name, params in rows.items():
            label = f"{name}@{split}"
            out.append(MethodSpec(label, builder=adapt_builder,
                                  params={**params, "split": split, "batch_size": batch_size, "label": label,
                                          "track_val": track_val, "plot_dir": plot_dir}))
    return out


def main(argv=None) -> int:
    import argparse
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description="AdaMerging / Concrete rows of the text6 benchmark")
    ap.add_argument("--suite", default="text6")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tta-steps", type=int, default=None)
    ap.add_argument("--splits", default="test,val")
    ap.add_argument("--rows", default=None, help="comma-separated subset, e.g. adamerging_task@test")
    ap.add_argument("--lr", type=float, default=None, help="override the paper's learning rates")
    ap.add_argument("--track-val", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from mergelab.bench.runner import run_benchmark
    from mergelab.bench.suite import get_suite
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = adapt_methods(a.steps, a.tta_steps, tuple(a.splits.split(",")), track_val=a.track_val,
                            plot_dir=str(out / "plots"))
    if a.rows:
        wanted = a.rows.split(",")
        methods = [m for m in methods if m.name in wanted]
    if a.lr is not None:
        for m in methods:
            m.params["lr"] = a.lr
            if m.params.get("inner") == "adamerging":
                m.params["tta_lr"] = a.lr
    result = run_benchmark(get_suite(a.suite), cache_dir=Path(a.cache_dir) if a.cache_dir else None,
                           threads=a.threads, methods=methods)
    result["adapt_stats"] = STATS
    result.pop("correct", None)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    for name, row in result["rows"].items():
        print(f"{name:<28} avg {row['average']:.4f} ± {row['average_se']:.4f}"
              + (f"  norm {row['normalized']:.4f}" if "normalized" in row else ""))
    for s in STATS:
        print(f"{s['label']:<28} {s['seconds_per_step']:.2f} s/step, peak {s['peak_rss_mb'] or 0:.0f} MB "
              f"(process {s['process_peak_rss_mb']:.0f} MB), entropy {s['entropy_first']:.3f} -> {s['entropy_last']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
