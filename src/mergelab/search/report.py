"""What a search leaves in OUT_DIR: the best model, its recipe, the trial table, plots and a summary.

``best_recipe.yaml`` is a plain mergekit-layout recipe: ``mergelab merge best_recipe.yaml DIR``
rebuilds ``best_model`` exactly. Per-layer coefficients have no recipe key, so they are folded into
the inputs: ``best_inputs/model<i>`` holds base + c_layer * (model_i - base) for every tensor, and the
recipe names those folders.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mergelab.search.config import SearchConfig
from mergelab.search.space import to_merge


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def timing(records: list[dict], naive: list[dict], wall: float, ran: int) -> dict[str, Any]:
    """Seconds per trial: cached (merge in memory + score, task vectors already held), the first trial of
    each worker (which reads them), and naive (merge to disk from the checkpoints + reload), same run."""
    now = [r for r in records if r.get("state") == "complete" and "trial_seconds" in r]
    cached = [r["trial_seconds"] for r in now if r.get("cache_hit")]
    loads = [r["load_seconds"] for r in now if "load_seconds" in r]
    naive_s = [r["trial_seconds"] for r in naive if r.get("state") == "complete"]
    c, n = _mean(cached), _mean(naive_s)
    by_number = {r["number"]: r for r in records}
    agree = [all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
                 for a, b in zip(r["values"], by_number[r["number"]]["values"]))
             for r in naive if r.get("state") == "complete"]
    return {
        "cached_seconds_per_trial": c, "naive_seconds_per_trial": n,
        "naive_over_cached": (n / c) if c and n else None,
        "worker_load_seconds": _mean(loads), "workers_that_loaded": len({r["pid"] for r in now if "load_seconds" in r}),
        "trials_per_hour": 3600.0 * ran / wall if wall > 0 and ran else None,
        "naive_values_match_cached": all(agree) if agree else None,
        "naive_errors": [r.get("error") for r in naive if r.get("state") != "complete"],
    }


def write_best(cfg: SearchConfig, out: Path, ctx: dict, best: dict, labels: list[str] | None) -> dict:
    """Merge the best trial in memory, write it through the atomic output, and its plain recipe."""
    from mergelab.io import atomic_output_dir, load_state_dict, replace_dir
    from mergelab.search.worker import _merge, plain_recipe, write_inputs, write_model_folder

    spec = to_merge(cfg, best["params"], labels or [])

    class _St:  # the worker's state without evaluators
        pass
    st = _St()
    st.base_path = cfg.recipe.get("base_model")
    st.base = load_state_dict(st.base_path) if st.base_path else None
    st.models = [load_state_dict(m["model"]) for m in cfg.recipe["models"]]
    st.deltas = None
    if ctx["layer_of"] is not None:
        st.deltas = [{k: m[k].float() - st.base[k].float() for k in ctx["layer_of"] if st.base[k].is_floating_point()}
                     for m in st.models]
    paths = [m["model"] for m in cfg.recipe["models"]]
    if spec["layers"] is not None:
        tmp = Path(tempfile.mkdtemp(prefix=".best_inputs.tmp-", dir=out))
        write_inputs(ctx, st.base, st.models, st.deltas, spec, tmp)
        replace_dir(tmp, out / "best_inputs")
        paths = [str(out / "best_inputs" / f"model{i}") for i in range(cfg.n_models)]
    recipe = plain_recipe(ctx, spec, paths)
    sd = _merge(ctx, st, spec)
    with atomic_output_dir(out / "best_model", force=True) as tmp:
        write_model_folder(sd, tmp, st.base_path)
        (tmp / "mergelab_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (out / "best_recipe.yaml").write_text(
        "# the best trial of `mergelab search` as a plain recipe: `mergelab merge` rebuilds best_model from it\n"
        + yaml.safe_dump(recipe, sort_keys=False))
    return {"recipe": recipe, "state_dict": sd, "spec": spec}


def write_tables(out: Path, records: list[dict], outputs: list[tuple[str, str]]) -> None:
    cols = ["number", "state"] + [n for n, _ in outputs]
    pcols: list[str] = []
    for r in records:
        for k in r["params"]:
            if k not in pcols:
                pcols.append(k)
    cols += pcols + ["seconds", "trial_seconds", "cache_hit", "pid", "error"]
    rows = []
    for r in records:
        row = {"number": r["number"], "state": r.get("state"), "seconds": r.get("seconds"),
               "trial_seconds": r.get("trial_seconds"), "cache_hit": r.get("cache_hit"), "pid": r.get("pid"),
               "error": r.get("error", "")}
        for (n, _), v in zip(outputs, r.get("values") or []):
            row[n] = v
        row.update(r["params"])
        rows.append(row)
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "trials.json").write_text(json.dumps(rows, indent=1, default=float))


def plots(out: Path, records: list[dict], best: dict, outputs: list[tuple[str, str]], labels: list[str] | None,
          spec: dict) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    fig, axes = plt.subplots(len(outputs), 1, figsize=(7, 2.6 * len(outputs)), squeeze=False)
    for i, (name, d) in enumerate(outputs):
        ax = axes[i][0]
        xs = [r["number"] for r in records if r.get("state") == "complete" and r.get("values")]
        ys = [r["values"][i] for r in records if r.get("state") == "complete" and r.get("values")]
        ax.scatter(xs, ys, s=14, label="trial")
        run, so_far = [], None
        for y in ys:
            so_far = y if so_far is None else (max(so_far, y) if d == "maximize" else min(so_far, y))
            run.append(so_far)
        ax.step(xs, run, where="post", color="C1", label="best so far")
        ax.scatter([best["number"]], [best["values"][i]], color="C3", zorder=3, label="chosen")
        ax.set_ylabel(f"{name} ({'max' if d == 'maximize' else 'min'})")
        ax.legend(fontsize=7)
    axes[-1][0].set_xlabel("trial")
    fig.tight_layout()
    fig.savefig(folder / "objective_vs_trial.png", dpi=110)
    plt.close(fig)
    written.append("plots/objective_vs_trial.png")
    if spec.get("layers") and labels:
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(labels) + 2), 3))
        n = len(spec["layers"])
        shared = all(c == spec["layers"][0] for c in spec["layers"])
        rows = [spec["layers"][0]] if shared else spec["layers"]
        width = 0.8 / len(rows)
        for j, coeffs in enumerate(rows):
            ax.bar([k + j * width for k in range(len(labels))], [coeffs[l] for l in labels], width,
                   label="all models" if shared else f"model {j}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(labels))], labels, rotation=45, fontsize=7)
        ax.set_ylabel("task-vector coefficient")
        ax.set_title(f"per-layer coefficients of the best trial ({best['number']})" + ("" if n == 1 else ""))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "layer_coefficients.png", dpi=110)
        plt.close(fig)
        written.append("plots/layer_coefficients.png")
    return written


def finish(cfg: SearchConfig, out: Path, ctx: dict, records: list[dict], best: dict, front: list[dict],
           outputs: list[tuple[str, str]], labels: list[str] | None, naive: list[dict], run: dict) -> dict:
    best_out = write_best(cfg, out, ctx, best, labels)
    write_tables(out, records, outputs)
    summary: dict[str, Any] = {
        "best": {"number": best["number"], "values": dict(zip([n for n, _ in outputs], best["values"])),
                 "params": best["params"], "merge": best_out["spec"]},
        "objectives": [{"name": n, "direction": d} for n, d in outputs],
        "algorithm": cfg.algorithm, "seed": cfg.seed, "batch": cfg.batch,
        "trials_complete": sum(1 for r in records if r.get("state") == "complete"),
        "trials_failed": sum(1 for r in records if r.get("state") != "complete"),
        **run,
        "timing": timing(records, naive, run["wall_seconds"], run["trials_run_now"]),
    }
    if len(outputs) > 1:
        summary["pareto_front"] = [{"number": r["number"], "values": r["values"], "params": r["params"]} for r in front]
        (out / "pareto.json").write_text(json.dumps(summary["pareto_front"], indent=1))
    if cfg.final_split:
        summary["final"] = final_evaluation(cfg, best_out["state_dict"])
    summary["plots"] = plots(out, records, best, outputs, labels, best_out["spec"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


def final_evaluation(cfg: SearchConfig, sd: dict) -> dict:
    """The chosen model scored once on the test split (task objectives only)."""
    from mergelab.search.bench_adapter import TasksEvaluator
    from mergelab.search.objectives import _load_into
    result = {}
    for o in cfg.objectives:
        if o["type"] != "tasks":
            continue
        ev = TasksEvaluator(o, cfg.recipe.get("base_model"), [m["model"] for m in cfg.recipe["models"]])
        _load_into(ev.encoder, sd, "tasks objective")
        accs = ev.accuracies(ev.encoder, cfg.final_split)
        result[o.get("name", "tasks")] = {t: {"accuracy": r.accuracy, "se": r.se, "n": r.n,
                                              "correct": [bool(c) for c in r.correct]} for t, r in accs.items()}
    return result
