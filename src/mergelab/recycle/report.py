"""The report of a recycle run: a Markdown table, the per-run list and a plot (ID vs OOD accuracy)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(results: Mapping) -> str:
    t = results["target"]
    lines = [
        "# Model Ratatouille",
        "",
        f"Target: {t.get('description') or 'target task'}; classes: {', '.join(t['classes'])}; "
        f"train {t['train']}, val {t['val']}, ID test {t['test_id']}, OOD test {t['test_ood']}.",
        f"Auxiliary: {', '.join(results['auxiliary'])}; Ratatouille pool (cycled): {', '.join(results['pool'])}.",
        f"Executor {results['executor']} ({results['cpus']} CPUs); {results['seconds']:.0f} s in this invocation, "
        f"{results['trained_now']} run(s) trained now.",
        "",
        "| method | selection | runs averaged | val acc | ID test acc (± SE) | OOD test acc (± SE) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results["methods"]:
        n = len(r["members"]) if r["members"] else "-"
        lines.append(f"| {r['method']} | {r['selection']} | {n} | {_pct(r['val'])} | "
                     f"{_pct(r['test_id'])} ± {_pct(r['test_id_se'])} | {_pct(r['test_ood'])} ± {_pct(r['test_ood_se'])} |")
    lines += ["", "Paired differences (same test examples; SE of the per-example difference):", "",
              "| A | B | split | A - B (points) | SE |", "|---|---|---|---:|---:|"]
    for c in results["comparisons"]:
        lines.append(f"| {c['a']} | {c['b']} | {c['split']} | {100 * c['diff']:+.2f} | {100 * c['se']:.2f} |")
    lines += ["", "Runs:", "", "| run | init | lr | wd | dropout | val acc | best step | seconds |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        hp = r["hp"]
        lines.append(f"| {r['id']} | {r['init']} | {hp.get('lr', '-'):.0e} | {hp.get('weight_decay', 0):.0e} | "
                     f"{hp.get('dropout', 0)} | {_pct(r['val_acc'])} | {r['best_step']} | {r['seconds']}"
                     f"{' (resumed)' if r['resumed'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(results: Mapping, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["methods"]
    labels = [f"{r['method']}\n[{r['selection']}]" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.5))
    y = range(len(rows))
    h = 0.38
    ax.barh([i - h / 2 for i in y], [100 * r["test_id"] for r in rows], h, xerr=[100 * r["test_id_se"] for r in rows],
            label="ID test", color="#4c72b0")
    ax.barh([i + h / 2 for i in y], [100 * r["test_ood"] for r in rows], h,
            xerr=[100 * r["test_ood_se"] for r in rows], label="OOD test", color="#dd8452")
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    lo = min(min(r["test_id"], r["test_ood"]) for r in rows)
    ax.set_xlim(max(0, 100 * lo - 10), 100)
    ax.set_xlabel("accuracy (%), bars: ± 1 binomial SE")
    ax.set_title("Model Ratatouille vs baselines")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Mapping, folder: Path) -> None:
    (folder / "report.md").write_text(markdown(results))
    plot(results, folder / "plot.png")
