"""Model Ratatouille: soup selection, planning, run store, resumption, local vs Ray executors.

Tiny real models (a 2-layer BERT built here), real training steps, a pre-tokenized bundle whose
labels depend on the tokens, so that fine-tuning actually learns."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from mergelab.errors import MergelabError
from mergelab.recycle import load_config, plan_runs, run_recycle
from mergelab.recycle.soup import greedy_soup, rank_runs, uniform_soup
from mergelab.recycle.store import RunStore

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ----------------------------------------------------------------------------- soups on hand-made scores
def test_greedy_soup_follows_validation_order_and_keeps_ties():
    val = {"a": 0.70, "b": 0.90, "c": 0.80, "d": 0.80, "e": 0.60}
    assert rank_runs(val) == ["b", "c", "d", "a", "e"]          # ties broken by id
    scores = {("b", "c"): 0.91, ("b", "c", "d"): 0.89, ("a", "b", "c"): 0.91, ("a", "b", "c", "e"): 0.95}
    calls = []

    def score(members):
        calls.append(list(members))
        return scores[tuple(sorted(members))]

    soup = greedy_soup(val, score)
    # b first (its own val 0.90), c improves (0.91), d hurts (0.89), a ties (0.91 >= 0.91: kept), e improves
    assert soup.members == ["b", "c", "a", "e"]
    assert soup.val_acc == 0.95
    assert calls == [["b", "c"], ["b", "c", "d"], ["b", "c", "a"], ["b", "c", "a", "e"]]
    assert [t["accepted"] for t in soup.trace] == [True, True, False, True, True]


def test_greedy_soup_single_best_when_every_addition_hurts():
    soup = greedy_soup({"x": 0.5, "y": 0.9, "z": 0.7}, lambda m: 0.1)
    assert soup.members == ["y"] and soup.val_acc == 0.9
    assert uniform_soup({"x": 0.5, "y": 0.9}, lambda m: 0.42).members == ["y", "x"]
    with pytest.raises(ValueError):
        greedy_soup({}, lambda m: 0.0)


# ----------------------------------------------------------------------------- tiny real setup
VOCAB = 100


def _examples(rng: random.Random, n: int, n_classes: int, keys: int, offset: int, noise: range) -> dict:
    """Class c puts tokens offset + c*keys .. offset + (c+1)*keys - 1 among noise tokens."""
    ids, labels = [], []
    for _ in range(n):
        c = rng.randrange(n_classes)
        seq = [2] + [rng.choice(noise) for _ in range(rng.randint(3, 8))]
        for _ in range(2):
            seq.insert(rng.randint(1, len(seq)), offset + c * keys + rng.randrange(keys))
        ids.append(seq + [3])
        labels.append(c)
    return {"ids": ids, "labels": labels}


def make_bundle(seed: int = 0) -> dict:
    rng = random.Random(seed)
    id_noise, ood_noise = range(40, 70), range(70, 100)          # OOD: other filler tokens
    return {"pad_id": 0,
            "target": {"classes": ["a", "b", "c"], "train": _examples(rng, 48, 3, 4, 10, id_noise),
                       "val": _examples(rng, 24, 3, 4, 10, id_noise), "test_id": _examples(rng, 30, 3, 4, 10, id_noise),
                       "test_ood": _examples(rng, 30, 3, 4, 10, ood_noise)},
            "aux": {"other": {"classes": ["p", "q"], "train": _examples(rng, 32, 2, 5, 22, ood_noise),
                              "val": _examples(rng, 16, 2, 5, 22, ood_noise)}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recycle")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(root / "base")
    (root / "data.json").write_text(json.dumps(make_bundle()))
    recipe = {"base_model": str(root / "base"), "data": str(root / "data.json"),
              "auxiliary": {"tasks": ["other"], "hparams": {"steps": 4, "batch_size": 8, "lr": 1e-3}},
              "runs": 3, "fusing_runs": 1, "lp_steps": 2, "probe_iters": 30, "num_cpus": 2, "cpus_per_run": 1, "executor": "local",
              "hparams": {"lr": [1e-3, 3e-3], "weight_decay": [0.0, 1e-4], "dropout": [0.0, 0.1],
                          "steps": 6, "batch_size": 8, "eval_every": 3}}
    (root / "recipe.yaml").write_text(json.dumps(recipe))   # JSON is YAML
    return root, recipe


def test_plan_cycles_sources_and_shares_base_runs(tiny):
    root, recipe = tiny
    cfg = load_config({**recipe, "runs": 5, "fusing_runs": 2, "fusing_range": 4.0,
                       "auxiliary": {"tasks": ["other"], "checkpoints": {"given": str(root / "base")}}})
    plan = plan_runs(cfg, "BASE", "hash")
    g = plan["groups"]
    assert plan["pool"] == ["base", "other", "given"]
    assert g["ratatouille"] == ["t00-base", "t01-other0", "t02-given0", "t03-base", "t04-other0"]
    assert g["soup"] == [f"t{r:02d}-base" for r in range(5)]
    assert g["inter"] == ["t01-other0", "t02-given0", "t04-other0"]
    t = plan["target"]
    assert len(t) == 5 + 3 + 2                                      # t00 and t03 shared
    assert t["t01-other0"]["hp"] == t["t01-base"]["hp"] and t["t01-other0"]["seed"] == t["t01-base"]["seed"]
    assert t["t01-other0"]["init"] == {"type": "run", "run": "aux-other-0"} and t["t01-other0"]["lp_steps"] == 2
    assert t["t00-base"]["lp_steps"] == 0
    assert all(s["hp"]["lr"] in (1e-3, 3e-3) and s["hp"]["dropout"] in (0.0, 0.1) for s in t.values())
    for f in g["fusing"]:
        w = t[f]["init"]["weights"]
        assert len(w) == 2 and abs(sum(w) - 1) < 1e-6
    assert plan_runs(cfg, "BASE", "hash") == plan                 # deterministic


def test_config_errors(tiny):
    root, recipe = tiny
    with pytest.raises(MergelabError, match="unknown key 'bogus'"):
        load_config({**recipe, "bogus": 1})
    with pytest.raises(MergelabError, match="hparams.lr"):
        load_config({**recipe, "hparams": {"lr": "fast"}})
    with pytest.raises(MergelabError, match="at least one auxiliary"):
        load_config({**recipe, "auxiliary": {}})
    with pytest.raises(MergelabError, match="soup must be"):
        load_config({**recipe, "soup": "stew"})
    with pytest.raises(MergelabError, match="not in the bundle"):
        run_recycle(load_config({**recipe, "auxiliary": {"tasks": ["missing"]}}), root / "never")


def test_ray_missing_names_the_extra(monkeypatch):
    from mergelab.recycle.executor import make_executor
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MergelabError, match=r"pip install 'mergelab\[ray\]'"):
        make_executor("ray")


def test_store_is_atomic_and_keyed_by_spec(tmp_path):
    store = RunStore(tmp_path)
    store.save("r1", {"w": torch.ones(2)}, {"spec": {"a": 1}, "val_acc": 0.5})
    assert store.finished("r1", {"a": 1})["val_acc"] == 0.5
    assert store.finished("r1", {"a": 2}) is None                  # another spec: redo
    (tmp_path / ".r2.tmp-x").mkdir()                                 # a write cut short
    assert store.record("r2") is None
    store.clean_temporaries()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1"]
    with pytest.raises(MergelabError):
        store.load("r2")


# ----------------------------------------------------------------------------- end to end
def _soup_state(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def local_run(tiny):
    root, recipe = tiny
    out = root / "out_local"
    events = []
    results = run_recycle(load_config(root / "recipe.yaml"), out, progress=lambda e, **i: events.append(e))
    return out, results, events


def test_end_to_end_local(local_run, tiny):
    out, results, events = local_run
    for name in ("report.md", "results.json", "plot.png", "data.json", "model/config.json", "model/head.safetensors"):
        assert (out / name).is_file(), name
    assert not (out.parent / f".{out.name}.work").exists()
    names = [(m["method"], m["selection"]) for m in results["methods"]]
    assert names == [("LP (base + probe head)", "-"), ("ERM (single fine-tune)", "best val"),
                     ("Model soup", "uniform"), ("Model soup", "greedy"), ("Inter-training", "best val"),
                     ("Fusing", "best val"), ("Ratatouille", "uniform"), ("Ratatouille", "greedy")]
    rows = {(m["method"], m["selection"]): m for m in results["methods"]}
    assert rows[("Ratatouille", "uniform")]["members"] == rank_runs(
        {r["id"]: r["val_acc"] for r in results["runs"] if r["id"] in ("t00-base", "t01-other0", "t02-base")})
    erm = rows[("ERM (single fine-tune)", "best val")]
    assert erm["val"] == max(r["val_acc"] for r in results["runs"] if r["id"].endswith("-base"))
    assert results["trained_now"] == len(results["runs"]) == 1 + 3 + 1 + 1   # aux, rat/soup (shared), soup, fusing
    table = (out / "report.md").read_text()
    assert "| Ratatouille | greedy |" in table and "test_ood" in table
    assert events.count("run") == 1 + 6
    # the soup written as the model is the greedy Ratatouille soup, encoder + head
    soup = _soup_state(out)
    assert "embeddings.word_embeddings.weight" in soup


def test_ray_local_mode_gives_the_same_soup(local_run, tiny):
    pytest.importorskip("ray")
    root, recipe = tiny
    out_local, res_local, _ = local_run
    res_ray = run_recycle(load_config({**recipe, "executor": "ray"}), root / "out_ray")
    assert res_ray["executor"] == "ray"
    val_l = {r["id"]: r["val_acc"] for r in res_local["runs"]}
    val_r = {r["id"]: r["val_acc"] for r in res_ray["runs"]}
    assert val_l == val_r
    for a, b in zip(res_local["methods"], res_ray["methods"]):
        assert a["members"] == b["members"]
        assert a["test_ood"] == pytest.approx(b["test_ood"], abs=1e-9)
    sl, sr = _soup_state(out_local), _soup_state(root / "out_ray")
    for k in sl:
        torch.testing.assert_close(sl[k], sr[k], rtol=0, atol=1e-6)


def test_resume_after_killed_run(tiny, tmp_path):
    root, recipe = tiny
    out = tmp_path / "out"
    work = tmp_path / ".out.work"
    code = ("import sys; sys.path.insert(0, %r); import torch; torch.set_num_threads(1);"
            "from mergelab.recycle import load_config, run_recycle;"
            "run_recycle(load_config(%r), %r)") % (SRC, str(root / "recipe.yaml"), str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(work.glob("runs/t*/done.json"))) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the pipeline ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert not out.exists() and work.is_dir()
    done = {p.parent.name: p.stat().st_mtime_ns for p in work.glob("runs/*/done.json")}
    assert "aux-other-0" in done and any(k.startswith("t") for k in done)
    results = run_recycle(load_config(root / "recipe.yaml"), out)
    resumed = {r["id"] for r in results["runs"] if r["resumed"]}
    assert set(done) - {"probe"} <= resumed                          # finished runs were not redone
    assert results["trained_now"] == len(results["runs"]) - len(resumed) > 0
    for rid, mtime in done.items():
        assert (out / "runs" / rid / "done.json").stat().st_mtime_ns == mtime
    # and the result is the same as an uninterrupted run
    local = json.loads((root / "out_local" / "results.json").read_text())
    assert [m["members"] for m in results["methods"]] == [m["members"] for m in local["methods"]]


def test_cli_recycle(tiny, local_run, tmp_path, capsys):
    import argparse
    import shutil
    from mergelab.cli.recycle import add_parser
    root, _ = tiny
    # an interrupted earlier attempt left finished runs in the work folder: the CLI reuses them all
    shutil.copytree(local_run[0] / "runs", tmp_path / ".o.work" / "runs")
    (tmp_path / ".o.work" / "runs" / "probe" / "done.json").unlink()     # ... but not the probe
    parser = argparse.ArgumentParser(prog="mergelab")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["recycle", str(root / "recipe.yaml"), str(tmp_path / "o"), "--executor", "local",
                              "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| Ratatouille | greedy |" in out and "(0 trained now)" in out
    assert (tmp_path / "o" / "report.md").read_text() .count("(resumed)") == 6
    args = parser.parse_args(["recycle", str(root / "recipe.yaml"), str(tmp_path / "o"), "--quiet"])
    with pytest.raises(MergelabError, match="already exists"):
        args.func(args)


# ----------------------------------------------------------------------------- issue 21, item 9
def test_force_after_a_completed_run_reuses_its_runs(local_run, tiny, tmp_path):
    import shutil
    root, _ = tiny
    out = tmp_path / "out"
    shutil.copytree(local_run[0], out)                                # a completed run
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/done.json")}
    events = []
    results = run_recycle(load_config(root / "recipe.yaml"), out, force=True,
                          progress=lambda e, **i: events.append((e, i)))
    assert results["trained_now"] == 0 and all(r["resumed"] for r in results["runs"])
    assert ("reuse", {"runs": len(before), "source": str(out / "runs")}) in events
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/done.json")} == before
    assert [m["members"] for m in results["methods"]] == [m["members"] for m in local_run[1]["methods"]]
    assert not (tmp_path / ".out.work").exists()


def test_one_head_format_for_recycle_bench_and_adapt(local_run, tmp_path):
    from safetensors.torch import save_file

    from mergelab.adapt.text import read_data_dir
    from mergelab.bench.runner import load_head
    out = local_run[0]
    head = load_file(str(out / "model" / "head.safetensors"))
    assert set(head) == {"weight", "bias"} and head["weight"].shape == (3, 32)
    assert torch.equal(load_head(out / "model").weight, head["weight"])
    # the older layout of recycle outputs ('head.weight', 'head.bias') is still read
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file({"head.weight": head["weight"], "head.bias": head["bias"]}, str(legacy / "head.safetensors"))
    assert torch.equal(load_head(legacy).bias, head["bias"])
    (tmp_path / "data" / "t").mkdir(parents=True)
    (tmp_path / "data" / "t" / "inputs.txt").write_text("w1 w2\n")
    for model in (out / "model", legacy):   # adapt reads either, from the model folder
        task = read_data_dir(tmp_path / "data", 1, 32, [str(model)])[0]
        assert torch.equal(task.head.weight, head["weight"])


def test_report_names_auxiliary_checkpoints_as_the_recipe_does(local_run, tiny, tmp_path):
    root, recipe = tiny
    given = str(local_run[0] / "model")                              # a folder named 'model'
    cfg = load_config({**recipe, "auxiliary": {**recipe["auxiliary"], "checkpoints": {"given": given}}})
    results = run_recycle(cfg, tmp_path / "out")
    inits = {r["id"]: r["init"] for r in results["runs"]}
    assert inits["t02-given0"] == "given"
    assert inits["f00-fusing"] == "fusing(aux-other-0:0.50, given:0.50)"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| t02-given0 | given |" in report and "| model |" not in report


def test_auxiliary_checkpoint_fine_tuned_on_the_target_source_is_refused(tiny, tmp_path):
    root, recipe = tiny
    builtin = {k: v for k, v in recipe.items() if k != "data"}
    builtin["target"] = {"task": "gcide_to_wordnet"}
    ft = tmp_path / "gcide-0123abcd"                                 # a cached `mergelab bench` fine-tune
    ft.mkdir()
    (ft / "meta.json").write_text(json.dumps({"task": "gcide", "classes": ["a", "b"]}))
    other = tmp_path / "foldoc-ft"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"task": "foldoc"}))
    with pytest.raises(MergelabError, match=r"auxiliary.checkpoints.mine \(.*gcide-0123abcd\) was fine-tuned on "
                                            r"'gcide', the target's own corpus"):
        load_config({**builtin, "auxiliary": {"checkpoints": {"mine": str(ft)}}})
    with pytest.raises(MergelabError, match=r"auxiliary.checkpoints.gcide .* is named 'gcide'"):
        load_config({**builtin, "auxiliary": {"checkpoints": {"gcide": str(other)}}})
    with pytest.raises(MergelabError, match="'gcide' is the target's own corpus"):
        load_config({**builtin, "auxiliary": {"tasks": ["gcide"]}})
    assert load_config({**builtin, "auxiliary": {"checkpoints": {"foldoc": str(other)}}}).aux_names == ["foldoc"]
