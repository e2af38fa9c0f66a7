"""Model references: ``model+lora`` applied on the fly, hub ids and ``@revision`` from the local HF cache."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertModel

from mergelab import load_state_dict, merge, merge_state_dicts
from mergelab.errors import MergelabError

from tests.helpers import make_model_folders


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    base, fts = make_model_folders(root, n=2)
    model = get_peft_model(BertModel.from_pretrained(base), LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "adapter")
    return root, base, fts, root / "adapter"


def _recipe(path, base, models, **params):
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                    "models": [{"model": m} for m in models], "parameters": params or {"lambda": 1.0}}))
    return path


def test_model_plus_lora_equals_the_adapter_merged_into_that_model(world, tmp_path):
    root, base, fts, adapter = world
    recipe = _recipe(tmp_path / "r.yaml", base, [f"{fts[0]}+{adapter}", str(fts[1])], **{"lambda": 0.5})
    merge(recipe, tmp_path / "out")
    with_lora = PeftModel.from_pretrained(BertModel.from_pretrained(fts[0]), adapter).merge_and_unload()
    expected = merge_state_dicts(load_state_dict(base), [with_lora.state_dict(), load_state_dict(fts[1])],
                                 method="task_arithmetic", params={"lambda": 0.5})
    got = load_state_dict(tmp_path / "out")
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name
    assert "+" in (tmp_path / "out" / "README.md").read_text()       # the card names the reference as given


def _fake_cache(root, repo, revisions):
    """A Hugging Face cache layout: refs/<name> -> commit, snapshots/<commit>/ with the model files."""
    folder = root / ("models--" + repo.replace("/", "--"))
    for name, (commit, source) in revisions.items():
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / name).write_text(commit)
        shutil.copytree(source, folder / "snapshots" / commit)
    return folder


def test_hub_ids_and_revisions_come_from_the_local_cache(world, tmp_path, monkeypatch):
    root, base, fts, adapter = world
    _fake_cache(tmp_path / "hub", "acme/tiny-ft", {"main": ("a" * 40, fts[0]), "v2": ("b" * 40, fts[1])})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    merge(_recipe(tmp_path / "r1.yaml", base, ["acme/tiny-ft"]), tmp_path / "main")
    merge(_recipe(tmp_path / "r2.yaml", base, ["acme/tiny-ft@v2"]), tmp_path / "v2")
    merge(_recipe(tmp_path / "r3.yaml", base, ["acme/tiny-ft@bbbb"]), tmp_path / "prefix")
    for out, src in (("main", fts[0]), ("v2", fts[1]), ("prefix", fts[1])):
        got, want = load_state_dict(tmp_path / out), load_state_dict(src)
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want), out


@pytest.mark.parametrize("ref, message", [
    ("acme/tiny-ft@v9", "revision 'v9' of 'acme/tiny-ft' is not in the cache"),
    ("acme/other", "neither a local path nor in the Hugging Face cache"),
    ("acme/tiny-ft@a@b", "more than one '@'"),
])
def test_missing_references_are_one_clear_error(world, tmp_path, monkeypatch, ref, message):
    root, base, fts, adapter = world
    _fake_cache(tmp_path / "hub", "acme/tiny-ft", {"main": ("a" * 40, fts[0])})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MergelabError) as e:
        merge(_recipe(tmp_path / "r.yaml", base, [ref]), tmp_path / "out")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()
