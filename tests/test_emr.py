"""EMR-Merging: the worked example, exact reconstruction, bit packing and the folder round trip."""
import json

import pytest
import torch

from mergelab.errors import MergelabError
from mergelab.methods.emr import emr_merge
from mergelab.upscale.emr import (emr_from_state_dicts, load_emr, load_emr_result, load_emr_state_dict, pack_mask,
                                  save_emr, unpack_mask)

TV = torch.tensor([[0.9, -0.1, 0.3, -0.6, 0.05], [-0.4, 0.2, 0.8, 0.7, -0.02], [0.5, -0.3, -0.1, 0.2, 0.01]])


def test_worked_example():
    r = emr_merge([{"w": TV[t]} for t in range(3)])
    assert torch.allclose(r.unified["w"], torch.tensor([0.9, -0.3, 0.8, 0.7, 0.05]))
    assert [r.masks[t]["w"].int().tolist() for t in range(3)] == [[1, 1, 1, 0, 1], [0, 0, 1, 1, 0], [1, 1, 0, 1, 1]]
    assert r.rescalers == pytest.approx([0.951219, 1.413333, 0.569231], abs=1e-6)
    assert torch.allclose(r.task_vector(1)["w"], torch.tensor([0, 0, 1.130667, 0.989333, 0]), atol=1e-6)


def test_exact_reconstruction_when_masks_and_rescalers_are_exact():
    """Task vectors on disjoint supports: tau_uni holds each one, M_t is its support, lam_t = 1."""
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g), "ids": torch.arange(3)}
    owner = torch.randint(0, 3, (6, 4), generator=g)
    owner_b = torch.randint(0, 3, (6,), generator=g)
    fts = []
    for t in range(3):
        d = torch.randn(6, 4, generator=g) * (owner == t)
        db = torch.randn(6, generator=g) * (owner_b == t)
        fts.append({"a": base["a"] + d, "b": base["b"] + db, "ids": base["ids"]})
    r = emr_from_state_dicts(base, fts)
    assert r.rescalers == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    for t in range(3):
        sd = r.task_state_dict(base, t)
        for k in ("a", "b"):
            assert torch.allclose(sd[k], fts[t][k], atol=1e-6)
        assert torch.equal(sd["ids"], base["ids"])


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 2, 2), ()])
def test_bit_packing_round_trip(shape):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
    p = pack_mask(m)
    assert p.dtype == torch.uint8 and p.numel() == (max(m.numel(), 1) + 7) // 8
    assert torch.equal(unpack_mask(p, list(shape)), m)


def test_folder_round_trip_with_a_real_model(tmp_path):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     vocab_size=50, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    base = model.state_dict()
    g = torch.Generator().manual_seed(3)
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
           for _ in range(2)]
    r = emr_from_state_dicts(base, fts)
    folder = tmp_path / "emr"
    model.config.save_pretrained(tmp_path / "src")
    info = save_emr(folder, base, r, ["sst2", "mnli"], model_folder=tmp_path / "src", model_class="BertModel")
    n_float = sum(v.numel() for v in base.values() if v.is_floating_point())
    assert n_float / 8 <= info["extra_bytes_per_task"][0] <= n_float / 8 + len(r.unified) + 4
    meta = json.loads((folder / "emr_config.json").read_text())
    assert meta["tasks"] == ["sst2", "mnli"]
    b2, r2, _ = load_emr_result(folder)
    for t, name in enumerate(["sst2", "mnli"]):
        want = r.task_state_dict(base, t)
        got = load_emr_state_dict(folder, name)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(r2.masks[t][k], r.masks[t][k]) for k in r.masks[t])
        loaded = load_emr(folder, t)
        assert type(loaded).__name__ == "BertModel"
        assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)
    with pytest.raises(MergelabError, match="no task 'qqp'"):
        load_emr_state_dict(folder, "qqp")
    with pytest.raises(MergelabError, match="already exists"):
        save_emr(folder, base, r)
    with pytest.raises(MergelabError, match="not an EMR folder"):
        load_emr(tmp_path / "src", 0)


def test_cli_writes_a_folder_that_loads_per_task(tmp_path, capsys):
    from mergelab.cli import main
    from mergelab.io import load_state_dict
    from tests.helpers import make_model_folders, write_recipe
    base, fts = make_model_folders(tmp_path, n=2)
    rec = write_recipe(tmp_path / "r.yaml", base, fts, "emr")
    assert main(["emr", str(rec), str(tmp_path / "out")]) == 0
    assert "extra per task" in capsys.readouterr().out
    b = load_state_dict(str(base))
    r = emr_from_state_dicts(b, [load_state_dict(str(f)) for f in fts])
    model = load_emr(tmp_path / "out", "ft2")
    want = r.task_state_dict(b, 1)
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    assert main(["emr", str(rec), str(tmp_path / "out")]) == 2          # exists: one line, exit 2
    assert "already exists" in capsys.readouterr().err
