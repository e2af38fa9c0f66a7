#!/usr/bin/env python
"""Concrete AdaMerging against layer-wise AdaMerging when the test-time schedules are longer (issue 15).

The benchmark's CPU rows run layer-wise AdaMerging for 20 steps and Concrete AdaMerging for 15 mask steps + 20
test-time steps (the papers: 1,000-2,000). This runs both on the unlabelled test inputs of one fine-tuning seed of a
suite, with every step count multiplied by ``--scale``, and compares them, on the same test examples, with each other
and with the benchmark's own rows of the same seed (per-example outcomes from a ``mergelab bench`` results.json):

    MERGELAB_CACHE=<cache> python benchmarks/concrete_schedule.py --suite text8 --scale 4 \
        --baseline runs/text8/results.json --out runs/concrete-x4

Writes OUT/result.json (rows, learned-mask statistics, paired differences) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

STEP_KEYS = ("steps", "tta_steps")
ROWS = ("adamerging_layer", "concrete_adamerging")


def scaled_rows(scale: int) -> dict[str, dict]:
    """The benchmark's CPU settings of the two rows with every step count times ``scale`` (learning rates kept:
    Adam's steps are about +-lr each, so a longer schedule at the same lr is what 'more steps' means)."""
    from mergelab.bench.adapt_methods import CPU_ROWS
    return {name: {k: (v * scale if k in STEP_KEYS else v) for k, v in CPU_ROWS[name].items()} for name in ROWS}


def paired(a: dict[str, list], b: dict[str, list], tasks: list[str]) -> dict[str, float]:
    """Difference of the task-average accuracies a - b, its paired SE and 95 % paired bootstrap interval."""
    from mergelab.bench.evaluate import EvalResult, paired_bootstrap, paired_diff
    ra = [EvalResult(sum(a[t]) / len(a[t]), len(a[t]), list(a[t])) for t in tasks]
    rb = [EvalResult(sum(b[t]) / len(b[t]), len(b[t]), list(b[t])) for t in tasks]
    diff, se = paired_diff(ra, rb)
    boot = paired_bootstrap([a[t] for t in tasks], [b[t] for t in tasks], n_boot=1000, seed=0)
    return {"diff": diff, "se": se, "lo": boot["ci_low"], "hi": boot["ci_high"]}


def baseline_outcomes(path: Path, suite: str, seed: int) -> dict[str, dict[str, list]]:
    """Per-example test outcomes of the two rows for fine-tuning ``seed`` in a ``mergelab bench`` results.json
    (one seed or several); a result of another suite or without that seed or row is refused, not paired."""
    res = json.loads(path.read_text())
    if res.get("suite") != suite:
        raise SystemExit(f"{path}: a result of suite {res.get('suite')!r}, not {suite!r}")
    run = res.get("runs", {}).get(str(seed))
    if run is None:
        raise SystemExit(f"{path}: no fine-tuning seed {seed} (it has seeds {res.get('seeds')})")
    missing = [f"{n}@test" for n in ROWS if f"{n}@test" not in run["correct"]]
    if missing:
        raise SystemExit(f"{path}: no row {', '.join(missing)} for seed {seed}")
    return {n: run["correct"][f"{n}@test"] for n in ROWS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="text8")
    ap.add_argument("--seed", type=int, default=0, help="fine-tuning seed (cached fine-tunes)")
    ap.add_argument("--scale", type=int, default=4, help="multiply every step count of the two rows")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a `mergelab bench` results.json of the same suite and seed: its rows join the comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from mergelab.bench import adapt_methods as AM
    from mergelab.bench import train
    from mergelab.bench.runner import build_method, evaluate_built, prepare_models, prepare_tasks
    from mergelab.bench.suite import get_suite
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    suite = get_suite(a.suite)
    baseline = baseline_outcomes(a.baseline, suite.name, a.seed) if a.baseline is not None else {}
    base = train.load_base_encoder()
    tasks = prepare_tasks(suite.tasks, suite.protocol, base[1], specs=suite.task_specs)
    models = prepare_models(suite, tasks, Path(a.cache_dir) if a.cache_dir else None, base=base, seed=a.seed)
    rows = scaled_rows(a.scale)
    result = {"suite": suite.name, "seed": a.seed, "scale": a.scale, "settings": rows, "rows": {}, "pairs": []}
    outcomes: dict[str, dict[str, list]] = {}
    for spec in AM.adapt_methods(("test",), rows=rows):
        label = f"{spec.name.split('@')[0]} x{a.scale}"
        t0 = time.perf_counter()
        model = build_method(spec, models, tasks, dict(spec.params))
        build_s = time.perf_counter() - t0
        test = evaluate_built(model, models, tasks, "test")
        outcomes[label] = {n: [bool(c) for c in r.correct] for n, r in test.items()}
        info = dict(getattr(model, "bench_info", {}))     # coefficients, learned mask, entropy, s/step
        result["rows"][label] = {"average": sum(r.accuracy for r in test.values()) / len(test),
                                 "per_task": {n: r.accuracy for n, r in test.items()}, "build_seconds": build_s,
                                 "adapt": info}
        print(f"{label:<26} avg {100 * result['rows'][label]['average']:.2f}  built in {build_s:.0f} s; "
              f"coefficients {info.get('coefficients_min', float('nan')):.3f} .. "
              f"{info.get('coefficients_max', float('nan')):.3f}; mask kept "
              f"{100 * info.get('mask_kept_fraction', float('nan')):.1f} %; entropy "
              f"{info.get('entropy_first') or float('nan'):.3f} -> {info.get('entropy_last') or float('nan'):.3f}",
              flush=True)
        del model
    for name, correct in baseline.items():
        if any(len(correct.get(t, ())) != len(outcomes[f"{name} x{a.scale}"][t]) for t in tasks.names):
            raise SystemExit(f"{a.baseline}: {name}@test was scored on other test examples than this run's")
        outcomes[f"{name} x1"] = {t: [bool(c) for c in correct[t]] for t in tasks.names}
    names = tasks.names
    pairs = [(f"concrete_adamerging x{a.scale}", f"adamerging_layer x{a.scale}"),
             ("concrete_adamerging x1", "adamerging_layer x1"),
             (f"concrete_adamerging x{a.scale}", "concrete_adamerging x1"),
             (f"adamerging_layer x{a.scale}", "adamerging_layer x1")]
    for x, y in dict.fromkeys(p for p in pairs if p[0] != p[1]):
        if x in outcomes and y in outcomes:
            result["pairs"].append({"a": x, "b": y, **paired(outcomes[x], outcomes[y], names)})
    (a.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n| A | B | A - B (points) | paired SE | 95 % paired bootstrap |\n|---|---|---:|---:|---|")
    for p in result["pairs"]:
        print(f"| {p['a']} | {p['b']} | {100 * p['diff']:+.2f} | {100 * p['se']:.2f} | "
              f"[{100 * p['lo']:+.2f}, {100 * p['hi']:+.2f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
