"""Leaderboard rows (RegMean, RegMean++, Fisher, WUDI, LiNeS, EMR, WEMoE) on a bench suite's fine-tunes,
next to TIES at the setting the suite's last full run chose on validation (docs/results/text6-2026-11-22.md;
task arithmetic, TSV-M, Iso-CTS and SMILE rows on request with --rows). Hyper-parameters of the new rows are
the papers' defaults; only LiNeS' beta is picked on the val split. Test is touched once per row.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python scripts/leaderboard_rows.py --out runs/leaderboard

Writes OUT/result.json after every row (accuracy per task, average and SE, paired difference to TIES,
build cost); uses the bench's pools and evaluation read-only (bench/ is not changed).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="text6")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default=None, help="comma-separated subset of row names")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args(argv)
    import torch

    from mergelab.bench import train
    from mergelab.bench.evaluate import mean_se, paired_diff
    from mergelab.bench.runner import evaluate_built, prepare_models, prepare_tasks
    from mergelab.bench.smile_methods import bench_builder as smile_builder
    from mergelab.bench.suite import get_suite
    from mergelab.databased import builders as B
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = get_suite(a.suite)
    if a.tasks:
        unknown = [t for t in a.tasks.split(",") if t not in suite.tasks]
        if unknown:
            raise SystemExit(f"task {unknown[0]!r} is not in suite {suite.name} ({', '.join(suite.tasks)})")
        suite.tasks = a.tasks.split(",")
    t0 = time.perf_counter()
    base = train.load_base_encoder()
    tasks = prepare_tasks(suite.tasks, suite.protocol, base[1])
    models = prepare_models(suite, tasks, Path(a.cache_dir) if a.cache_dir else None, base=base)
    names = tasks.names

    def reg(method, params, lines=None):
        return B.registry_builder, {"method": method, "params": params, "lines": lines}

    rows = {
        "ties": reg("ties", {"density": 0.1, "lambda": 0.3, "trim_scope": "global", "merge": "mean"}),
        "regmean": (B.regmean_builder, {"alpha": 0.95, "num_examples": 256}),
        "regmean++": (B.regmean_builder, {"alpha": 0.95, "num_examples": 256, "plus_plus": True}),
        # CPU-shortened: 40 Adam steps at lr 1e-4 move each entry at most as far as the paper's 400 at 1e-5;
        # embedding tables (a lookup, not a Linear's W x: outside WUDI's derivation) get the mean task vector
        "wudi@40x1e-4": reg("wudi", {"iter_num": 40, "lr": 1e-4, "exclude": "embeddings"}),
        "wemoe@test": (B.wemoe_builder, {"steps": 50, "lr": 2e-3, "batch_size": 16}),
        "emr": (B.emr_builder, {}),
        "fisher_batch@256": (B.fisher_builder, {"num_examples": 256, "estimator": "batch"}),
        "ties+lines": None,      # beta on val below
        "individual": (lambda m, t, p: {n: m.encoder(m.finetuned[n]) for n in names}, {}),
    }
    extra = {   # not run by default on a 2-core CPU (cost); name them in --rows
        "wudi": reg("wudi", {"iter_num": 400, "lr": 1e-5, "exclude": "embeddings"}),
        "fisher_per_example@32": (B.fisher_builder, {"num_examples": 32, "estimator": "per_example"}),
        "task_arithmetic@0.15": reg("task_arithmetic", {"lambda": 0.15}),
        "tsv@0.9": reg("tsv", {"alpha": 0.9}),
        "iso_cts@1.3": reg("iso_cts", {"alpha": 1.3}),
        "smile_k32_g16": (smile_builder, {"k": 32, "gate_k": 16}),
        # the paper's router lr with a shortened schedule: lr 2e-3 (steps x lr kept) collapses the entropy
        "wemoe@test_lr1e-4": (B.wemoe_builder, {"steps": 50, "lr": 1e-4, "batch_size": 16}),
    }
    if a.rows:
        keep = list(dict.fromkeys(["ties", *a.rows.split(",")]))
        every = {**rows, **extra}
        unknown = [r for r in keep if r not in every]
        if unknown:
            raise SystemExit(f"unknown row {unknown[0]!r}; rows: {', '.join(every)}")
        rows = {k: every[k] for k in keep}
    result = {"suite": suite.name, "tasks": names, "threads": a.threads, "rows": {},
              "prepare_seconds": time.perf_counter() - t0}
    path = out / "result.json"
    if path.exists():
        result["rows"].update(json.loads(path.read_text()).get("rows", {}))
    results = {}
    for name, spec in rows.items():
        if name in result["rows"]:       # done in an earlier run (the report pairs rows from result.json)
            continue
        search = None
        if name == "ties+lines":
            search = {}
            best = None
            for beta in (0.2, 0.5, 1.0):
                b, p = reg("ties", {"density": 0.1, "lambda": 1.0, "trim_scope": "global", "merge": "mean"},
                           {"beta": beta})
                val = evaluate_built(b(models, tasks, dict(p)), models, tasks, "val")
                search[beta] = mean_se(list(val.values()))[0]
                if best is None or search[beta] > search[best]:
                    best = beta
            spec = reg("ties", {"density": 0.1, "lambda": 1.0, "trim_scope": "global", "merge": "mean"},
                       {"beta": best})
        builder, params = spec
        n_stats = len(B.STATS)
        t1 = time.perf_counter()
        built = builder(models, tasks, dict(params))
        build_s = time.perf_counter() - t1
        test = evaluate_built(built, models, tasks, "test")
        results[name] = [test[n] for n in names]
        avg, se = mean_se(results[name])
        row = {"average": avg, "average_se": se, "per_task": {n: test[n].accuracy for n in names},
               "correct": {n: test[n].correct for n in names}, "build_seconds": build_s, "params": params,
               "cost": B.STATS[-1] if len(B.STATS) > n_stats else None, "lines_val_search": search}
        if "ties" in results and name != "ties":
            d, dse = paired_diff(results[name], results["ties"])
            row["vs_ties"] = {"diff": d, "paired_se": dse}
        result["rows"][name] = row
        path.write_text(json.dumps(result, indent=1, default=str))
        vs = row.get("vs_ties")
        print(f"{name:<24} {100 * avg:6.2f} ± {100 * se:.2f}  build {build_s:7.1f} s"
              + (f"  vs TIES {100 * vs['diff']:+.2f} (paired SE {100 * vs['paired_se']:.2f})" if vs else ""),
              flush=True)
        del built
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
