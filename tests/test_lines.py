"""LiNeS: block indices from names, the per-layer scales (worked example 15.6) and the engine's option."""
import pytest
import torch

from mergelab.engine.streaming import merge_state_dicts
from mergelab.errors import MergelabError
from mergelab.methods.lines import (apply_lines, block_index, layer_scales, lines_lambdas, multitask_alpha,
                                    resolve_lines)


def test_block_index_from_names():
    assert block_index("encoder.layer.3.attention.self.query.weight") == 3
    assert block_index("model.layers.11.mlp.up_proj.weight") == 11
    assert block_index("transformer.h.0.attn.c_attn.weight") == 0
    assert block_index("visual.transformer.resblocks.10.mlp.c_fc.weight") == 10
    assert block_index("encoder.layer.2.output.dense.0.weight") == 2     # a Sequential index is not a block
    assert block_index("embeddings.word_embeddings.weight") is None
    assert block_index("blocks.1.weight", r"blocks\.(\d+)") == 1


def test_worked_example_lambdas_and_multitask_alpha():
    lam = lines_lambdas(0.3, 0.5, 12)
    ref = [0.3, 0.3455, 0.3909, 0.4364, 0.4818, 0.5273, 0.5727, 0.6182, 0.6636, 0.7091, 0.7545, 0.8]
    assert [round(x, 4) for x in lam] == ref
    # tau_1=[1,-2,0], tau_2=[1,2,1], tau_MTL=[1,0,0.5] -> (3 / 1.5) / 2 = 1
    assert multitask_alpha(3.0, 1.5, 2) == 1.0


def test_every_tensor_is_scaled_by_its_block():
    names = ["emb.weight", "encoder.layer.0.a.weight", "encoder.layer.1.a.weight", "encoder.layer.2.a.weight",
             "pooler.weight"]
    base = {n: torch.zeros(2) for n in names}
    merged = {n: torch.tensor([1.0, -2.0]) for n in names}
    out = apply_lines(base, merged, {"alpha": 0.2, "beta": 0.6})
    expect = {"emb.weight": 0.2, "encoder.layer.0.a.weight": 0.2, "encoder.layer.1.a.weight": 0.5,
              "encoder.layer.2.a.weight": 0.8, "pooler.weight": 0.2}
    for n, s in expect.items():
        assert torch.allclose(out[n], s * merged[n]), n
    scales = layer_scales(resolve_lines({"alpha": 0.2, "beta": 0.6, "num_blocks": 5}), names)
    assert scales["encoder.layer.2.a.weight"] == pytest.approx(0.2 + 0.6 * 2 / 4)


def _tiny(seed):
    g = torch.Generator().manual_seed(seed)
    names = ["embeddings.weight"] + [f"encoder.layer.{i}.dense.weight" for i in range(3)] + ["head.bias"]
    return {n: torch.randn(4, 3, generator=g) if "weight" in n else torch.randn(3, generator=g) for n in names}


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda": 1.0}), ("ties", {"lambda": 1.0})])
def test_engine_option_equals_post_processing(method, params):
    base, models = _tiny(0), [_tiny(1), _tiny(2)]
    plain = merge_state_dicts(base, models, method, params)
    tvs = [{k: m[k] - base[k] for k in base} for m in models]
    for cfg in ({"alpha": 0.4, "beta": 0.3}, {"beta": 0.5}):
        got = merge_state_dicts(base, models, method, params, lines=cfg)
        want = apply_lines(base, plain, cfg, tvs)
        for k in base:
            assert torch.allclose(got[k], want[k], atol=1e-6), (cfg, k)
    # alpha auto with task arithmetic (tau_MTL = sum): the first block gets the plain average
    got = merge_state_dicts(base, models, "task_arithmetic", {"lambda": 1.0}, lines={"beta": 0.5})
    avg = (models[0]["embeddings.weight"] + models[1]["embeddings.weight"]) / 2
    assert torch.allclose(got["embeddings.weight"], avg, atol=1e-6)
    deep = base["encoder.layer.2.dense.weight"] + 1.0 * (tvs[0]["encoder.layer.2.dense.weight"]
                                                         + tvs[1]["encoder.layer.2.dense.weight"])
    assert torch.allclose(got["encoder.layer.2.dense.weight"], deep, atol=1e-6)   # 1/2 + 0.5 = 1


def test_bad_lines_options_are_one_clear_error():
    for bad, msg in [({"alpha": 1}, "beta is required"), ({"beta": "x"}, "finite number"),
                     ({"beta": 1, "depth": 2}, "unknown key"), ({"beta": 1, "block_pattern": "("}, "regular"),
                     ({"beta": 1, "block_pattern": "a"}, "one group"), ([1], "mapping")]:
        with pytest.raises(MergelabError, match=msg):
            resolve_lines(bad)
    with pytest.raises(MergelabError, match="does not merge them against a base"):
        merge_state_dicts(None, [_tiny(1), _tiny(2)], "average", lines={"beta": 0.5})


def test_recipe_lines_key(tmp_path):
    from mergelab.engine.recipe import load_recipe
    (tmp_path / "a").mkdir()                   # recipe paths must exist
    r = load_recipe({"base_model": str(tmp_path), "models": [str(tmp_path / "a")], "merge_method": "ties",
                     "lines": {"beta": 0.5}})
    assert r.lines is not None and r.lines.alpha is None and "lines" not in r.extra
    with pytest.raises(MergelabError, match="lines.beta"):
        load_recipe({"base_model": str(tmp_path), "models": [str(tmp_path / "a")], "merge_method": "ties",
                     "lines": {"alpha": 0.5}})


def test_streaming_merge_with_lines_and_row_blocks(tmp_path):
    """The on-disk path (recipe key) merges tensors block by block; the result is LiNeS of the plain merge."""
    from safetensors.torch import load_file

    from tests.helpers import make_model_folders, write_recipe
    from mergelab.engine.streaming import merge
    from mergelab.io import load_state_dict
    base, fts = make_model_folders(tmp_path, n=2)
    plain = write_recipe(tmp_path / "a.yaml", base, fts, "task_arithmetic", {"lambda": 1.0})
    merge(plain, tmp_path / "plain", block_elements=256)
    rec = write_recipe(tmp_path / "b.yaml", base, fts, "task_arithmetic", {"lambda": 1.0}, lines={"beta": 0.7})
    merge(rec, tmp_path / "lines", block_elements=256)
    b = load_state_dict(str(base))
    tvs = [{k: v - b[k] for k, v in load_state_dict(str(f)).items() if v.is_floating_point()} for f in fts]
    want = apply_lines(b, load_file(str(tmp_path / "plain" / "model.safetensors")), {"beta": 0.7}, tvs)
    got = load_file(str(tmp_path / "lines" / "model.safetensors"))
    for k in got:
        assert torch.allclose(got[k], want[k], atol=1e-5), k
