"""mergekit recipes without mergekit: parameter values (gradients, filters, precedence), the default semantics,
slices and passthrough frankenmerges, and the new methods against mergekit 0.1.5's worked examples
(ALGORITHMS-2 §13, numbers computed by running mergekit: /work/shared/reference/worked_examples_2_mergekit.py).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from mergelab import load_state_dict, merge, merge_state_dicts
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.methods import get_method
from mergelab.methods.settings import check_setting, evaluate_setting
from tests.recipe_helpers import make_llama

Q = "self_attn.q_proj.weight"
UP = "mlp.up_proj.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = make_llama(root / "base", 0)
    return base, make_llama(root / "a", 1, base=base), make_llama(root / "b", 2, base=base)


def write(tmp_path, recipe: dict, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def _ev(setting, name, t, kind=float):
    from mergelab.methods.registry import Param
    p = Param("x", kind, None, "", low=0.0, high=1.0) if kind is float else Param("x", kind, None, "")
    return evaluate_setting(name, check_setting(p, setting, "test"), t)


def test_settings_as_mergekit_evaluates_them():
    g = [0, 0.5, 1, 0.5, 0]
    assert [_ev(g, "x", t) for t in (0, 0.25, 0.5, 0.6, 1)] == pytest.approx([0, 0.5, 1.0, 0.8, 0])
    assert _ev([0.2, 1.0], "x", 0.3) == pytest.approx(0.44)
    flt = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]
    assert _ev(flt, "model.layers.3.self_attn.q_proj.weight", 0.75) == pytest.approx(0.75)
    assert _ev(flt, "model.layers.3.mlp.up_proj.weight", 0.75) == pytest.approx(0.25)
    assert _ev(flt, "model.embed_tokens.weight", 0.75) == 0.5
    assert _ev([True, False, True], "x", 0.6, bool) is False            # discrete lists take the floor
    assert _ev([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0.0) is None     # no match: next level
    assert _ev({"filter": "*", "value": 0.25}, "anything", 0.3) == 0.25
    with pytest.raises(MergelabError, match="must be in"):
        _ev([0, 1.5], "x", 0)                                           # each value range-checked
    with pytest.raises(MergelabError, match="must be"):
        _ev([{"filter": "mlp", "val": 1}], "x", 0)


def test_gradient_and_filtered_weights_per_layer(llama, tmp_path):
    """task_arithmetic (mergekit: lambda 1, no normalize): each layer's tensor = base + w(t) * delta, t = i/3."""
    base, a, _ = llama
    r = write(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                         "models": [{"model": str(a), "parameters": {
                             "weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": [1.0, 0.4]}]}}]})
    merge(r, tmp_path / "out")
    out, b, m = load_state_dict(tmp_path / "out"), load_state_dict(base), load_state_dict(a)
    for i in range(4):
        t = i / 3
        for key, w in ((f"model.layers.{i}.{UP}", t), (f"model.layers.{i}.{Q}", 1 - 0.6 * t)):
            exp = b[key] + (m[key] - b[key]) * torch.tensor(w, dtype=torch.float32)
            assert torch.allclose(out[key], exp, rtol=0, atol=1e-7), key
    # outside the layers t = 0: the catch-all's first value
    k = "model.embed_tokens.weight"
    assert torch.allclose(out[k], m[k], atol=1e-7)


def test_precedence_source_over_slice_over_top(llama, tmp_path):
    base, a, b = llama
    src = lambda p, lr, **params: {"model": str(p), "layer_range": lr, **({"parameters": params} if params else {})}
    r = write(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                         "parameters": {"weight": 0.1},
                         "slices": [{"sources": [src(base, [0, 2]), src(a, [0, 2], weight=0.9), src(b, [0, 2])]},
                                    {"sources": [src(base, [2, 4]), src(a, [2, 4]), src(b, [2, 4])],
                                     "parameters": {"weight": 0.5}}]})
    merge(r, tmp_path / "out")
    out = load_state_dict(tmp_path / "out")
    sb, sa, sbb = load_state_dict(base), load_state_dict(a), load_state_dict(b)
    for layer, (wa, wb) in enumerate([(0.9, 0.1), (0.9, 0.1), (0.5, 0.5), (0.5, 0.5)]):
        k = f"model.layers.{layer}.{Q}"
        exp = sb[k] + wa * (sa[k] - sb[k]) + wb * (sbb[k] - sb[k])
        assert torch.allclose(out[k], exp, atol=1e-6), (k, wa, wb)


def test_int8_mask_and_memory_switches_change_nothing(llama, tmp_path):
    base, a, b = llama
    rec = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(a), "parameters": {"density": 0.3}},
                      {"model": str(b), "parameters": {"density": 0.6}}]}
    merge(write(tmp_path, rec), tmp_path / "plain")
    rec["parameters"] = {"int8_mask": True}
    merge(write(tmp_path, rec, "i8.yaml"), tmp_path / "i8")
    x, y = load_state_dict(tmp_path / "plain"), load_state_dict(tmp_path / "i8")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_recipe_without_compat_means_mergekit_and_paper_is_one_switch_away(llama, tmp_path, capsys):
    base, a, b = llama
    rec = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [str(a), str(b)]}
    path = write(tmp_path, rec)
    assert main(["merge", str(path), str(tmp_path / "mk"), "--quiet"]) == 0
    assert "mergekit 0.1.5 semantics" in capsys.readouterr().out
    assert main(["merge", str(path), str(tmp_path / "pp"), "--quiet", "--compat", "paper"]) == 0
    assert "paper semantics" in capsys.readouterr().out
    merge(write(tmp_path, {**rec, "compat": "paper"}, "p.yaml"), tmp_path / "pp2")
    k = f"model.layers.1.{Q}"
    sb, sa, sbb = load_state_dict(base)[k], load_state_dict(a)[k], load_state_dict(b)[k]
    mk, pp, pp2 = (load_state_dict(tmp_path / d)[k] for d in ("mk", "pp", "pp2"))
    assert torch.allclose(mk, sb + (sa - sb) + (sbb - sb), atol=1e-6)           # mergekit: lambda 1.0
    assert torch.allclose(pp, sb + 0.3 * ((sa - sb) + (sbb - sb)), atol=1e-6)   # paper: lambda 0.3
    assert torch.equal(pp, pp2)
    # the in-memory API keeps the papers' semantics unless told
    sds = [load_state_dict(p) for p in (base, a, b)]
    assert torch.allclose(merge_state_dicts(sds[0], sds[1:], "task_arithmetic")[k], pp, atol=1e-6)


def test_unused_mergekit_parameters_ignored_and_noted_typos_refused(llama, tmp_path, capsys):
    base, a, b = llama
    rec = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(a), "parameters": {"weight": 0.5, "density": 0.5}}]}
    s = merge(write(tmp_path, rec), tmp_path / "o")
    assert any("density" in n for n in s.notes)
    rec["models"][0]["parameters"] = {"weight": 0.5, "densty": 0.5}
    with pytest.raises(MergelabError, match="unknown parameter 'densty'"):
        merge(write(tmp_path, rec, "typo.yaml"), tmp_path / "o2")
    # mergekit's old "pattern:" key is ignored by mergekit (the entry then matches every tensor): noted too
    rec = {"merge_method": "slerp", "base_model": str(base), "models": [str(a)],
           "parameters": {"t": [{"pattern": "self_attn", "value": [0, 1]}, {"value": 0.5}]}}
    s = merge(write(tmp_path, rec, "pat.yaml"), tmp_path / "o3")
    assert any("pattern" in n for n in s.notes)
    out, sa = load_state_dict(tmp_path / "o3"), load_state_dict(a)
    assert torch.equal(out[f"model.layers.3.{UP}"], sa[f"model.layers.3.{UP}"])      # t = 1 on the last layer
    with pytest.raises(MergelabError, match="pattern"):
        merge(write(tmp_path, {**rec, "compat": "paper"}, "pat2.yaml"), tmp_path / "o4")


def _mk(method, tensors, base_index=None, params=None, model_params=None):
    """One tensor merged under mergekit semantics; ``tensors`` in mergekit's order with the base at base_index."""
    base = tensors[base_index] if base_index is not None else None
    others = [t for i, t in enumerate(tensors) if i != base_index]
    out = merge_state_dicts({"w": base} if base is not None else None, [{"w": t} for t in others], method,
                            params or {}, model_params, compat="mergekit")
    return out["w"]


T = torch.tensor


def test_slerp_worked_examples():
    close = lambda x, y: torch.allclose(x, T(y, dtype=torch.float32), atol=1e-6)
    assert close(_mk("slerp", [T([2., 0, 0]), T([0., 1, 0])], 0, {"t": 0.5}), [1.414214, 0.707107, 0])
    eye, swap = T([[1., 0], [0, 1]]), T([[0., 1], [1, 0]])
    assert close(_mk("slerp", [eye, swap], 0, {"t": 0.25}), [[0.923880, 0.382683], [0.382683, 0.923880]])
    assert close(_mk("slerp", [T([1., 2]), T([2., 4])], 0, {"t": 0.5}), [1.5, 3.0])             # colinear: lerp
    assert close(_mk("slerp", [T([1., 2]), T([-1., -2])], 0, {"t": 0.3}), [0.4, 0.8])           # antipodal: lerp
    assert close(_mk("slerp", [T([0., 0]), T([3., 4])], 0, {"t": 0.5}), [2.121320, 2.828427])   # zero: not lerp
    assert torch.equal(_mk("slerp", [T([2., 0, 0]), T([0., 1, 0])], 0, {"t": 0.0}), T([2., 0, 0]))


def test_spherical_and_other_mergekit_methods_worked_examples():
    close = lambda x, y: torch.allclose(x, T(y, dtype=torch.float32), atol=1e-5)
    x, y = T([[1., 0], [0, 2]]), T([[0., 1], [2, 0]])
    assert close(_mk("nuslerp", [x, y], None, {}, [{"weight": 1.0}, {"weight": 3.0}]),
                 [[0.382683, 0.923880], [1.847759, 0.765367]])
    x2, y2 = T([[1., 0], [1, 0]]), T([[0., 1], [1, 0]])
    assert close(_mk("nuslerp", [x2, y2], None, {"nuslerp_flatten": True}), [[0.577350, 0.577350], [1.154701, 0]])
    assert close(_mk("nuslerp", [x2, y2], None, {"nuslerp_flatten": False}), [[0.707107, 0.707107], [1.0, 0]])
    assert close(_mk("nuslerp", [x2, y2], None, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
                 [[0.541196, 0.707107], [1.082392, 0]])
    ones = torch.ones(2, 2)
    assert close(_mk("nuslerp", [ones, x + ones, y + ones], 0), [[1.707107, 1.707107], [2.414214, 2.414214]])
    e = [T([1., 0, 0]), T([0., 1, 0]), T([0., 0, 2])]
    assert close(_mk("multislerp", e), [0.769800] * 3)
    assert close(_mk("multislerp", [T([1., 0]), T([0., 2])], None, {}, [{"weight": 1.0}, {"weight": 3.0}]),
                 [0.553399, 1.660196])
    assert close(_mk("multislerp", [T([1., 0]), T([-1., 0])]), [0, 0])
    assert close(_mk("karcher", e), [0.769800] * 3)
    assert close(_mk("karcher", [T([2., 0, 0]), T([0., 1, 0])]), [1.060660, 1.060660, 0])
    assert close(_mk("karcher", [T([1., 0]), T([0., 0])]), [0.5, 0])
    tv = [T([0.9, -0.1, 0.3, -0.6, 0.05]), T([-0.4, 0.2, 0.8, 0.7, -0.02]), T([0.5, -0.3, -0.1, 0.2, 0.01])]
    z = torch.zeros(5)
    assert close(_mk("sce", [z, *tv], 0), [0.806147, -0.146927, 0.555561, 0.586632, 0.040615])
    assert close(_mk("sce", [z, *tv], 0, {"select_topk": 0.4}), [0.820548, 0, 0, 0.545745, 0])
    assert close(_mk("nearswap", [T([0., 0, 0, 1]), T([0.0005, 0.002, 0.1, 1.0])], 0, {"t": 0.001}),
                 [0.0005, 0.001, 0.001, 1.0])
    assert close(_mk("arcee_fusion", [torch.zeros(1, 8), T([[.01, .02, .03, .04, .05, .06, .07, 2.0]])], 0),
                 [[0, 0, 0, 0, 0, 0, 0, 2.0]])
    r1, r2 = T([0.2, 0.0, 0.4, 0.000001]), T([0.4, 0.3, 0.0, 0.0])
    assert close(_mk("ram", [torch.zeros(4), r1, r2], 0), [0.3, 0.3, 0.4, 0])
    assert close(_mk("ramplus_tl", [torch.zeros(4), r1, r2], 0), [0.3, 0.306, 0.408, 0])
    assert close(_mk("ramplus_tl", [torch.zeros(4), r1, r2], 0, {"r": 0.5, "alpha": 1.0}), [0.3, 0.45, 0.6, 0])
    assert close(_mk("passthrough", [T([1., 2])], None, {}, [{"scale": 0.5}]), [0.5, 1.0])
    assert close(_mk("ties", [z, *tv], 0, {}, [{"density": 0.4}] * 3), [0.7, -0.3, 0.8, 0.7, 0])


def test_della_probabilities_rescale_and_blocks():
    from mergelab.methods.della import magprune_probabilities
    p = magprune_probabilities(T([[0.9, -0.1, 0.3, -0.6, 0.05]]), 0.5, 0.2)
    assert torch.allclose(p, T([[0.7, 0.4, 0.5, 0.6, 0.3]]), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 512, generator=g)
    ft = base + 0.01 * torch.randn(256, 512, generator=g)
    out = merge_state_dicts({"w": base}, [{"w": ft}], "della_linear", {}, [{"density": 0.4, "epsilon": 0.1}],
                            compat="mergekit")["w"]
    d, dd = ft - base, out - base
    assert abs(float((dd != 0).float().mean()) - 0.4) < 0.01                  # kept fraction = density
    assert math.isclose(float(dd.abs().sum()), float(d.abs().sum()), rel_tol=1e-4)   # L1 norm kept (rescale)
    kept = dd != 0
    # larger magnitudes kept more often (p from d - eps to d + eps by rank within the row)
    big = d.abs() > d.abs().median(dim=1, keepdim=True).values
    assert float(kept[big].float().mean()) > float(kept[~big].float().mean()) + 0.05
    blocked = merge_state_dicts({"w": base}, [{"w": ft}], "della_linear", {}, [{"density": 0.4, "epsilon": 0.1}],
                                compat="mergekit", block_elements=512 * 16)["w"]
    assert abs(float((blocked - base).abs().sum()) - float(d.abs().sum())) < 1e-3 * float(d.abs().sum())
    with pytest.raises(MergelabError, match="epsilon"):
        merge_state_dicts({"w": base}, [{"w": ft}], "della", {}, [{"density": 0.9}], compat="mergekit")


def test_slerp_blocks_match_whole_tensor():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 128, generator=g), torch.randn(300, 128, generator=g)
    whole = merge_state_dicts({"w": a}, [{"w": b}], "slerp", {"t": 0.3}, compat="mergekit")["w"]
    blocks = merge_state_dicts({"w": a}, [{"w": b}], "slerp", {"t": 0.3}, compat="mergekit",
                               block_elements=128 * 32)["w"]
    assert torch.allclose(whole, blocks, rtol=1e-5, atol=1e-6)


def test_passthrough_frankenmerge_renumbers_layers_and_loads(llama, tmp_path):
    from transformers import AutoModelForCausalLM
    base, a, b = llama
    rec = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                      {"sources": [{"model": str(b), "layer_range": [2, 4],
                                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}]}]}
    s = merge(write(tmp_path, rec), tmp_path / "fr")
    out, sa, sb = load_state_dict(tmp_path / "fr"), load_state_dict(a), load_state_dict(b)
    assert json.loads((tmp_path / "fr" / "config.json").read_text())["num_hidden_layers"] == 5
    assert s.tensors == len(out) == 3 + 5 * 9
    for out_layer, (sd, src_layer) in enumerate([(sa, 0), (sa, 1), (sa, 2), (sb, 2), (sb, 3)]):
        assert torch.equal(out[f"model.layers.{out_layer}.{UP}"], sd[f"model.layers.{src_layer}.{UP}"])
        o = f"model.layers.{out_layer}.self_attn.o_proj.weight"
        assert torch.equal(out[o], sd[o.replace(f".{out_layer}.", f".{src_layer}.")] * (0.0 if sd is sb else 1.0))
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])    # first slice
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"])                          # last slice
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fr", attn_implementation="eager")
    assert len(model.model.layers) == 5


def test_layer_indexed_config_lists_follow_the_slices(tmp_path):
    from mergelab.engine.slices import _fix_config
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"],
                               "text_config": {"num_hidden_layers": 4, "sliding": [0, 1, 0, 1]}}))
    _fix_config(cfg, None, [0, 1, 2, 1, 2, 3], 4)
    c = json.loads(cfg.read_text())
    assert c["num_hidden_layers"] == 6 and c["layer_types"] == ["a", "b", "c", "b", "c", "d"]
    assert c["text_config"] == {"num_hidden_layers": 6, "sliding": [0, 1, 0, 1, 0, 1]}


@pytest.mark.parametrize("slices,match", [
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}], "same number"),
    ([{"sources": [{"model": "A", "layer_range": [0, 9]}, {"model": "B", "layer_range": [0, 9]}]}], "goes past"),
    ([{"sources": [{"model": "B", "layer_range": [0, 2]}, {"model": "B", "layer_range": [2, 4]}]}], "twice"),
    ([{"sources": [{"model": "B", "layer_range": [2, 1]}]}], "layer_range"),
])
def test_bad_slices_one_clear_error(llama, tmp_path, slices, match):
    base, a, b = llama
    names = {"A": str(a), "B": str(b)}
    for sl in slices:
        for s in sl["sources"]:
            s["model"] = names[s["model"]]
    rec = {"merge_method": "slerp", "base_model": str(a), "slices": slices, "parameters": {"t": 0.5}}
    with pytest.raises(MergelabError, match=match):
        merge(write(tmp_path, rec), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_slerp_slice_needs_its_base_among_sources(llama, tmp_path):
    base, a, b = llama
    rec = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
           "slices": [{"sources": [{"model": str(a), "layer_range": [0, 4]},
                                   {"model": str(b), "layer_range": [0, 4]}]}]}
    with pytest.raises(MergelabError, match="base model"):
        merge(write(tmp_path, rec), tmp_path / "o")


def test_methods_listing_has_formulas_without_torch():
    import subprocess
    import sys
    code = ("import sys; from mergelab.cli import main; main(['methods']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("slerp", "nuslerp", "multislerp", "karcher", "della", "della_linear", "sce", "nearswap",
                 "arcee_fusion", "ram", "ramplus_tl", "passthrough"):
        assert f"\n{name} " in out, name
    assert "formula: theta = angle(base, m)" in out
    assert get_method("della").param("epsilon").default == 0.15
