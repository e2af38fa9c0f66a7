"""Markdown table of scripts/leaderboard_rows.py's result.json (rows, 95% CIs, paired differences to TIES, cost).

    python scripts/leaderboard_report.py runs/leaderboard/result.json docs/results/leaderboard-text6.md
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

DATA = {"ties": "none (density, lambda on val)", "regmean": "unlabelled train, 256/task",
        "regmean++": "unlabelled train, 256/task", "fisher_batch@256": "unlabelled train, 256/task (+ heads)",
        "fisher_per_example@32": "unlabelled train, 32/task (+ heads)", "wudi@40x1e-4": "none",
        "wudi": "none", "emr": "none; task id at test", "ties+lines": "none (beta on val)",
        "wemoe@test": "unlabelled test, all 600/task (+ heads)", "individual": "task id at test", "wemoe@test_lr1e-4": "unlabelled test, all 600/task (+ heads)",
        "tsv@0.9": "none (alpha on val)", "iso_cts@1.3": "none (alpha on val)", "smile_k32_g16": "none"}
PUBLISHED = {"wemoe@test": "89.2 (1st)", "wemoe@test_lr1e-4": "89.2 (1st)", "wudi@40x1e-4": "84.5 (2nd)", "wudi": "84.5 (2nd)",
             "regmean++": "84.4 (3rd)", "regmean": "82.4 (4th)", "ties": "72.2 (5th)",
             "fisher_batch@256": "70.6 (6th)", "fisher_per_example@32": "70.6 (6th)",
             "emr": "88.7 (authors', task id)", "ties+lines": "not in the table", "individual": "90.3",
             "tsv@0.9": "83.1", "iso_cts@1.3": "Iso-C 82.8", "smile_k32_g16": "not in the table"}


NOTES = """Settings. TIES (density 0.1, lambda 0.3, global trim), TSV-M (alpha 0.9), Iso-CTS (alpha 1.3): chosen on
validation in the six-task run (docs/results/text6-2026-11-22.md), not re-tuned for these three tasks. New rows:
papers' / FusionBench's defaults (RegMean(++) alpha 0.95, 256 train examples a task; Fisher eps 1e-6, normalised;
WEMoE init_lambda 0.3, 2-layer routers, batch_reduce, batches of 16), except where the 2-core CPU forced a
shorter schedule: WUDI 40 Adam steps at lr 1e-4 (paper 400 at 1e-5; the same largest movement per entry),
embedding tables averaged (a lookup, outside WUDI's Linear-layer derivation); WEMoE 50 steps (paper 1000) at
lr 2e-3 (`wemoe@test`, steps x lr kept: entropy collapses) or at the paper's 1e-4 (`wemoe@test_lr1e-4`);
Fisher per-example on 32 examples a task. LiNeS: TIES at lambda 1 with alpha auto, beta in {0.2, 0.5, 1.0}
on val. EMR and individual need the task id at test. SMILE k 32, gate_k 16 (data-free router)."""


def _paired(a, b):
    diffs, var = [], 0.0
    for ra, rb in zip(a, b):
        d = [float(x) - float(y) for x, y in zip(ra, rb)]
        mu = sum(d) / len(d)
        var += sum((x - mu) ** 2 for x in d) / max(1, len(d) - 1) / len(d)
        diffs.append(mu)
    return sum(diffs) / len(diffs), math.sqrt(var) / len(diffs)


def main(src: str, dst: str) -> int:
    r = json.loads(Path(src).read_text())
    tasks = r["tasks"]
    rows = r["rows"]
    ties = [rows["ties"]["correct"][t] for t in tasks] if "ties" in rows else None
    ind = rows.get("individual")
    lines = [f"# Leaderboard methods on the {r['suite']} suite (all-MiniLM-L6-v2, {len(tasks)} tasks)", "",
             "Command: `PYTHONPATH=src HF_HUB_OFFLINE=1 python scripts/leaderboard_rows.py --out runs/leaderboard"
             + (f" --tasks {','.join(tasks)}" if len(tasks) < 6 else "") + "` "
             f"(threads {r['threads']}, on a shared 2-core CPU), then `python scripts/leaderboard_report.py "
             "runs/leaderboard/result.json docs/results/leaderboard-text6.md`.", "",
             "Test accuracy (%), 95% CI = ±1.96 binomial SE of the average over tasks; 'vs TIES' is the paired "
             "difference on the same test examples (± 1.96 paired SE). Seconds and peak RSS are the build's "
             "(process peak during the build; the pool of fine-tunes is already in memory, see 'RSS before').", "",
             "| row | " + " | ".join(tasks) + " | avg ± 95% CI | normalized | vs TIES | data used | build s | "
             "RSS before / peak MB | published (FusionBench B/32 rank) |",
             "|---" * (len(tasks) + 8) + "|"]
    for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["average"]):
        per = " | ".join(f"{100 * row['per_task'][t]:.1f}" for t in tasks)
        norm = (sum(row["per_task"][t] / ind["per_task"][t] for t in tasks) / len(tasks)) if ind else None
        vs = ""
        if ties is not None and name != "ties":
            d, se = _paired([row["correct"][t] for t in tasks], ties)
            vs = f"{100 * d:+.2f} ± {196 * se:.2f}"
        cost = row.get("cost") or {}
        mem = (f"{cost.get('rss_before_mb', 0):.0f} / {cost['peak_rss_mb']:.0f}" if cost.get("peak_rss_mb") else "")
        extra = ""
        if cost.get("parameter_counts"):
            pc = cost["parameter_counts"]
            extra = f" (router {pc['router'] / 1e6:.2f} M, total {pc['total'] / 1e6:.1f} M elements)"
        if cost.get("extra_bytes_per_task"):
            extra = f" (+{cost['extra_bytes_per_task'] / 2**20:.2f} MiB per task)"
        lines.append(f"| {name}{extra} | {per} | {100 * row['average']:.2f} ± {196 * row['average_se']:.2f} | "
                     f"{'' if norm is None else f'{100 * norm:.1f}'} | {vs} | {DATA.get(name, '')} | "
                     f"{row['build_seconds']:.0f} | {mem} | {PUBLISHED.get(name, '')} |")
    pairs = [("regmean++", "regmean"), ("emr", "individual"), ("wemoe@test_lr1e-4", "wemoe@test"),
             ("ties+lines", "ties"), ("regmean", "fisher_batch@256")]
    done = [(a, b) for a, b in pairs if a in rows and b in rows]
    if done:
        lines += ["", "Other paired differences (± 1.96 paired SE):"]
        for a, b in done:
            d, se = _paired([rows[a]["correct"][t] for t in tasks], [rows[b]["correct"][t] for t in tasks])
            lines.append(f"- {a} - {b}: {100 * d:+.2f} ± {196 * se:.2f} pt")
    search = {k: v["lines_val_search"] for k, v in rows.items() if v.get("lines_val_search")}
    if search:
        lines += ["", "LiNeS beta on the val split (TIES density 0.1, lambda 1, alpha auto): " + ", ".join(
            f"beta {b}: {100 * acc:.2f}" for b, acc in next(iter(search.values())).items())]
    lines += ["", NOTES]
    Path(dst).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
