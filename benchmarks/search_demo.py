"""Merge search on the benchmark's demo suite: search vs grid, cached vs naive trials, and trials/hour
with 1 and 2 Ray workers and on a 2-node Ray cluster started here.

Needs the demo suite's fine-tunes (``mergelab bench --suite demo --cache-dir CACHE``) and a base folder
with the same tensor names (the MiniLM base re-saved with ``save_pretrained``). Writes a Markdown
report. Hyper-parameters are chosen on validation; each chosen model is scored once on test.

    PYTHONPATH=src python benchmarks/search_demo.py --cache CACHE --base BASE --work WORK --out REPORT.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

TASKS = ["fortune_lang", "gcide", "wordnet_verb"]
ROOT = Path(__file__).resolve().parents[1]


def finetunes(cache: Path) -> list[str]:
    found = {}
    for d in sorted(cache.iterdir()):
        meta = d / "meta.json"
        if meta.is_file():
            found[json.loads(meta.read_text())["task"]] = str(d)
    return [found[t] for t in TASKS]


def write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def search(args, name: str, search_file: Path, *extra: str, env: dict | None = None) -> dict:
    out = args.work / name
    cmd = [sys.executable, "-m", "mergelab", "search", str(search_file), str(out), "--quiet", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env or {**os.environ, "PYTHONPATH": str(ROOT / "src")})
    s = json.loads((out / "summary.json").read_text())
    s["process_seconds"] = time.perf_counter() - t0
    s["command"] = "mergelab search " + " ".join(str(c) for c in cmd[4:])
    return s


def test_results(s: dict) -> dict:
    return s["final"]["tasks"]


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Difference of mean test accuracy (a - b) over the tasks and its paired SE (same examples)."""
    diffs, var = [], 0.0
    for t in TASKS:
        d = [float(x) - float(y) for x, y in zip(a[t]["correct"], b[t]["correct"])]
        mu = sum(d) / len(d)
        diffs.append(mu)
        var += sum((x - mu) ** 2 for x in d) / max(1, len(d) - 1) / len(d)
    return sum(diffs) / len(TASKS), math.sqrt(var) / len(TASKS)


def mean_test(r: dict) -> float:
    return sum(r[t]["accuracy"] for t in TASKS) / len(TASKS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--scaling-trials", type=int, default=12)
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the runs in WORK")
    args = ap.parse_args()
    if args.report_only:
        def load(name: str) -> dict:
            s = json.loads((args.work / name / "summary.json").read_text())
            flags = {"scale_w1": " --workers 1", "scale_w2": " --workers 2",
                     "scale_cluster": " --ray-address 127.0.0.1:PORT"}.get(name, "")
            yaml_name = "scaling" if name.startswith("scale") else name
            s["command"] = f"mergelab search {args.work / yaml_name}.yaml {args.work / name} --quiet{flags}"
            return s
        runs = {n: load(n) for n in ("grid", "tpe_global", "tpe_layers")}
        scaling = {"ray, 1 worker": load("scale_w1"), "ray, 2 workers": load("scale_w2"),
                   "2-node cluster (1 CPU each)": load("scale_cluster")}
        report(args, runs, scaling)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    models = finetunes(args.cache)
    recipe = write(args.work / "recipe.yaml", {"base_model": str(args.base), "models": [{"model": m} for m in models],
                                               "merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}})
    objective = {"type": "tasks", "suite": "demo", "heads": dict(zip(TASKS, models))}
    common = {"recipe": str(recipe), "objective": objective, "seed": 0, "batch": 4, "final_split": "test",
              "executor": "ray", "workers": 2}
    layered = {"method": ["task_arithmetic", "ties"], "lambda": {"low": 0.1, "high": 1.5},
               "density": {"low": 0.05, "high": 0.5}, "layers": {"granularity": 2, "low": 0.0, "high": 2.0}}
    files = {
        "grid": write(args.work / "grid.yaml", {**common, "algorithm": "grid", "trials": 100, "naive_probe": 0,
                                                "space": {"method": ["task_arithmetic", "ties"],
                                                          "lambda": [0.3, 0.5, 0.8, 1.0, 1.3], "density": [0.2]}}),
        "tpe_global": write(args.work / "tpe_global.yaml", {
            **common, "algorithm": "tpe", "trials": args.trials, "naive_probe": 0,
            "space": {k: v for k, v in layered.items() if k != "layers"}}),
        "tpe_layers": write(args.work / "tpe_layers.yaml", {**common, "algorithm": "tpe", "trials": args.trials,
                                                            "naive_probe": 2, "space": layered}),
        "scaling": write(args.work / "scaling.yaml", {**common, "algorithm": "tpe", "trials": args.scaling_trials,
                                                      "final_split": None, "naive_probe": 0, "space": layered}),
    }
    runs = {}
    for name in ("grid", "tpe_global", "tpe_layers"):
        runs[name] = search(args, name, files[name])
        print(name, runs[name]["best"]["values"], file=sys.stderr)
    scaling = {"ray, 1 worker": search(args, "scale_w1", files["scaling"], "--workers", "1"),
               "ray, 2 workers": search(args, "scale_w2", files["scaling"], "--workers", "2")}
    # a 2-node cluster on this machine: a head and a second node, 1 CPU each, stopped by process group
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(Path(sys.executable).with_name("ray"))
    nodes = []
    try:
        for extra in (["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                       f"--temp-dir=/tmp/r{port}"], [f"--address=127.0.0.1:{port}"]):
            nodes.append(subprocess.Popen([ray, "start", "--block", "--num-cpus=1", *extra], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            time.sleep(10)
        scaling["2-node cluster (1 CPU each)"] = search(args, "scale_cluster", files["scaling"], "--ray-address",
                                                        f"127.0.0.1:{port}", env=env)
    finally:
        for p in reversed(nodes):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(60)
    report(args, runs, scaling)
    return 0


def report(args, runs: dict, scaling: dict) -> None:
    load = os.getloadavg()
    lines = ["# mergelab search on the demo suite", "",
             "Base all-MiniLM-L6-v2, the demo suite's three fine-tunes (`mergelab bench --suite demo`), objective: "
             "mean validation accuracy of the three tasks through their frozen heads; the chosen model of each "
             "search scored once on test. TPE runs: 2 embedded Ray workers, batch 4, seed 0. "
             f"Machine: 2 shared cores (load average at the end {load[0]:.1f}, other sessions running).", "",
             "Command: `PYTHONPATH=src python benchmarks/search_demo.py --cache CACHE --base BASE --work WORK "
             f"--out {args.out}` (trials {args.trials}, scaling trials {args.scaling_trials}).", "",
             "## Search vs grid (test accuracy of the model chosen on validation)", "",
             "| search | trials | chosen | val mean | test " + " | test ".join(TASKS)
             + " | test mean | vs grid (paired 95% CI) |",
             "|---|---|---|---|" + "---|" * len(TASKS) + "---|---|"]
    grid_test = test_results(runs["grid"])
    for name, s in runs.items():
        r = test_results(s)
        m = s["best"]["merge"]
        chosen = f"{m['method']} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in m["params"].items())
        if m.get("layers"):
            chosen += "; layers " + ", ".join(f"{k} {v:.2f}" for k, v in m["layers"][0].items())
        if name == "grid":
            vs = "—"
        else:
            d, se = paired(r, grid_test)
            vs = f"{100 * d:+.2f} pt [{100 * (d - 1.96 * se):+.2f}, {100 * (d + 1.96 * se):+.2f}]"
        val = 100 * list(s["best"]["values"].values())[0]
        lines.append(f"| {name} | {s['trials_planned']} | {chosen} | {val:.2f} | "
                     + " | ".join(f"{100 * r[t]['accuracy']:.1f}" for t in TASKS)
                     + f" | {100 * mean_test(r):.2f} | {vs} |")
    t = runs["tpe_layers"]["timing"]
    recs = [json.loads(line) for line in (args.work / "tpe_layers" / "trials.jsonl").read_text().splitlines()]
    merges = [r["merge_seconds"] for r in recs if r.get("cache_hit") and "merge_seconds" in r]
    merge_s = sum(merges) / len(merges)
    lines += ["", "## Seconds per trial: cached vs naive (same run: tpe_layers)", "",
              "| path | seconds per trial |", "|---|---|",
              f"| cached (task vectors held by the worker, merge in memory, score) | "
              f"{t['cached_seconds_per_trial']:.2f} (merge {merge_s:.2f}) |",
              f"| naive (merge to disk from the checkpoints, reload the merged folder, score) | "
              f"{t['naive_seconds_per_trial']:.2f} |",
              f"| ratio naive / cached | {t['naive_over_cached']:.2f}x |",
              f"| first trial of a worker: reading base + fine-tunes + eval model | "
              f"{t['worker_load_seconds']:.1f} s once |",
              "", f"Naive values equal the cached ones: {t['naive_values_match_cached']}.", "",
              "## Trials per hour (the same 'scaling' search, TPE, per-layer space)", "",
              "| where | trials | wall s (search loop) | trials/hour | workers that loaded task vectors |",
              "|---|---|---|---|---|"]
    for name, s in scaling.items():
        tt = s["timing"]
        lines.append(f"| {name} | {s['trials_run_now']} | {s['wall_seconds']:.1f} | {tt['trials_per_hour']:.0f} | "
                     f"{tt['workers_that_loaded']} |")
    same = len({json.dumps(s["best"]["params"], sort_keys=True) for s in scaling.values()}) == 1
    lines += ["", f"The three scaling runs chose the same trial: {same} (trials do not depend on the workers).",
              "Wall time includes each worker's one-time load (imports, checkpoints, tokenized data).", "",
              "Commands:", ""] + [f"- `{s['command']}`" for s in list(runs.values()) + list(scaling.values())]
    args.out.write_text("\n".join(lines) + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps(
        {"runs": {k: {kk: vv for kk, vv in v.items() if kk != "final"} for k, v in runs.items()},
         "test": {k: {t: {kk: vv for kk, vv in r.items() if kk != "correct"} for t, r in test_results(v).items()}
                  for k, v in runs.items()},
         "scaling": scaling}, indent=1, default=float))


if __name__ == "__main__":
    raise SystemExit(main())
