"""Multi-document recipes (mergekit-multi): stages in dependency order, reused when unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from mergelab import load_state_dict, merge_state_dicts
from mergelab.engine.multistage import merge_stages, plan_stages
from mergelab.errors import MergelabError

from tests.helpers import make_model_folders


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_model_folders(tmp_path_factory.mktemp("stages"), n=3)


def _write(path, docs):
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _three_stages(base, fts, density=0.5):
    """compat: paper, to compare with merge_state_dicts (whose default is the papers' semantics)."""
    return [{**doc, "compat": "paper"} for doc in [
        {"name": "final_mix", "merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": "mid"}, {"model": str(fts[0])}], "parameters": {"lambda": 0.5}},
        {"name": "soup", "merge_method": "average", "models": [{"model": str(fts[0])}, {"model": str(fts[1])}]},
        {"name": "mid", "merge_method": "ties", "base_model": str(base),
         "models": [{"model": "soup"}, {"model": str(fts[2])}], "parameters": {"density": density}},
    ]]


def test_three_stages_run_in_dependency_order_and_equal_the_manual_chain(models, tmp_path):
    base, fts = models
    recipe = _write(tmp_path / "multi.yaml", _three_stages(base, fts))
    assert [s.name for s in plan_stages(recipe)] == ["soup", "mid", "final_mix"]
    results = merge_stages(recipe, tmp_path / "out", intermediate_dir=tmp_path / "inter")
    assert [r.name for r in results] == ["soup", "mid", "final_mix"] and not any(r.reused for r in results)
    assert results[-1].out_dir == tmp_path / "out"
    b = load_state_dict(base)
    f = [load_state_dict(x) for x in fts]
    soup = merge_state_dicts(None, [f[0], f[1]], method="average")
    mid = merge_state_dicts(b, [soup, f[2]], method="ties", params={"density": 0.5})
    final = merge_state_dicts(b, [mid, f[0]], method="task_arithmetic", params={"lambda": 0.5})
    got = load_state_dict(tmp_path / "out")
    assert all(torch.allclose(got[k], final[k], atol=1e-6) for k in final)
    assert (tmp_path / "inter" / "soup" / "config.json").is_file()


def test_unchanged_stages_are_reused_and_a_change_reruns_what_depends_on_it(models, tmp_path):
    base, fts = models
    recipe = _write(tmp_path / "multi.yaml", _three_stages(base, fts))
    merge_stages(recipe, tmp_path / "out", intermediate_dir=tmp_path / "inter")
    again = merge_stages(recipe, tmp_path / "out", intermediate_dir=tmp_path / "inter")
    assert all(r.reused for r in again)
    _write(recipe, _three_stages(base, fts, density=0.3))
    changed = merge_stages(recipe, tmp_path / "out", intermediate_dir=tmp_path / "inter")
    assert [r.reused for r in changed] == [True, False, False]


@pytest.mark.parametrize("docs, message", [
    (lambda b, f: [{"name": "x", "merge_method": "average", "models": [{"model": "y"}, {"model": str(f[0])}]},
                   {"name": "y", "merge_method": "average", "models": [{"model": "x"}, {"model": str(f[1])}]}],
     "in a cycle"),
    (lambda b, f: [{"name": "x", "merge_method": "average", "models": [{"model": str(f[0])}, {"model": str(f[1])}]},
                   {"name": "x", "merge_method": "average", "models": [{"model": str(f[0])}, {"model": str(f[2])}]}],
     "two documents are named 'x'"),
    (lambda b, f: [{"merge_method": "average", "models": [{"model": str(f[0])}, {"model": str(f[1])}]},
                   {"merge_method": "average", "models": [{"model": str(f[0])}, {"model": str(f[2])}]}],
     "more than one document has no 'name'"),
    (lambda b, f: [{"name": "../up", "merge_method": "average", "models": [{"model": str(f[0])}]},
                   {"merge_method": "average", "models": [{"model": str(f[0])}]}], "plain folder name"),
])
def test_bad_stage_files_are_refused_before_merging(models, tmp_path, docs, message):
    base, fts = models
    recipe = _write(tmp_path / "multi.yaml", docs(base, fts))
    with pytest.raises(MergelabError) as e:
        merge_stages(recipe, tmp_path / "out", intermediate_dir=tmp_path / "inter")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_runs_a_multistage_file(models, tmp_path):
    base, fts = models
    recipe = _write(tmp_path / "multi.yaml", _three_stages(base, fts))
    cmd = [sys.executable, "-m", "mergelab", "merge", str(recipe), str(tmp_path / "out"), "--quiet",
           "--intermediate-dir", str(tmp_path / "inter")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "final_mix: merged in" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and second.stdout.count("reused (unchanged)") == 3
