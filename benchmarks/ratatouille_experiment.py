#!/usr/bin/env python
"""Model Ratatouille against the model soup, ERM, inter-training and fusing over several data seeds (issue 15).

For every data seed s (``target.seed = seed = s``: the target's train / val / ID-test split and the
hyper-parameter draws change with s) it runs ``mergelab recycle`` on the harder 13-field
``gcide_to_wordnet`` target (every WordNet gloss of those fields as the OOD test split), recycling the
cached converged MiniLM fine-tunes of ``mergelab bench`` (fortune_topic, fortune_topic2, fortune_lang,
foldoc; both fine-tune seeds: 8 checkpoints, 4 tasks; none trained on GCIDE or WordNet texts), then writes
``<doc>.md`` and ``<doc>.json``: the rows per seed and their mean, paired differences per seed (SE on the
same test examples) and over seeds (t-interval over the seeds and a paired bootstrap pooling the seeds),
the wall time and the seconds per target run.

    python benchmarks/ratatouille_experiment.py OUT_ROOT [--seeds 0 1 2] [--runs 12] [--steps 150] ...

Runs are kept under OUT_ROOT/seed<s> (one ``mergelab recycle`` output each); run the same command again
to resume, or to re-write the note from finished seeds (they are not retrained).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

AUX_TASKS = ("fortune_topic", "fortune_topic2", "fortune_lang", "foldoc")
FIELDS = ["law", "military", "chemistry", "medicine", "music", "mathematics", "astronomy", "geology", "botany",
          "zoology", "anatomy", "architecture", "nautical"]
ROWS = ["LP (base + probe head) [-]", "ERM (single fine-tune) [best val]", "Model soup [uniform]",
        "Model soup [greedy]", "Inter-training [best val]", "Fusing [best val]", "Ratatouille [uniform]",
        "Ratatouille [greedy]"]
PAIRS = [("Ratatouille [uniform]", "Model soup [uniform]"), ("Ratatouille [greedy]", "Model soup [greedy]"),
         ("Ratatouille [greedy]", "Model soup [uniform]"),
         ("Ratatouille [uniform]", "ERM (single fine-tune) [best val]"),
         ("Ratatouille [greedy]", "ERM (single fine-tune) [best val]"),
         ("Ratatouille [uniform]", "Inter-training [best val]"), ("Ratatouille [greedy]", "Inter-training [best val]"),
         ("Ratatouille [uniform]", "Fusing [best val]"), ("Ratatouille [greedy]", "Fusing [best val]"),
         # is there room for the effect: does fine-tuning distort the features (ERM vs LP), do soups recover it
         ("ERM (single fine-tune) [best val]", "LP (base + probe head) [-]"),
         ("Model soup [uniform]", "ERM (single fine-tune) [best val]")]
SPLITS = ("test_id", "test_ood")


def find_checkpoints(cache: Path, tasks=AUX_TASKS) -> dict[str, str]:
    """``{<task>-s<finetune seed>: folder}`` for the cached ``mergelab bench`` fine-tunes of ``tasks``."""
    out = {}
    for meta in sorted(cache.glob("*/meta.json")):
        m = json.loads(meta.read_text())
        if m.get("task") in tasks and (meta.parent / "model.safetensors").is_file():
            name = f"{m['task']}-s{m.get('finetune_seed', 0)}"
            if name in out:
                raise SystemExit(f"{cache}: two cached fine-tunes named {name} ({out[name]}, {meta.parent})")
            out[name] = str(meta.parent)
    missing = [t for t in tasks if not any(n.startswith(t + "-s") for n in out)]
    if missing:
        raise SystemExit(f"{cache}: no cached fine-tune of {', '.join(missing)} (run `mergelab bench` first)")
    return dict(sorted(out.items()))


def recipe_for(seed: int, a: argparse.Namespace, checkpoints: dict[str, str]) -> dict:
    return {
        "base_model": "minilm",
        "target": {"task": "gcide_to_wordnet", "classes": a.classes, "n_train": a.n_train, "n_val": a.n_val,
                   "n_test": a.n_test, "ood_per_class": 100000, "seed": seed},
        "auxiliary": {"checkpoints": checkpoints},
        "runs": a.runs, "fusing_runs": a.fusing_runs, "fusing_range": 4.0, "fusing_base": True,
        "hparams": {"lr": a.lr, "weight_decay": [1e-4, 1e-6], "dropout": [0.0, 0.1], "steps": a.steps,
                    "batch_size": a.batch_size, "eval_every": a.eval_every, "lp_lr": 1e-3},
        "lp_steps": a.lp_steps, "probe_iters": 300, "max_length": 64, "train_head": True, "soup": "greedy",
        "executor": a.executor, "num_cpus": a.num_cpus, "cpus_per_run": 1, "seed": seed,
    }


def run_seed(seed: int, a: argparse.Namespace, checkpoints: dict[str, str]) -> dict:
    from mergelab.recycle import load_config, run_recycle
    out = a.out_root / f"seed{seed}"
    recipe = recipe_for(seed, a, checkpoints)
    stamp = a.out_root / f"seed{seed}.recipe.json"
    if (out / "results.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        print(f"seed {seed}: finished earlier, reusing {out}", flush=True)
        return json.loads((out / "results.json").read_text())
    a.out_root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(recipe, indent=1))
    t0 = time.perf_counter()

    def progress(event, **info):
        if event == "stage":
            print(f"[seed {seed} {time.perf_counter() - t0:7.0f}s] stage {info['name']}"
                  + (f" ({info['total']} jobs)" if "total" in info else ""), flush=True)
        elif event == "run" and not info["record"].get("resumed"):
            r = info["record"]
            print(f"[seed {seed} {time.perf_counter() - t0:7.0f}s] {r['id']}: val {100 * r['val_acc']:.1f} "
                  f"in {r.get('seconds')} s ({info['done']}/{info['total']})", flush=True)
        elif event == "method":
            r = info["row"]
            print(f"[seed {seed} {time.perf_counter() - t0:7.0f}s] {r['method']} [{r['selection']}]: "
                  f"ID {100 * r['test_id']:.1f} OOD {100 * r['test_ood']:.1f}", flush=True)

    results = run_recycle(load_config(recipe), out, force=out.exists(), progress=progress)
    results["driver_wall_seconds"] = round(time.perf_counter() - t0, 1)
    (a.out_root / f"seed{seed}.wall.json").write_text(json.dumps({"seconds": results["driver_wall_seconds"]}))
    return results


def summarize(per_seed: dict[int, dict], n_boot: int = 2000) -> dict:
    """Rows per seed and their mean; paired comparisons per seed and over seeds (mergelab.recycle.seeds)."""
    from mergelab.recycle.seeds import compare_over_seeds, t_interval
    seeds = sorted(per_seed)
    rows = {}
    for key in ROWS:
        per = {}
        for s in seeds:
            m = {f"{r['method']} [{r['selection']}]": r for r in per_seed[s]["methods"]}[key]
            per[s] = {k: m[k] for k in ("val", "test_id", "test_id_se", "test_ood", "test_ood_se")}
            per[s]["runs_averaged"] = len(m["members"]) if m["members"] else 0
        rows[key] = {"per_seed": per, **{f"mean_{k}": t_interval([per[s][k] for s in seeds])
                                          for k in ("val", "test_id", "test_ood")}}
    outcomes = [per_seed[s]["outcomes"] for s in seeds]
    comparisons = [compare_over_seeds(outcomes, a, b, split, n_boot=n_boot, seed=0)
                   for a, b in PAIRS for split in SPLITS]
    timing = []
    for s in seeds:
        res = per_seed[s]
        target_runs = [r for r in res["runs"] if r["kind"] == "target" and not r["resumed"]]
        timing.append({"seed": s, "seconds": res["seconds"], "seconds_evaluate": res.get("seconds_evaluate"),
                       "target_runs": len([r for r in res["runs"] if r["kind"] == "target"]),
                       "trained_now": len(target_runs),
                       "seconds_per_target_run": [r["seconds"] for r in target_runs]})
    return {"seeds": seeds, "rows": rows, "comparisons": comparisons, "timing": timing}


def weight_distances(out: Path, checkpoints: dict[str, str]) -> dict:
    """Relative L2 distance ||w - w_base|| / ||w_base|| of the encoder: every auxiliary checkpoint and every
    target run of one seed (do the featurizers differ from the base, do the target runs move them)."""
    import torch
    from safetensors.torch import load_file

    from mergelab.io import load_state_dict
    from mergelab.recycle.pipeline import resolve_base
    from mergelab.recycle.train import ENC, encoder_part, load_encoder
    base = {k: v.float() for k, v in load_encoder(resolve_base("minilm"), 0.0).state_dict().items()}
    keys = [k for k in base if base[k].is_floating_point() and "position_ids" not in k]
    norm = torch.sqrt(sum((base[k] ** 2).sum() for k in keys)).item()

    def dist(state) -> float:
        return torch.sqrt(sum(((state[k].float() - base[k]) ** 2).sum() for k in keys)).item() / norm

    out_d = {"aux": {n: dist(encoder_part(load_state_dict(p), base, p)) for n, p in checkpoints.items()}, "runs": {}}
    for f in sorted((out / "runs").glob("[tf]*/model.safetensors")):
        st = load_file(str(f))
        out_d["runs"][f.parent.name] = dist({k[len(ENC):]: v for k, v in st.items() if k.startswith(ENC)})
    return out_d


def _p(x: float) -> str:
    return f"{100 * x:.1f}"


def _d(x: float) -> str:
    return f"{100 * x:+.2f}"


def verdict(summary: dict) -> list[str]:
    lines = []
    for sel in ("uniform", "greedy"):
        c = next(c for c in summary["comparisons"] if c["a"] == f"Ratatouille [{sel}]"
                 and c["b"] == f"Model soup [{sel}]" and c["split"] == "test_ood")
        t, b = c["t"], c["bootstrap"]
        if len(summary["seeds"]) < 2:
            word = ("cannot be judged from one data seed (no interval over seeds); the bootstrap over its test "
                    f"examples is {'above' if b['lo'] > 0 else 'below' if b['hi'] < 0 else 'around'} zero")
            ti = "one seed: no t-interval"
        else:
            ti = f"t-interval {_d(t['lo'])} .. {_d(t['hi'])}"
            if t["lo"] > 0 and b["lo"] > 0:
                word = "holds here: both intervals are above zero"
            elif t["hi"] < 0 and b["hi"] < 0:
                word = "is contradicted here: Ratatouille is below the soup, both intervals below zero"
            else:
                word = "is not shown here: an interval contains zero"
        lines.append(f"* Ratatouille [{sel}] − model soup [{sel}], OOD: {_d(t['mean'])} points "
                     f"({ti}; pooled bootstrap {_d(b['lo'])} .. {_d(b['hi'])}): "
                     f"the claim (Ratatouille beats the model soup out of distribution) {word}.")
    gap = next(c for c in summary["comparisons"] if c["a"].startswith("ERM") and c["b"].startswith("LP")
               and c["split"] == "test_ood")
    lines.append(f"* Room for the effect: ERM − LP out of distribution is {_d(gap['t']['mean'])} points "
                 f"(bootstrap {_d(gap['bootstrap']['lo'])} .. {_d(gap['bootstrap']['hi'])})"
                 + (" — fine-tuning loses several points OOD, the room the effect needs."
                    if gap["bootstrap"]["hi"] < 0 and gap["t"]["mean"] <= -0.02 else
                    " — fine-tuning loses less than 2 points OOD: little room for the effect."
                    if gap["bootstrap"]["hi"] < 0 else " — fine-tuning does not lose OOD accuracy here: "
                    "the experiment has little room for the effect."))
    return lines


def markdown(summary: dict, meta: dict) -> str:
    seeds = summary["seeds"]
    L = [f"# Model Ratatouille vs model soup, ERM, inter-training, fusing ({meta['date']})", "",
         f"Command: `{meta['command']}`", "",
         f"Target `gcide_to_wordnet`, {len(meta['classes'])} fields ({', '.join(meta['classes'])}): GCIDE senses "
         f"in distribution (train {meta['sizes']['train']}, val {meta['sizes']['val']}, ID test "
         f"{meta['sizes']['test_id']}, drawn per data seed), every WordNet gloss of those fields out of "
         f"distribution (OOD test {meta['sizes']['test_ood']}, the same texts for every seed). "
         f"Base all-MiniLM-L6-v2. Auxiliary checkpoints ({len(meta['checkpoints'])}): "
         f"{', '.join(meta['checkpoints'])} (cached `mergelab bench` fine-tunes, 150 steps at lr 1e-4).",
         f"Per sweep {meta['runs']} target runs (Ratatouille pool cycled: base + the auxiliaries; soup sweep all from "
         f"the base, base runs shared), {meta['fusing_runs']} fusing runs (base included, range 4). Target runs: "
         f"{meta['steps']} steps, batch {meta['batch_size']}, lr from {meta['lr']}, weight decay from [1e-4, 1e-6], "
         f"dropout from [0, 0.1], best on validation every {meta['eval_every']} steps; {meta['lp_steps']} head-only "
         f"steps first for runs started from an auxiliary featurizer. Data seeds {seeds} "
         "(seed s draws the ID splits and the hyper-parameters).", "",
         "## Test accuracy (%)", "",
         "| method | " + " | ".join(f"seed {s} ID | seed {s} OOD" for s in seeds) + " | mean ID (± SD) | mean OOD (± SD) |",
         "|---|" + "---:|---:|" * len(seeds) + "---:|---:|"]
    for key in ROWS:
        r = summary["rows"][key]
        cells = " | ".join(f"{_p(r['per_seed'][s]['test_id'])} | {_p(r['per_seed'][s]['test_ood'])}" for s in seeds)
        sd = lambda k: "" if len(seeds) < 2 else f" ± {_p(r[k]['sd'])}"
        L.append(f"| {key} | {cells} | {_p(r['mean_test_id']['mean'])}{sd('mean_test_id')} | "
                 f"{_p(r['mean_test_ood']['mean'])}{sd('mean_test_ood')} |")
    L += ["", "Binomial SE of one accuracy: about "
          + ", ".join(f"{_p(summary['rows'][ROWS[0]]['per_seed'][s]['test_ood_se'])} (OOD) / "
                      f"{_p(summary['rows'][ROWS[0]]['per_seed'][s]['test_id_se'])} (ID)" for s in seeds[:1])
          + " points; runs averaged by the greedy soups: "
          + "; ".join(f"{k.split(' [')[0]} " + ", ".join(str(summary['rows'][k]['per_seed'][s]['runs_averaged'])
                                                         for s in seeds)
                      for k in ("Model soup [greedy]", "Ratatouille [greedy]")) + " (per seed).", "",
          "## Paired differences (points)", "",
          "Per seed: A − B on the same test examples ± the SE of the per-example difference. Over seeds: the mean "
          f"with a 95% t-interval over the {len(seeds)} per-seed differences (df = {len(seeds) - 1}; training and "
          "test-sample variation) and a 95% paired bootstrap pooling the seeds (test examples resampled within "
          f"each seed, {summary['comparisons'][0]['bootstrap']['n_boot']} replicates; test-sample variation only, "
          "given the trained runs).", "",
          "| A | B | split | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | t-interval | bootstrap |",
          "|---|---|---|" + "---:|" * len(seeds) + "---:|---:|---:|"]
    for c in summary["comparisons"]:
        cells = " | ".join(f"{_d(p['diff'])} ± {100 * p['se']:.2f}" for p in c["per_seed"])
        t, b = c["t"], c["bootstrap"]
        ti = "-" if len(seeds) < 2 else f"{_d(t['lo'])} .. {_d(t['hi'])}"
        L.append(f"| {c['a']} | {c['b']} | {c['split']} | {cells} | {_d(t['mean'])} | {ti} | "
                 f"{_d(b['lo'])} .. {_d(b['hi'])} |")
    L += ["", "## Reading (computed from the intervals above)", ""] + verdict(summary)
    wd = summary.get("distances")
    if wd:
        runs = wd["runs"]
        grp = {"from the base": [v for k, v in runs.items() if k.startswith("t") and k.endswith("-base")],
               "from an auxiliary": [v for k, v in runs.items() if k.startswith("t") and not k.endswith("-base")],
               "from a fused start": [v for k, v in runs.items() if k.startswith("f")]}
        L += ["", f"## Do the featurizers move? (seed {wd['seed']})", "",
              "Relative L2 distance of the encoder weights from the base, ||w − w_base|| / ||w_base|| (×1000): "
              "auxiliary checkpoints " + ", ".join(f"{n} {1000 * v:.1f}" for n, v in wd["aux"].items()) + "; "
              "target runs (best-on-val checkpoint) "
              + "; ".join(f"{g} {1000 * statistics.mean(v):.1f} (n={len(v)})" for g, v in grp.items() if v) + "."]
    tm = summary["timing"]
    per_run = [x for t in tm for x in t["seconds_per_target_run"]]
    L += ["", "## Time", "",
          f"Machine: {meta['machine']}; executor {meta['executor']} with {meta['num_cpus']} CPUs, 1 thread per run; "
          f"load average {meta['load_before']} before, {meta['load_after']} after.",
          f"Wall time of this invocation: {meta['wall_seconds'] / 60:.1f} min.", "",
          "| seed | target runs | trained now | pipeline s | of which evaluation s | s per target run (mean, min-max) |",
          "|---:|---:|---:|---:|---:|---|"]
    for t in tm:
        s = t["seconds_per_target_run"]
        rng = f"{statistics.mean(s):.0f} ({min(s):.0f}-{max(s):.0f})" if s else "- (all resumed)"
        L.append(f"| {t['seed']} | {t['target_runs']} | {t['trained_now']} | {t['seconds']:.0f} | "
                 f"{t['seconds_evaluate']} | {rng} |")
    if per_run:
        L += ["", f"Per-run cost: {statistics.mean(per_run):.0f} s per target run on average "
              f"(median {statistics.median(per_run):.0f} s, {len(per_run)} runs, 1 thread each, "
              f"{meta['num_cpus']} in parallel)."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_root", type=Path, help="folder of the per-seed recycle outputs (resumable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", type=int, default=12, help="target runs per sweep")
    p.add_argument("--fusing-runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, nargs="+", default=[5e-5, 1e-4, 2e-4])
    p.add_argument("--lp-steps", type=int, default=20)
    p.add_argument("--classes", nargs="+", default=FIELDS)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=250)
    p.add_argument("--n-test", type=int, default=750)
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("MERGELAB_CACHE") or Path.home() / ".cache" / "mergelab" / "bench"),
                   help="the `mergelab bench` cache holding the auxiliary fine-tunes (default $MERGELAB_CACHE or "
                        "~/.cache/mergelab/bench, as mergelab bench)")
    p.add_argument("--executor", choices=["ray", "local"], default="ray")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--date", default=dt.date.today().isoformat())
    p.add_argument("--doc", type=Path, default=None,
                   help="note to write (.md, and .json beside it); default docs/results/ratatouille-<date>.md")
    a = p.parse_args(argv)
    a.out_root = a.out_root.resolve()
    doc = a.doc or Path(__file__).resolve().parents[1] / "docs" / "results" / f"ratatouille-{a.date}.md"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checkpoints = find_checkpoints(a.cache)
    print(f"auxiliary checkpoints: {', '.join(checkpoints)}", flush=True)
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    per_seed = {s: run_seed(s, a, checkpoints) for s in a.seeds}
    wall = sum(r.get("driver_wall_seconds") or json.loads((a.out_root / f"seed{s}.wall.json").read_text())["seconds"]
               for s, r in per_seed.items()) if all(
        r.get("driver_wall_seconds") or (a.out_root / f"seed{s}.wall.json").is_file() for s, r in per_seed.items()) \
        else time.perf_counter() - t0
    summary = summarize(per_seed, a.bootstrap)
    summary["distances"] = {"seed": a.seeds[0], **weight_distances(a.out_root / f"seed{a.seeds[0]}", checkpoints)}
    t = per_seed[a.seeds[0]]["target"]
    meta = {"date": a.date, "command": " ".join(["python", "benchmarks/ratatouille_experiment.py", *sys.argv[1:]])
            if argv is None else "main(" + repr(argv) + ")",
            "classes": t["classes"], "sizes": {k: t[k] for k in ("train", "val", "test_id", "test_ood")},
            "checkpoints": list(checkpoints), "runs": a.runs, "fusing_runs": a.fusing_runs, "steps": a.steps,
            "batch_size": a.batch_size, "lr": a.lr, "eval_every": a.eval_every, "lp_steps": a.lp_steps,
            "executor": a.executor, "num_cpus": a.num_cpus,
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs", "load_before": load_before,
            "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()), "wall_seconds": wall,
            "out_root": str(a.out_root)}
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(markdown(summary, meta))
    doc.with_suffix(".json").write_text(json.dumps({"meta": meta, **summary}, indent=1))
    print(f"wrote {doc} and {doc.with_suffix('.json')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
