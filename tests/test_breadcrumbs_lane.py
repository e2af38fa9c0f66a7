"""breadcrumbs and breadcrumbs_ties in the torch-free lane: the torch engine's folder byte for byte, mergekit's
weights bit for bit, mergekit's choice among magnitudes tied at a band's limit, NaN / Inf named, without torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from mergelab import kernels as K
from mergelab.engine import load_recipe
from mergelab.engine.linear_lane import plan_lane, run_lane
from mergelab.kernels.numpy_consensus import keep_band_, zero_above_
from tests.helpers import make_model_folders, write_recipe
from tests.test_linear_lane import (_files, _with_int_buffer, assert_cli_names_bad_input, assert_cli_runs_without_torch,
                                    assert_lane_equals_mergekit, lane_and_engine, poison)
from tests.test_ties_lane import _quantize, _raw_folders

METHODS = ["breadcrumbs", "breadcrumbs_ties"]


CASES = [
    # n, (weight, keep, top_remove) per model, lambda, normalize, exact, input dtype, recipe dtype, out dtype, tied
    (3, [(1.0, 0.1, 0.01), (1.0, 0.1, 0.01), (1.0, 0.1, 0.01)], 1.0, False, True, torch.float32, "float32", None, True),
    (3, [(1.0, 0.3, 0.05), (0.5, 0.6, 0.0), (-0.4, 1.0, 0.2)], 0.8, True, True, torch.float32, None, None, True),
    (2, [(0.7, 0.9, 0.3), (0.3, 0.05, 0.5)], 1.3, False, True, torch.float32, None, "bfloat16", True),   # keep+gamma>1
    (4, [(0.25, 0.4, 0.1), (0.0, 0.3, 0.0), (1.5, 0.2, 0.02), (1.0, 0.5, 0.5)], 0.5, True, True, torch.float32,
     "float32", None, False),
    (1, [(0.9, 0.3, 0.1)], 1.0, True, False, torch.float32, "float32", "float16", True),
    (2, [(0.6, 0.4, 0.1), (-0.6, 0.4, 0.1)], 1.0, True, True, torch.float32, "float32", None, True),   # weights cancel
    (3, [(1.0, 0.3, 0.01), (1.0, 0.2, 0.05), (1.0, 0.5, 0.0)], 1.0, True, True, torch.bfloat16, "float32", "bfloat16",
     False),
    (2, [(1.0, 0.25, 0.02), (0.5, 0.5, 0.1)], 1.0, False, True, torch.float64, "float32", None, False),
]
IDS = ["default", "mixed", "band-past-one-bf16-out", "four-models", "one-model-alltied", "weights-cancel", "bf16-in",
       "f64-in"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("blocks", [None, 1_000], ids=["whole", "blocked"])
def test_breadcrumbs_lane_writes_the_engines_folder_byte_for_byte(tmp_path, method, case, blocks):
    n, wkg, lam, normalize, exact, dtype, recipe_dtype, out_dtype, tied = case
    base, models = make_model_folders(tmp_path / "m", n=n, dtype=dtype)
    if tied:
        _quantize([base, *models])
    _with_int_buffer([base, *models])
    extra = {"compat": "mergekit", **({"dtype": recipe_dtype} if recipe_dtype else {}),
             **({"out_dtype": out_dtype} if out_dtype else {})}
    recipe = write_recipe(tmp_path / "r.yaml", base, models, method,
                          {"lambda": lam, "normalize": normalize, "exact_ties": exact},
                          [{"weight": w, "density": k, "gamma": g} for w, k, g in wkg], **extra)
    kw = {"shard_size": 40_000, **({"block_elements": blocks} if blocks else {})}
    lane, engine = lane_and_engine(tmp_path, recipe, method, **kw)
    assert lane.keys() == engine.keys()
    for name in lane:
        assert lane[name] == engine[name], name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("levels", [3, 4000], ids=["tied", "spread"])
def test_breadcrumbs_lane_large_tensors_whole_blocked_and_in_pieces(tmp_path, method, levels, monkeypatch):
    """Past the sampled selection's size, in the engine's blocks (streamed limits, two per model), and past the
    memory the lane holds (bands one task vector at a time, the mix in pieces): the engine's bytes."""
    import mergelab.engine.linear_lane as lane_module
    base, models = _raw_folders(tmp_path, {"big": (640, 512), "vec": (150_001,), "small": (30, 7)}, 3, levels)
    recipe = write_recipe(tmp_path / "r.yaml", base, models, method, {"normalize": True},
                          [{"weight": 1.0, "density": 0.2, "gamma": 0.01}, {"weight": 0.6, "density": 0.35,
                           "gamma": 0.1}, {"weight": 0.3, "density": 0.7, "gamma": 0.0}], compat="mergekit")
    for blocks in (None, 200_000):
        kw = {"block_elements": blocks} if blocks else {}
        lane, engine = lane_and_engine(tmp_path / f"b{blocks}", recipe, method, **kw)
        assert lane == engine
    monkeypatch.setattr(lane_module, "HOLD_BYTES", 0)
    monkeypatch.setattr(lane_module, "LANE_BLOCK_ELEMENTS", 7_777)
    run_lane(plan_lane(load_recipe(recipe)), tmp_path / "pieces")
    assert _files(tmp_path / "pieces") == _files(tmp_path / "bNone" / "torch")


def test_the_band_tie_choice_matters_on_this_data(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=2)
    _quantize([base, *models])
    outs = {}
    for exact in (True, False):
        recipe = write_recipe(tmp_path / f"r{exact}.yaml", base, models, "breadcrumbs", {"exact_ties": exact},
                              [{"density": 0.2, "gamma": 0.05}, {"density": 0.3, "gamma": 0.02}], compat="mergekit")
        run_lane(plan_lane(load_recipe(recipe)), tmp_path / f"lane{exact}")
        outs[exact] = load_file(tmp_path / f"lane{exact}" / "model.safetensors")
    assert any(not torch.equal(outs[True][k], outs[False][k]) for k in outs[True])


_VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 3e38, -3e38, 1e-30, float("nan"), float("inf"),
                           float("-inf")])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), size=st.integers(1, 300),
       low=st.sampled_from([None, 0.0, 0.5, 1.0, float("inf"), -1.0]),
       high=st.sampled_from([None, 0.0, 0.5, 1.0, 3e38, float("inf"), -1.0]))
def test_numpy_band_is_the_torch_kernel_bit_for_bit(data, size, low, high):
    x = np.array([data.draw(_VALUES) for _ in range(size)], dtype=np.float32)
    expected = K.keep_band(torch.from_numpy(x.copy()), low, high).numpy()
    got = keep_band_(x.copy(), low, high)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    if high is not None:
        assert np.array_equal(zero_above_(x.copy(), high).view(np.uint32),
                              K.zero_above(torch.from_numpy(x.copy()), high).numpy().view(np.uint32))


def test_cli_breadcrumbs_runs_without_torch_and_names_bad_inputs(tmp_path, monkeypatch):
    """With the sort check's verdict stored, a CLI breadcrumbs merge never imports torch; an Inf input (which the
    band turns into NaN) and a NaN in a model whose band is empty get the engine's line, exit 2, nothing written."""
    from mergelab.kernels import cpu_sort as CS
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    CS.torch_sort_matches.cache_clear()
    CS.replay_trusted.cache_clear()
    try:
        assert CS.torch_sort_matches()
    finally:
        CS.torch_sort_matches.cache_clear()
        CS.replay_trusted.cache_clear()
    base, models = make_model_folders(tmp_path / "m", n=3)
    _quantize([base, *models])
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "breadcrumbs_ties", None,
                          [{"density": 0.2, "gamma": 0.01}, {"density": 0.3, "gamma": 0.1},
                           {"weight": 0.5, "density": 0.5}], compat="mergekit")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    assert_cli_runs_without_torch(tmp_path, recipe, "breadcrumbs_ties", env)
    for keep, value in ((0.5, float("inf")), (0.0, float("nan"))):
        name = poison(models[2], value)
        bad = write_recipe(tmp_path / "r-bad.yaml", base, models, "breadcrumbs", None,
                           [{"density": 0.2}, {"density": 0.3}, {"density": keep}], compat="mergekit")
        assert_cli_names_bad_input(tmp_path, bad, models[2], name, env)


def test_what_the_breadcrumbs_lane_leaves_to_the_torch_engine(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=5)

    def plan(method="breadcrumbs", ms=models[:2], params=None, model_params=None, **extra):
        extra.setdefault("compat", "mergekit")
        r = write_recipe(tmp_path / "r.yaml", base, ms, method, params, model_params, **extra)
        return plan_lane(load_recipe(r))

    bands = [{"density": 0.3, "gamma": 0.01}, {"density": 0.5}]
    assert plan(model_params=bands) is not None and plan("breadcrumbs_ties", model_params=bands) is not None
    assert plan(model_params=bands, compat="paper") is None          # the paper's per-row band
    assert plan(model_params=bands, dtype="bfloat16") is None         # half-precision arithmetic
    assert plan(ms=models) is None                                    # more than 4 models
    assert plan(model_params=[{"density": [0.2, 0.8]}, {"density": 0.5}]) is None     # a gradient


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_breadcrumbs_lane_equals_mergekit(tmp_path, method, dtype):
    """mergekit 0.1.5 itself (skips without its virtualenv): bit for bit, tied magnitudes included."""
    from tests.recipe_helpers import make_llama, mergekit_exe
    mergekit_exe()
    base = make_llama(tmp_path / "base", 0, dtype=dtype)
    a = make_llama(tmp_path / "a", 1, dtype=dtype, base=base)
    b = make_llama(tmp_path / "b", 2, dtype=dtype, base=base)
    recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 0.6, "density": 0.3, "gamma": 0.02}},
                         {"model": str(b), "parameters": {"weight": 0.45, "density": 0.5, "gamma": 0.1}}],
              "parameters": {"normalize": True}}
    assert_lane_equals_mergekit(tmp_path, recipe)
