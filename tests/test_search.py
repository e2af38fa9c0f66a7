"""mergelab search: tiny real causal LMs (trained here), real Optuna samplers, real Ray."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.cli import main
from mergelab.io import load_state_dict
from mergelab.search import load_search_config
from mergelab.search.runner import pareto_front, run_search

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    from tests.search_models import build_lms
    root = tmp_path_factory.mktemp("lms")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = build_lms(root, layers=4, steps=12)
    finally:
        torch.set_num_threads(before)
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "base_model": "base", "models": [{"model": "ft_a"}, {"model": "ft_b"}],
        "merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}}))
    return root, paths


def write_search(root: Path, name: str, **over) -> Path:
    doc = {"recipe": "recipe.yaml",
           "space": {"method": ["task_arithmetic", "ties"], "lambda": {"low": 0.2, "high": 1.5},
                     "density": {"low": 0.1, "high": 0.9}, "layers": {"granularity": 2, "low": 0.0, "high": 2.0}},
           "objective": {"type": "perplexity", "files": {"a": "val_a.txt", "b": "val_b.txt"}, "block": 64,
                         "max_tokens": 512},
           "algorithm": "tpe", "trials": 8, "batch": 4, "seed": 3, "executor": "local", "naive_probe": 1}
    doc.update(over)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _params(out: Path) -> list[dict]:
    return [r["params"] for r in sorted((json.loads(l) for l in (out / "trials.jsonl").read_text().splitlines()
                                         if not json.loads(l).get("naive")), key=lambda r: r["number"])]


def test_search_local_and_embedded_ray_agree_and_recipe_reproduces(lms, tmp_path):
    root, _ = lms
    cfg = load_search_config(write_search(root, "s1"))
    local = run_search(cfg, tmp_path / "local", executor="local")
    ray_run = run_search(load_search_config(write_search(root, "s1")), tmp_path / "ray", executor="ray", workers=2)

    assert local["best"]["number"] == ray_run["best"]["number"]
    assert local["best"]["values"] == ray_run["best"]["values"]
    assert _params(tmp_path / "local") == _params(tmp_path / "ray")
    assert len(_params(tmp_path / "local")) == 8
    # every trial scored; the searched method choice and the layer groups appear in the table
    table = json.loads((tmp_path / "local" / "trials.json").read_text())
    assert len(table) == 8 and all(r["state"] == "complete" for r in table)
    assert {"layer.L0-1", "layer.L2-3"} <= set(table[0])
    assert ray_run["timing"]["workers_that_loaded"] <= 2
    assert local["timing"]["naive_values_match_cached"] is True
    for name in ("trials.csv", "summary.json", "plots/objective_vs_trial.png", "plots/layer_coefficients.png"):
        assert (tmp_path / "local" / name).is_file(), name
    # the best value is the best of the table, and the best model scores it
    ppl = [r["perplexity"] for r in table]
    assert local["best"]["values"]["perplexity"] == min(ppl)

    # best_recipe.yaml is a plain recipe: `mergelab merge` rebuilds best_model bit for bit
    recipe = yaml.safe_load((tmp_path / "local" / "best_recipe.yaml").read_text())
    assert set(recipe) <= {"base_model", "models", "merge_method", "parameters", "compat"}
    assert main(["merge", str(tmp_path / "local" / "best_recipe.yaml"), str(tmp_path / "again")]) == 0
    a, b = load_state_dict(tmp_path / "local" / "best_model"), load_state_dict(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and that model differs from the plain template merge (the search changed something)
    assert main(["merge", str(root / "recipe.yaml"), str(tmp_path / "template")]) == 0
    t = load_state_dict(tmp_path / "template")
    assert any(not torch.equal(a[k], t[k]) for k in a)


SLOW_SCORE = """
import time
from safetensors.torch import load_file
from pathlib import Path

def score(model_dir):
    time.sleep(0.4)
    sd = load_file(str(Path(model_dir) / "model.safetensors"))
    return float(sum(v.float().abs().mean() for v in sd.values()))
"""


def test_resume_after_killed_run_redoes_no_finished_trial(lms, tmp_path):
    root, _ = lms
    (tmp_path / "slowobj.py").write_text(SLOW_SCORE)
    search = write_search(root, "s2", space={"lambda": {"low": 0.1, "high": 1.0}}, algorithm="random",
                          trials=10, naive_probe=0,
                          objective={"type": "python", "function": "slowobj:score", "direction": "minimize"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(tmp_path)]), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mergelab", "search", str(search), str(out), "--quiet"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = out / "trials.jsonl"
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            if store.exists() and len(store.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {json.loads(l)["number"] for l in store.read_text().splitlines() if l.strip()}
    assert 3 <= len(before) < 10

    sys.path.insert(0, str(tmp_path))
    try:
        # without --resume the folder is refused; with it the stored trials are replayed, not rerun
        with pytest.raises(Exception, match="--resume"):
            run_search(load_search_config(search), out)
        s = run_search(load_search_config(search), out, resume=True)
        numbers = [json.loads(l)["number"] for l in store.read_text().splitlines() if l.strip()]
        assert sorted(numbers) == list(range(10))            # each trial ran exactly once over both runs
        assert s["trials_run_now"] == 10 - len(before) and s["trials_reused"] == len(before)
        # the same trials and the same best as a run that was never killed
        ref = run_search(load_search_config(search), tmp_path / "ref")
    finally:
        sys.path.remove(str(tmp_path))
    assert _params(out) == _params(tmp_path / "ref") and s["best"] == ref["best"]


def test_bad_space_is_refused_with_one_line(lms, tmp_path, capsys):
    root, _ = lms
    bad = write_search(root, "bad", space={"method": "task_arithmetic", "lambda": {"low": 0.1, "high": 1},
                                           "density": {"low": 0.1, "high": 0.5}})
    assert main(["search", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "space.density" in err[0] and "task_arithmetic" in err[0], err
    assert not (tmp_path / "out").exists()
    # a range the method refuses, and a parameter of no method of the choice
    for space, words in (({"method": "ties", "density": {"low": 0.1, "high": 1.5}}, "density"),
                         ({"method": ["ties", "task_arithmetic"], "keep": [0.1, 0.2]}, "keep")):
        assert main(["search", str(write_search(root, "bad2", space=space)), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node(args: list[str], env: dict) -> subprocess.Popen:
    """``ray start ... --block`` in its own session: stopping it (by its process group) stops that node only."""
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen([ray, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.slow
def test_two_node_ray_cluster(lms, tmp_path, monkeypatch):
    """A head and a second node started with `ray start` on 127.0.0.1; trials run on both nodes and give
    the local executor's trials. Opt-in (about a minute on 2 cores): MERGELAB_SLOW_TESTS=1."""
    if not os.environ.get("MERGELAB_SLOW_TESTS"):
        pytest.skip("the 2-node Ray cluster test is opt-in: MERGELAB_SLOW_TESTS=1")
    root, _ = lms
    port = _free_port()
    # the cluster's own token (Ray's token authentication), shared by both nodes and this driver
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RAY_USAGE_STATS_ENABLED": "0"}
    short = tmp_path.parent / f"r{port}"          # Ray's socket paths must stay short
    head = _ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                      f"--temp-dir={short}"], env)
    nodes = [head]
    try:
        time.sleep(8)
        nodes.append(_ray_node([f"--address=127.0.0.1:{port}"], env))
        time.sleep(8)
        search = write_search(root, "s3", trials=4, naive_probe=0)
        s = run_search(load_search_config(search), tmp_path / "cluster", ray_address=f"127.0.0.1:{port}")
        local = run_search(load_search_config(search), tmp_path / "local", executor="local")
    finally:
        for p in reversed(nodes):
            _stop(p)
    recs = [json.loads(l) for l in (tmp_path / "cluster" / "trials.jsonl").read_text().splitlines()]
    assert len({r["node"] for r in recs}) == 2
    assert s["best"] == local["best"] and _params(tmp_path / "cluster") == _params(tmp_path / "local")


CHEAP_SCORE = """
from safetensors.torch import load_file
from pathlib import Path

def score(model_dir):
    sd = load_file(str(Path(model_dir) / "model.safetensors"))
    return float(sd["transformer.h.0.mlp.c_fc.weight"].double().sum())
"""


def test_grid_cmaes_random_are_reproducible(lms, tmp_path):
    root, _ = lms
    (tmp_path / "cheapobj.py").write_text(CHEAP_SCORE)
    sys.path.insert(0, str(tmp_path))
    try:
        grid = write_search(root, "g", space={"lambda": {"low": 0.2, "high": 1.0, "steps": 3},
                                              "weight": [0.5, 1.0]},
                            algorithm="grid", trials=100, naive_probe=0,
                            objective={"type": "python", "function": "cheapobj:score"})
        s = run_search(load_search_config(grid), tmp_path / "grid")
        assert s["trials_planned"] == 3 * 2 * 2             # lambda x weight[0] x weight[1], then it stops
        pts = {(p["lambda"], p["weight[0]"], p["weight[1]"]) for p in _params(tmp_path / "grid")}
        assert len(pts) == 12
        for algo in ("cmaes", "random"):
            f = write_search(root, algo, space={"lambda": {"low": 0.2, "high": 1.0}, "weight": {"low": 0, "high": 1}},
                             algorithm=algo, trials=6, batch=3, naive_probe=0,
                             objective={"type": "python", "function": "cheapobj:score"})
            a = run_search(load_search_config(f), tmp_path / f"{algo}1")
            b = run_search(load_search_config(f), tmp_path / f"{algo}2")
            assert _params(tmp_path / f"{algo}1") == _params(tmp_path / f"{algo}2") and a["best"] == b["best"]
            assert len({p["lambda"] for p in _params(tmp_path / f"{algo}1")}) == 6
    finally:
        sys.path.remove(str(tmp_path))


def test_multi_objective_pareto_front_with_a_command(lms, tmp_path):
    root, _ = lms
    # the command gets the merged folder and prints the size of its weights file in MB
    cmd = (f"{sys.executable} -c \"import os, sys; "
           "print(os.path.getsize(os.path.join(sys.argv[1], 'model.safetensors')) / 1e6)\" {model_dir}")
    f = write_search(root, "mo", space={"method": "ties", "lambda": {"low": 0.2, "high": 1.5},
                                        "density": {"low": 0.05, "high": 0.9}},
                     algorithm="tpe", trials=6, batch=3, naive_probe=0,
                     objectives=[{"type": "perplexity", "files": {"a": "val_a.txt", "b": "val_b.txt"},
                                  "per_file": True, "block": 64, "max_tokens": 256},
                                 {"type": "command", "name": "mb", "command": cmd, "direction": "minimize"}])
    doc = yaml.safe_load(f.read_text())
    doc.pop("objective")
    f.write_text(yaml.safe_dump(doc))
    s = run_search(load_search_config(f), tmp_path / "mo")
    assert [o["name"] for o in s["objectives"]] == ["perplexity:a", "perplexity:b", "mb"]
    recs = [r for r in map(json.loads, (tmp_path / "mo" / "trials.jsonl").read_text().splitlines())]
    assert all(r["state"] == "complete" and len(r["values"]) == 3 for r in recs), recs[0].get("error")
    assert all(0.01 < r["values"][2] < 10 for r in recs)     # the command's number came back
    front = {r["number"] for r in pareto_front(recs, ["minimize"] * 3)}
    assert {r["number"] for r in s["pareto_front"]} == front and s["best"]["number"] in front
    for r in recs:       # nothing outside the front dominates a front member
        if r["number"] in front:
            assert not any(all(q["values"][i] <= r["values"][i] for i in range(3)) and q["values"] != r["values"]
                           for q in recs)
    assert (tmp_path / "mo" / "pareto.json").is_file()


def test_tasks_objective_scores_validation_and_test_once(tmp_path):
    """The benchmark's task pool as objective: tiny BERTs, TSV tasks, one frozen head per task."""
    import random

    from safetensors.torch import save_file

    from mergelab.bench.evaluate import evaluate
    from tests.helpers import make_model_folders
    base, fts = make_model_folders(tmp_path, n=2, scale=0.05)
    rng = random.Random(0)
    tasks = []
    for k, ft in enumerate(fts):
        name = f"toy{k}"
        lines = [f"{c}\t" + " ".join(f"w{rng.randrange(10) + 10 * (c + k)}" for _ in range(6))
                 for c in (0, 1) for _ in range(30)]
        (tmp_path / f"{name}.tsv").write_text("\n".join(lines) + "\n")
        g = torch.Generator().manual_seed(k)
        save_file({"weight": torch.randn(2, 32, generator=g), "bias": torch.zeros(2)}, str(ft / "head.safetensors"))
        (ft / "meta.json").write_text(json.dumps({"task": name}))
        tasks.append({"name": name, "path": f"{name}.tsv", "format": "tsv"})
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"name": "toy", "tasks": tasks, "protocol": {
        "n_train": 20, "n_val": 20, "n_test": 20, "max_len": 8}}))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"base_model": str(base), "models": [str(f) for f in fts],
                                                          "merge_method": "task_arithmetic"}))
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"recipe": "recipe.yaml", "space": {"lambda": {"low": 0.0, "high": 2.0}},
                                 "objective": {"type": "tasks", "suite": "suite.yaml", "per_task": True},
                                 "algorithm": "random", "trials": 3, "executor": "local", "naive_probe": 1,
                                 "final_split": "test"}))
    s = run_search(load_search_config(f), tmp_path / "out")
    assert [o["name"] for o in s["objectives"]] == ["tasks:toy0", "tasks:toy1"]
    assert s["timing"]["naive_values_match_cached"] is True
    # the reported numbers are the benchmark's own evaluation of best_model, on val and (once) on test
    from mergelab.bench import data, train
    from mergelab.bench.runner import load_head
    from transformers import AutoModel, AutoTokenizer
    enc = AutoModel.from_pretrained(tmp_path / "out" / "best_model", attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(base)
    from mergelab.bench.suite import load_suite_file
    suite = load_suite_file(tmp_path / "suite.yaml")   # its file tasks belong to the suite, not the registry
    for k, ft in enumerate(fts):
        td = data.load_task(f"toy{k}", 20, 20, 20, seed=0, spec=suite.task_spec(f"toy{k}"))
        for split, want in (("val", s["best"]["values"][f"tasks:toy{k}"]),
                            ("test", s["final"]["tasks"][f"toy{k}"]["accuracy"])):
            sp = getattr(td, split)
            r = evaluate(enc, load_head(ft), train.tokenize(tok, sp.texts, 8), sp.labels, pad_id=tok.pad_token_id or 0)
            assert r.accuracy == want, (split, k)
