"""Benchmark reports: Markdown and CSV tables (mean over fine-tuning seeds and per seed), a JSON
with everything, PNG plots, paired bootstrap intervals of method differences, and the check of the
literature's order (individual > SVD family / SMILE > TIES > task arithmetic > average > zero-shot)
in paired standard errors."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from mergelab.bench.evaluate import EvalResult, bootstrap_replicates, paired_diff

LITERATURE_ORDER = ["individual", "ties", "task_arithmetic", "average"]
# the order the merging papers report (CLIP ViT-B/32, 8 tasks), one level per step; a level lists
# every row that belongs to it (SVD family and SMILE share a level)
LITERATURE_LEVELS = [["individual"], ["tsv", "iso_c", "iso_cts", "smile*"], ["ties"], ["task_arithmetic"],
                     ["average"], ["zero_shot", "base"]]
N_BOOT = 1000


# a builder row's bookkeeping parameters (its own label, where plots go): not part of the method's setting
BOOKKEEPING = {"label", "track_val", "plot_dir"}


def _fmt_params(params: dict | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v}" for k, v in params.items() if k not in BOOKKEEPING and v is not None)


def table_rows(result: dict, rows_of: dict | None = None) -> list[dict[str, Any]]:
    """One flat row per model: accuracies in percent, averages with their SE, chosen parameters."""
    rows = []
    for name, row in (rows_of if rows_of is not None else result["rows"]).items():
        if row.get("kind") == "failed":
            continue
        flat = {"model": name}
        for t in result["tasks"]:
            flat[t] = round(100 * row["per_task"][t], 2)
        flat["average"] = round(100 * row["average"], 2)
        flat["average_se"] = round(100 * row["average_se"], 2)
        flat["normalized"] = round(100 * row.get("normalized", float("nan")), 2)
        flat["params"] = row.get("params")
        flat["chosen"] = _fmt_params(row.get("chosen"))
        rows.append(flat)
    return rows


def markdown_table(result: dict, rows_of: dict | None = None) -> str:
    """The main table (accuracy %, test split) in Markdown; failed rows last, with their error."""
    tasks = result["tasks"]
    rows_of = rows_of if rows_of is not None else result["rows"]
    head = ["model"] + tasks + ["avg ± SE", "normalized", "params (M)", "setting"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows(result, rows_of):
        src = rows_of[r["model"]]
        setting = r["chosen"]
        if src.get("how") == "validation-tuned":
            setting = f"val: {setting}"
        if len(src.get("chosen_per_seed") or []) > 1 and src.get("how") == "validation-tuned":
            setting = "val per seed: " + " / ".join(_fmt_params(c) for c in src["chosen_per_seed"])
        cells = [r["model"]] + [f"{r[t]:.1f}" for t in tasks]
        cells += [f"{r['average']:.2f} ± {r['average_se']:.2f}", f"{r['normalized']:.1f}",
                  f"{r['params'] / 1e6:.1f}" if r["params"] else "", setting]
        lines.append("| " + " | ".join(cells) + " |")
    for name, row in rows_of.items():
        if row.get("kind") == "failed":
            lines.append("| " + " | ".join([name] + ["-"] * len(tasks) + ["failed", "", "",
                                                                         row.get("error", "").replace("|", "/")])
                         + " |")
    return "\n".join(lines)


def csv_table(result: dict) -> str:
    buf = io.StringIO()
    rows = table_rows(result)
    if not rows:
        return ""
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _results(result: dict, name: str) -> list[EvalResult]:
    c = result["correct"][name]
    return [EvalResult(sum(c[t]) / len(c[t]), len(c[t]), c[t]) for t in result["tasks"]]


def seed_mean_outcomes(result: dict) -> dict[str, list[list[float]]]:
    """Per row, per task: each test example's outcome averaged over the fine-tuning seeds (rows that
    succeeded in every seed)."""
    runs = result.get("runs") or {"0": {"correct": result.get("correct", {})}}
    seeds = list(runs)
    names = [n for n in runs[seeds[0]]["correct"] if all(n in runs[s]["correct"] for s in seeds)]
    out = {}
    for n in names:
        out[n] = [[sum(float(runs[s]["correct"][n][t][i]) for s in seeds) / len(seeds)
                   for i in range(len(runs[seeds[0]]["correct"][n][t]))] for t in result["tasks"]]
    return out


def _paired_se(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    diffs, var = [], 0.0
    for x, y in zip(a, b):
        d = [p - q for p, q in zip(x, y)]
        mu = sum(d) / len(d)
        diffs.append(mu)
        var += sum((v - mu) ** 2 for v in d) / max(1, len(d) - 1) / len(d)
    return sum(diffs) / len(diffs), math.sqrt(var) / len(diffs)


def _level_rows(level: Sequence[str], names: Sequence[str]) -> list[str]:
    """Rows of one level of the order: exact names, or ``prefix*`` (tuned rows only, no ``@``)."""
    out = []
    for pat in level:
        if pat.endswith("*"):
            out += [n for n in names if n.startswith(pat[:-1]) and "@" not in n]
        elif pat in names:
            out.append(pat)
    return out


def order_check(result: dict, order: Sequence[Sequence[str]] | Sequence[str] = LITERATURE_LEVELS,
                n_boot: int = N_BOOT) -> list[dict[str, Any]]:
    """For each neighbour pair of levels of ``order`` (every row of one level against every row of
    the next present level): a - b in average test accuracy (seed mean), its paired SE (same test
    examples), the number of SEs, a paired-bootstrap 95 % interval, and per seed the difference."""
    outcomes = seed_mean_outcomes(result)
    levels = [[x] if isinstance(x, str) else list(x) for x in order]
    present = [lv for lv in (_level_rows(lv, list(outcomes)) for lv in levels) if lv]
    pairs = [(a, b) for up, low in zip(present, present[1:]) for a in up for b in low]
    if not pairs:
        return []
    used = sorted({x for pair in pairs for x in pair})
    rep = bootstrap_replicates([outcomes[n] for n in used], n_boot)
    idx = {n: i for i, n in enumerate(used)}
    runs = result.get("runs") or {}
    out = []
    for a, b in pairs:
        d, se = _paired_se(outcomes[a], outcomes[b])
        bd = rep[idx[a]] - rep[idx[b]]
        import torch
        lo, hi = torch.quantile(bd, torch.tensor([0.025, 0.975], dtype=bd.dtype)).tolist()
        per_seed = {}
        for s, run in runs.items():
            if a in run["correct"] and b in run["correct"]:
                per_seed[s] = paired_diff(_results({"correct": run["correct"], "tasks": result["tasks"]}, a),
                                          _results({"correct": run["correct"], "tasks": result["tasks"]}, b))
        n_se = d / se if se > 0 else (math.inf if d > 0 else 0.0)
        out.append({"a": a, "b": b, "diff": d, "se": se, "n_se": n_se, "ci_low": lo, "ci_high": hi,
                    "holds": d >= 0, "beyond_2se": n_se > 2, "per_seed": per_seed})
    return out


def order_text(checks: list[dict[str, Any]]) -> str:
    if not checks:
        return "order check: not enough rows"
    lines = ["| step | diff (pt) | paired SE | SEs | bootstrap 95 % CI | per seed (pt, SEs) | > 2 SE? |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        ps = "; ".join(f"s{s}: {100 * d:+.2f} ({d / se if se else 0:+.1f})" for s, (d, se) in c["per_seed"].items())
        lines.append(f"| {c['a']} > {c['b']} | {100 * c['diff']:+.2f} | {100 * c['se']:.2f} | {c['n_se']:+.1f} | "
                     f"[{100 * c.get('ci_low', float('nan')):+.2f}, {100 * c.get('ci_high', float('nan')):+.2f}] | "
                     f"{ps} | {'yes' if c['n_se'] > 2 else ('no (wrong sign)' if c['diff'] < 0 else 'no')} |")
    held = sum(c["n_se"] > 2 for c in checks)
    return (f"literature order, {held} of {len(checks)} steps hold by more than 2 paired SE "
            "(seed-mean outcomes; CI = paired bootstrap over test examples):\n" + "\n".join(lines))


def bootstrap_table(result: dict, reference: str | None = None, n_boot: int = N_BOOT) -> str:
    """Every row minus a reference row (task arithmetic, tuned, when present), seed-mean outcomes:
    difference, paired SE and paired-bootstrap 95 % interval on the same test examples."""
    outcomes = seed_mean_outcomes(result)
    if reference is None:
        reference = next((r for r in ("task_arithmetic", "average", "zero_shot", "base") if r in outcomes), None)
    if reference is None or len(outcomes) < 2:
        return ""
    names = list(outcomes)
    rep = bootstrap_replicates([outcomes[n] for n in names], n_boot)
    import torch
    r = names.index(reference)
    lines = [f"| row | minus {reference} (pt) | paired SE | 95 % CI |", "|---|---|---|---|"]
    for i, n in enumerate(names):
        if n == reference:
            continue
        d, se = _paired_se(outcomes[n], outcomes[reference])
        lo, hi = torch.quantile(rep[i] - rep[r], torch.tensor([0.025, 0.975], dtype=rep.dtype)).tolist()
        lines.append(f"| {n} | {100 * d:+.2f} | {100 * se:.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] |")
    return "\n".join(lines)


def timings_table(result: dict) -> str:
    cpu = result.get("cpu_timings", {})
    lines = ["| stage | wall s | CPU s (this process) |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {cpu.get(k, float('nan')):.1f} |" for k, v in result["timings"].items()]
    ec = result.get("eval_cache")
    if ec:
        lines += ["", f"Evaluation cache: {ec['hits']} of {ec['hits'] + ec['misses']} embedding passes of torch / "
                      f"transformers encoders taken from earlier runs (same weights, inputs and heads); "
                      f"{ec.get('not_cacheable', 0)} passes of mergelab modules (SMILE, WEMoE, ...) always measured. "
                      f"`--no-eval-cache` measures everything."]
    return "\n".join(lines)


def search_table(result: dict) -> str:
    """Validation grids: every setting tried and its average validation accuracy."""
    lines = ["| method | setting | val avg |", "|---|---|---|"]
    for name, row in result["rows"].items():
        for s in row.get("search", []):
            mark = " **(chosen)**" if s["params"] == row.get("chosen") else ""
            v = s["val_average"]
            lines.append(f"| {name} | {_fmt_params(s['params'])}{mark} | "
                         f"{'n/a' if v != v else f'{100 * v:.2f}'} |")
    return "\n".join(lines)


def built_info_table(result: dict) -> str:
    """What the builder rows learned, per seed: coefficient range, the mask's kept share,
    unlabelled entropy before -> after, steps and seconds per step (``row["info"]``)."""
    lines = ["| row | seed | coefficients min / mean / max | mask kept (logit > 0) | mean keep prob. | "
             "entropy first -> last | steps | s/step |", "|---|---|---|---|---|---|---|---|"]
    n = 0
    for seed, run in (result.get("runs") or {}).items():
        for name, row in run["rows"].items():
            info = row.get("info")
            if not info:
                continue
            n += 1

            def f(key, fmt="{:.3f}", pct=False):
                v = info.get(key)
                return "-" if v is None else (f"{100 * v:.1f} %" if pct else fmt.format(v))
            lines.append(f"| {name} | {seed} | {f('coefficients_min')} / {f('coefficients_mean')} / "
                         f"{f('coefficients_max')} | {f('mask_kept_fraction', pct=True)} | "
                         f"{f('mask_mean_keep_probability')} | {f('entropy_first')} -> {f('entropy_last')} | "
                         f"{info.get('steps_run', '-')} | {f('seconds_per_step', '{:.2f}')} |")
    return "\n".join(lines) if n else "none"


def sizes_table(result: dict) -> str:
    lines = ["| task | classes | train | val | test | description |", "|---|---|---|---|---|---|"]
    for t, info in result["task_info"].items():
        s = info["sizes"]
        lines.append(f"| {t} | {len(info['classes'])} | {s['train']} | {s['val']} | {s['test']} | "
                     f"{info['description']} |")
    return "\n".join(lines)


def _protocol_text(result: dict) -> str:
    p = result["protocol"]
    if p.get("head", "probe") == "zero_shot":
        head = (f"frozen zero-shot heads (class-name prompts embedded by the base, normalised, logits = "
                f"{p['head_scale']:g} x cosine; no label used)")
    else:
        head = "frozen linear-probe heads fitted on the base's train embeddings"
    return (f"Protocol: {head}; encoder fine-tuned {p['steps']} steps through the head (batch "
            f"{p['batch_size']}, AdamW lr {p['lr']:g}, weight decay {p['weight_decay']:g}, "
            f"{int(100 * p['warmup'])} % warm-up then {p.get('schedule', 'linear')} decay, max length "
            f"{p['max_len']}{', token embeddings frozen' if p.get('freeze_embeddings') else ''}); fine-tuning seeds "
            f"{', '.join(map(str, result.get('seeds', [p.get('seed', 0)])))}; merges act on the encoder; NAME@paper = "
            "the paper's data-free default, NAME = tuned on validation; test once per final model.")


def failed_text(result: dict) -> str:
    bad = [(s, n, r.get("error", "")) for s, run in (result.get("runs") or {}).items()
           for n, r in run["rows"].items() if r.get("kind") == "failed"]
    if not bad:
        return "none"
    return "\n".join(f"- {n} (seed {s}): {e}" for s, n, e in bad)


def markdown_report(result: dict) -> str:
    seeds = list((result.get("runs") or {}))
    parts = [
        f"# mergelab bench: suite {result['suite']}",
        f"{result.get('description', '')}. Base: {result['base']}. Threads: {result['threads']}. "
        + _protocol_text(result) + ("" if result.get("complete", True) else
                                    " **Partial result: the run did not finish.**"),
        f"## Test accuracy (%){', mean over fine-tuning seeds ' + ', '.join(seeds) if len(seeds) > 1 else ''}",
        markdown_table(result),
        "SE: binomial SE of the average over tasks (test sampling; the mean over seeds does not shrink "
        "it, the test examples are the same). Normalized: mean over tasks of row / individual accuracy.",
    ]
    if len(seeds) > 1:
        for sd in seeds:
            parts += [f"### Seed {sd}", markdown_table(result, result["runs"][sd]["rows"])]
    parts += [
        "## Order check (paired differences on the same test examples)", order_text(order_check(result)),
        "## Differences to a common reference (paired bootstrap, 1000 replicates)", bootstrap_table(result),
        "## Failed rows", failed_text(result),
        "## What the adaptive rows learned", built_info_table(result),
        "## Splits", sizes_table(result),
        "## Validation search", search_table(result),
        "## Timings", timings_table(result),
    ]
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- plots
def _plots(result: dict, folder: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    rows = {n: r for n, r in result["rows"].items() if r.get("kind") != "failed"}
    names = list(rows)
    written = []

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * w for j in range(len(tasks))]
        ax.bar(xs, [100 * rows[n]["per_task"][t] for t in tasks], w, label=n,
               yerr=[100 * rows[n]["per_task_se"][t] for t in tasks], capsize=2)
    lowest = min(100 * rows[n]["per_task"][t] for n in names for t in tasks)
    ax.set_ylim(max(0.0, lowest - 10), 100)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result['suite']}: accuracy per task")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / "per_task.png", dpi=120)
    plt.close(fig)
    written.append("per_task.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    vals = [100 * rows[n].get("normalized", float("nan")) for n in names]
    ax.bar(names, vals, color=["#999" if rows[n]["kind"] == "reference" else "#4a7" for n in names])
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_ylim(min(v for v in vals if v == v) - 5, 102)
    ax.set_title(f"{result['suite']}: merged / individual")
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(folder / "normalized.png", dpi=120)
    plt.close(fig)
    written.append("normalized.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    any_curve = False
    runs = result.get("runs") or {}
    first = next(iter(runs), None)   # the seed mean keeps no search: draw the first seed's sweeps
    sweep_rows = runs[first]["rows"] if first is not None and len(runs) > 1 else rows
    for n, row in sweep_rows.items():
        curves: dict[str, list[tuple[float, float]]] = {}
        for s in row.get("search", []):
            if "lambda" not in s["params"] or s["val_average"] != s["val_average"]:
                continue
            other = {k: v for k, v in s["params"].items() if k != "lambda" and k in row.get("grid", {})}
            curves.setdefault(f"{n} {_fmt_params(other)}".strip(), []).append(
                (s["params"]["lambda"], 100 * s["val_average"]))
        for label, pts in curves.items():
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
            any_curve = True
    if any_curve:
        ax.set_xlabel("lambda")
        ax.set_ylabel("validation accuracy (%, average over tasks)")
        ax.set_title(f"{result['suite']}: lambda sweeps (validation"
                     f"{f', seed {first}' if sweep_rows is not rows else ''})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "lambda_sweep.png", dpi=120)
        written.append("lambda_sweep.png")
    plt.close(fig)

    smile = [(rows[n]["params"], 100 * rows[n]["average"], n) for n in names if n.startswith("smile")]
    if smile:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([p / 1e6 for p, _, _ in smile], [a for _, a, _ in smile], color="#4a7", label="SMILE")
        for p_, a_, n in smile:
            ax.annotate(n, (p_ / 1e6, a_), fontsize=7)
        for ref, style in (("individual", "--"), ("ensemble", ":"), ("task_arithmetic", "-."), ("tsv", "-")):
            if ref in rows:
                ax.axhline(100 * rows[ref]["average"], linestyle=style, color="#999", label=ref)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("test accuracy (%, average over tasks)")
        ax.set_title(f"{result['suite']}: SMILE accuracy vs size")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "smile_params.png", dpi=120)
        plt.close(fig)
        written.append("smile_params.png")
    return written


def write_report(result: dict, out_dir: str | Path, plots: bool = True) -> Path:
    """Write results.md, results.csv, results.json and the PNG plots into ``out_dir``.

    Everything goes into a temporary folder beside it first, renamed at the end, so a run folder
    is complete or absent.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    result = dict(result)
    result["order_check"] = order_check(result)
    (tmp / "results.md").write_text(markdown_report(result), encoding="utf-8")
    (tmp / "results.csv").write_text(csv_table(result), encoding="utf-8")
    if plots:
        result["plots"] = _plots(result, tmp)
    (tmp / "results.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    from mergelab.io import finish_output
    finish_output(tmp, out, command="bench")    # marker, 0644 modes, replaces only once complete
    return out
