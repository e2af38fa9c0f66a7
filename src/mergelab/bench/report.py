"""Benchmark reports: Markdown and CSV tables, a JSON with everything, PNG plots, and the check of
the literature's order (individual > TIES >= task arithmetic > average) in paired standard errors."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from mergelab.bench.evaluate import EvalResult, paired_diff

LITERATURE_ORDER = ["individual", "ties", "task_arithmetic", "average"]


def _fmt_params(params: dict | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v}" for k, v in params.items())


def table_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per model: accuracies in percent, averages with their SE, chosen parameters."""
    rows = []
    for name, row in result["rows"].items():
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


def markdown_table(result: dict) -> str:
    """The main table (accuracy %, test split) in Markdown."""
    tasks = result["tasks"]
    head = ["model"] + tasks + ["avg ± SE", "normalized", "params (M)", "chosen on val"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows(result):
        cells = [r["model"]] + [f"{r[t]:.1f}" for t in tasks]
        cells += [f"{r['average']:.2f} ± {r['average_se']:.2f}", f"{r['normalized']:.1f}",
                  f"{r['params'] / 1e6:.1f}" if r["params"] else "", r["chosen"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(result: dict) -> str:
    buf = io.StringIO()
    rows = table_rows(result)
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _results(result: dict, name: str) -> list[EvalResult]:
    c = result["correct"][name]
    return [EvalResult(sum(c[t]) / len(c[t]), len(c[t]), c[t]) for t in result["tasks"]]


def order_check(result: dict, order: Sequence[str] = LITERATURE_ORDER) -> list[dict[str, Any]]:
    """For each neighbour pair (a, b) of ``order`` present in the result: a - b in average test
    accuracy, its paired SE (same test examples) and the number of SEs."""
    names = [n for n in order if n in result.get("correct", {})]
    out = []
    for a, b in zip(names, names[1:]):
        d, se = paired_diff(_results(result, a), _results(result, b))
        out.append({"a": a, "b": b, "diff": d, "se": se,
                    "n_se": d / se if se > 0 else (math.inf if d > 0 else 0.0), "holds": d >= 0})
    return out


def order_text(checks: list[dict[str, Any]]) -> str:
    if not checks:
        return "order check: not enough rows"
    parts = []
    for c in checks:
        rel = ">" if c["diff"] > 0 else ("=" if c["diff"] == 0 else "<")
        parts.append(f"{c['a']} {rel} {c['b']}: {100 * c['diff']:+.2f} pt "
                     f"(paired SE {100 * c['se']:.2f}, {c['n_se']:+.1f} SE)")
    verdict = "holds" if all(c["holds"] for c in checks) else "does NOT hold"
    chain = " > ".join(c["a"] for c in checks) + " > " + checks[-1]["b"]
    return f"literature order {chain}: {verdict}\n" + "\n".join("- " + p for p in parts)


def timings_table(result: dict) -> str:
    cpu = result.get("cpu_timings", {})
    lines = ["| stage | wall s | CPU s (this process) |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {cpu.get(k, float('nan')):.1f} |" for k, v in result["timings"].items()]
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


def sizes_table(result: dict) -> str:
    lines = ["| task | classes | train | val | test | description |", "|---|---|---|---|---|---|"]
    for t, info in result["task_info"].items():
        s = info["sizes"]
        lines.append(f"| {t} | {len(info['classes'])} | {s['train']} | {s['val']} | {s['test']} | "
                     f"{info['description']} |")
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    p = result["protocol"]
    return "\n\n".join([
        f"# mergelab bench: suite {result['suite']}",
        f"{result.get('description', '')}. Base: {result['base']}. Threads: {result['threads']}. "
        f"Protocol: linear-probe heads on the frozen base, encoder fine-tuned {p['steps']} steps "
        f"(batch {p['batch_size']}, AdamW lr {p['lr']}, max length {p['max_len']}) with the head "
        "frozen; merges act on the encoder; hyper-parameters chosen on validation; test once.",
        "## Test accuracy (%)", markdown_table(result),
        "SE: binomial SE of the average over tasks. Normalized: mean over tasks of "
        "merged / individual accuracy.",
        "## Order check (paired differences on the same test examples)", order_text(order_check(result)),
        "## Splits", sizes_table(result),
        "## Validation search", search_table(result),
        "## Timings", timings_table(result),
    ]) + "\n"


# ----------------------------------------------------------------------------- plots
def _plots(result: dict, folder: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows = result["tasks"], result["rows"]
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
    for n, row in rows.items():
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
        ax.set_title(f"{result['suite']}: lambda sweeps (validation)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "lambda_sweep.png", dpi=120)
        written.append("lambda_sweep.png")
    plt.close(fig)
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
