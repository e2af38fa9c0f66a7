"""TIES in the torch-free lane: the torch engine's folder byte for byte, mergekit's weights, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergelab import kernels as K
from mergelab.engine import load_recipe, merge
from mergelab.engine.linear_lane import plan_lane, run_lane
from mergelab.kernels import band_select as BS
from mergelab.kernels import cpu_sort as CS
from mergelab.kernels.numpy_consensus import consensus_mix, zero_below_
from tests.helpers import make_model_folders, write_recipe
from tests.test_linear_lane import (_PROBE, _files, _with_int_buffer, assert_cli_names_bad_input,
                                    assert_cli_runs_without_torch, assert_lane_equals_mergekit, lane_and_engine, poison)

ROOT = Path(__file__).resolve().parents[1]


def _quantize(folders: list[Path], step: float = 2.0 ** -9, levels: int = 6, seed: int = 0) -> None:
    """Task vectors of a few levels (multiples of ``step``): magnitudes tie at every trim cut, as in
    half precision and in many float32 deltas."""
    base = load_file(folders[0] / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for f in folders[1:]:
        sd = {k: (v + step * torch.randint(-levels, levels + 1, v.shape, generator=g).to(v.dtype))
              if v.is_floating_point() else v for k, v in base.items()}
        save_file(sd, f / "model.safetensors", metadata={"format": "pt"})


CASES = [
    # n, (weight, density) per model, lambda, normalize, exact, input dtype, recipe dtype, out dtype, quantized
    (3, [(1.0, 0.2), (1.0, 0.2), (1.0, 0.2)], 1.0, True, True, torch.float32, "float32", None, True),
    (3, [(1.0, 0.3), (0.5, 0.1), (-0.4, 1.0)], 0.8, True, True, torch.float32, "float32", None, True),
    (2, [(0.7, 0.5), (0.3, 0.05)], 1.3, False, True, torch.float32, None, "bfloat16", True),
    (4, [(0.25, 0.4), (0.0, 0.3), (1.5, 0.9), (1.0, 0.2)], 0.5, True, True, torch.float32, "float32", None, False),
    (1, [(0.9, 0.3)], 1.0, True, True, torch.float32, "float32", "float16", True),
    (3, [(1.0, 0.2), (1.0, 0.2), (1.0, 0.2)], 1.0, True, False, torch.float32, "float32", None, True),
    (2, [(0.6, 0.4), (-0.6, 0.4)], 1.0, True, True, torch.float32, "float32", None, True),    # weights sum to 0
    (3, [(1.0, 0.3), (1.0, 0.3), (1.0, 0.3)], 1.0, True, True, torch.bfloat16, "float32", "bfloat16", False),
    (2, [(1.0, 0.25), (0.5, 0.5)], 0.7, True, True, torch.float16, "float32", "float16", False),
    (2, [(1.0, 0.25), (0.5, 0.5)], 1.0, True, True, torch.float64, "float32", None, False),
]


@pytest.mark.parametrize("case", CASES, ids=["ties-3-tied", "mixed-densities", "unnormalized-bf16-out", "four-models",
                                             "one-model-fp16-out", "exact-ties-off", "weights-cancel", "bf16-in",
                                             "fp16-in", "f64-in"])
@pytest.mark.parametrize("blocks", [None, 1_000], ids=["whole", "blocked"])
def test_ties_lane_writes_the_engines_folder_byte_for_byte(tmp_path, case, blocks):
    n, wd, lam, normalize, exact, dtype, recipe_dtype, out_dtype, quantized = case
    base, models = make_model_folders(tmp_path / "m", n=n, dtype=dtype)
    if quantized:
        _quantize([base, *models])
    _with_int_buffer([base, *models])
    extra = {"compat": "mergekit", **({"dtype": recipe_dtype} if recipe_dtype else {}),
             **({"out_dtype": out_dtype} if out_dtype else {})}
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties",
                          {"lambda": lam, "normalize": normalize, "exact_ties": exact},
                          [{"weight": w, "density": d} for w, d in wd], **extra)
    kw = {"shard_size": 40_000, **({"block_elements": blocks} if blocks else {})}
    lane, engine = lane_and_engine(tmp_path, recipe, "ties", **kw)
    assert lane.keys() == engine.keys()
    for name in lane:
        assert lane[name] == engine[name], name


def _raw_folders(tmp_path: Path, shapes: dict[str, tuple], n: int, levels: int) -> tuple[Path, list[Path]]:
    """Weights-only folders (model.safetensors) with large tensors: the sampled selection and the blocks."""
    g = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    folders = []
    for i in range(n + 1):
        sd = base if i == 0 else {k: v + 2.0 ** -11 * torch.randint(-levels, levels + 1, v.shape, generator=g).float()
                                  for k, v in base.items()}
        f = tmp_path / f"w{i}"
        f.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, f / "model.safetensors")
        folders.append(f)
    return folders[0], folders[1:]


@pytest.mark.parametrize("levels", [3, 4000], ids=["tied", "spread"])
def test_ties_lane_large_tensors_whole_and_in_blocks(tmp_path, levels):
    """Tensors past the sampled selection's size (131 K entries), merged whole and, past the block size,
    in blocks (the streamed thresholds), against the engine."""
    base, models = _raw_folders(tmp_path, {"big": (640, 512), "wide": (3, 70_000), "vec": (150_000,)}, 3, levels)
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties", {"normalize": True},
                          [{"weight": 1.0, "density": 0.2}, {"weight": 0.6, "density": 0.35},
                           {"weight": 0.3, "density": 0.7}], compat="mergekit")
    for blocks in (None, 200_000):
        kw = {"block_elements": blocks} if blocks else {}
        lane, engine = lane_and_engine(tmp_path / str(blocks), recipe, "ties", **kw)
        assert lane == engine


@pytest.mark.parametrize("levels", [3, 4000], ids=["tied", "spread"])
def test_ties_lane_in_pieces_past_the_memory_it_holds(tmp_path, levels, monkeypatch):
    """A tensor merged whole but larger than the task vectors the lane holds: trims one task vector at a time
    (the sort's tie choice included), then the mix in pieces of 7,777 entries: the engine's bytes."""
    import mergelab.engine.linear_lane as lane_module
    base, models = _raw_folders(tmp_path, {"big": (640, 512), "vec": (150_001,), "small": (30, 7)}, 3, levels)
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties", {"normalize": True},
                          [{"weight": 1.0, "density": 0.2}, {"weight": 0.6, "density": 0.35},
                           {"weight": 0.3, "density": 1.0}], compat="mergekit")
    merge(load_recipe(recipe), tmp_path / "torch")
    monkeypatch.setattr(lane_module, "HOLD_BYTES", 0)
    monkeypatch.setattr(lane_module, "LANE_BLOCK_ELEMENTS", 7_777)
    replays = []
    top = lane_module._mergekit_top
    monkeypatch.setattr(lane_module, "_mergekit_top", lambda *a: replays.append(1) or top(*a))
    run_lane(plan_lane(load_recipe(recipe)), tmp_path / "lane")
    assert _files(tmp_path / "lane") == _files(tmp_path / "torch")
    assert replays or levels != 3, "the tied fixture should need the sort's tie choice"


def test_streamed_threshold_when_the_bracket_misses(tmp_path, monkeypatch):
    """A bracket that holds nothing: the two histogram passes give the same thresholds (same bytes)."""
    base, models = _raw_folders(tmp_path, {"big": (640, 512)}, 2, 5)
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties", {"normalize": True},
                          [{"density": 0.3}, {"density": 0.6}], compat="mergekit")
    merge(load_recipe(recipe), tmp_path / "torch", block_elements=50_000)
    monkeypatch.setattr(BS, "sample_bracket", lambda sample, k, n, slack=4.0: (1e30, 2e30))
    run_lane(plan_lane(load_recipe(recipe)), tmp_path / "lane", block_elements=50_000)
    assert _files(tmp_path / "lane") == _files(tmp_path / "torch")


def test_the_tie_choice_matters_on_this_data(tmp_path):
    """The tied fixtures above do exercise mergekit's choice among tied magnitudes: keeping every tie
    (``exact_ties: false``) gives other weights, and the lane replays the sort for them."""
    base, models = make_model_folders(tmp_path / "m", n=2)
    _quantize([base, *models])
    outs = {}
    for exact in (True, False):
        recipe = write_recipe(tmp_path / f"r{exact}.yaml", base, models, "ties", {"exact_ties": exact},
                              [{"density": 0.2}, {"density": 0.3}], compat="mergekit")
        run_lane(plan_lane(load_recipe(recipe)), tmp_path / f"lane{exact}")
        outs[exact] = load_file(tmp_path / f"lane{exact}" / "model.safetensors")
    assert any(not torch.equal(outs[True][k], outs[False][k]) for k in outs[True])


_VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 3e38, -3e38, 1e-30, float("nan"), float("inf")])


@settings(max_examples=120, deadline=None)
@given(t=st.integers(1, 4), size=st.integers(1, 2600), data=st.data(), normalize=st.booleans(),
       lam=st.sampled_from([1.0, 0.3, -1.25]), threshold=st.sampled_from([0.0, 0.4, 1.0, float("inf")]),
       weights=st.lists(st.sampled_from([1.0, 0.5, -0.3, 0.0, 2.75, 1 / 3]), min_size=4, max_size=4),
       seed=st.integers(0, 2**16))
def test_numpy_consensus_mix_is_the_torch_kernel_bit_for_bit(t, size, data, normalize, lam, threshold, weights, seed):
    """``zero_below_`` and ``consensus_mix`` against ``merge.zero_below`` and ``merge.fused_consensus_mix``:
    signed zeros, NaN, Inf and sums that overflow included (chunks of 1,000: several, a partial last one)."""
    g = np.random.default_rng(seed)
    if data.draw(st.booleans()):
        pool = np.array([data.draw(_VALUES) for _ in range(6)], dtype=np.float32)
        deltas, base = g.choice(pool, (t, size)).astype(np.float32), g.choice(pool, size).astype(np.float32)
    else:
        deltas = g.standard_normal((t, size)).astype(np.float32)
        base = g.standard_normal(size).astype(np.float32)
        deltas[g.random((t, size)) < 0.3] = -0.0
        base[g.random(size) < 0.3] = -0.0
    w = weights[:t]
    expected_deltas = torch.from_numpy(deltas.copy())
    for row in expected_deltas:
        K.zero_below(row, threshold)
    ours = deltas.copy()
    for row in ours:
        zero_below_(row, threshold)
    assert np.array_equal(ours.view(np.uint32), expected_deltas.numpy().view(np.uint32))
    expected = K.fused_consensus_mix(torch.from_numpy(base), expected_deltas, w, normalize, lam, chunk=1000).numpy()
    got, finite = consensus_mix(base, ours, w, normalize, lam, chunk=1000)
    same = (got.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(got) & np.isnan(expected))
    assert same.all(), (np.flatnonzero(~same)[:5], got[~same][:5], expected[~same][:5])
    assert finite == bool(np.isfinite(expected).all())


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 20_000), levels=st.integers(1, 50), k=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_numpy_radix_select_is_exact(size, levels, k, seed):
    g = np.random.default_rng(seed)
    values = np.abs(g.integers(0, levels, size).astype(np.float32) * np.float32(0.37) + g.random(size).astype(
        np.float32) * np.float32(g.random() < 0.5))
    rank = max(1, min(size, int(k * size)))
    sel = BS.RadixSelect32(rank)
    for part in np.array_split(values, 3):
        sel.add_high(part)
    sel.finish_high()
    for part in np.array_split(values, 3):
        sel.add_low(part)
    assert sel.finish_low() == float(np.partition(values, rank - 1)[rank - 1])


def test_cli_ties_runs_without_torch_and_names_a_nan_input(tmp_path, monkeypatch):
    """With the sort check's verdict stored, a CLI TIES merge never imports torch; a NaN input gets the
    engine's one line, exit 2, nothing written."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    CS.torch_sort_matches.cache_clear()
    CS.replay_trusted.cache_clear()
    try:
        assert CS.torch_sort_matches()              # checked here, stored for the CLI below
    finally:
        CS.torch_sort_matches.cache_clear()
        CS.replay_trusted.cache_clear()
    stored = json.loads((tmp_path / "cache" / "mergelab" / "torch-sort-replay.json").read_text())
    assert list(stored.values()) == [True]
    base, models = make_model_folders(tmp_path / "m", n=3)
    _quantize([base, *models])
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties", {"normalize": True},
                          [{"density": 0.2}, {"density": 0.3}, {"weight": 0.5, "density": 0.5}], compat="mergekit",
                          dtype="float32")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    assert_cli_runs_without_torch(tmp_path, recipe, "ties", env)
    # without a stored verdict the lane checks once (importing torch), and the result is the same
    fresh = {**env, "XDG_CACHE_HOME": str(tmp_path / "cache2")}
    out = subprocess.run([sys.executable, "-c", _PROBE, "merge", str(recipe), str(tmp_path / "out2"), "--quiet"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=fresh)
    assert out.returncode == 0, out.stderr
    assert _files(tmp_path / "out2") == _files(tmp_path / "engine")
    assert (tmp_path / "cache2" / "mergelab" / "torch-sort-replay.json").is_file()
    # a NaN in one input
    assert_cli_names_bad_input(tmp_path, recipe, models[2], poison(models[2], float("nan")), env)


def test_what_the_ties_lane_leaves_to_the_torch_engine(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=2)

    def plan(params=None, model_params=None, **extra):
        extra.setdefault("compat", "mergekit")
        r = write_recipe(tmp_path / "r.yaml", base, models, "ties", params, model_params, **extra)
        return plan_lane(load_recipe(r))

    dens = [{"density": 0.3}, {"density": 0.5}]
    assert plan(model_params=dens) is not None
    assert plan(model_params=dens, compat="paper") is None                   # the paper's whole-model trim
    assert plan(params={"trim_scope": "global"}, model_params=dens) is None
    assert plan(params={"trim_scope": "per_row"}, model_params=dens) is None
    assert plan(model_params=[{"density": 0.0}, {"density": 0.5}]) is None   # the engine checks inputs first
    assert plan(model_params=dens, dtype="bfloat16") is None                  # half-precision arithmetic
    assert plan(model_params=[{"density": [0.2, 0.8]}, {"density": 0.5}]) is None     # a gradient
    assert plan(model_params=dens, lines={"beta": 0.5}) is None
    base16, models16 = make_model_folders(tmp_path / "m16", n=2, dtype=torch.bfloat16)
    r = write_recipe(tmp_path / "r16.yaml", base16, models16, "ties", None, dens, compat="mergekit")
    assert plan_lane(load_recipe(r)) is None                                  # bfloat16 inputs, no dtype
    r = write_recipe(tmp_path / "r16.yaml", base16, models16, "ties", None, dens, compat="mergekit", dtype="float32")
    assert plan_lane(load_recipe(r)) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_lane_equals_mergekit(tmp_path, dtype):
    """mergekit 0.1.5 itself (skips without its virtualenv): bit for bit, tied magnitudes included."""
    from tests.recipe_helpers import make_llama, mergekit_exe
    mergekit_exe()
    base = make_llama(tmp_path / "base", 0, dtype=dtype)
    a = make_llama(tmp_path / "a", 1, dtype=dtype, base=base)
    b = make_llama(tmp_path / "b", 2, dtype=dtype, base=base)
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 0.6, "density": 0.3}},
                         {"model": str(b), "parameters": {"weight": 0.45, "density": 0.5}}],
              "parameters": {"normalize": True}}
    assert_lane_equals_mergekit(tmp_path, recipe)


def test_lane_falls_back_to_torchs_sort_where_the_replay_does_not_apply(tmp_path, monkeypatch):
    """A replay past the heapsort depth (forced here) or a torch whose sort it does not match: the lane
    sorts with torch, as the engine, and writes the same bytes."""
    base, models = make_model_folders(tmp_path / "m", n=2)
    _quantize([base, *models])
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties", None, [{"density": 0.2}, {"density": 0.4}],
                          compat="mergekit")
    merge(load_recipe(recipe), tmp_path / "torch")
    calls = []

    def no_replay(keys, lo, hi, depth=None, overwrite=False):
        calls.append(keys.size)
        keys[:2] = keys[:2][::-1].copy()          # a replay may move keys before it gives up
        return None
    monkeypatch.setattr(CS, "sort_slice_mask", no_replay)
    run_lane(plan_lane(load_recipe(recipe)), tmp_path / "lane")
    assert calls, "the fixture should need mergekit's tie choice"
    assert _files(tmp_path / "lane") == _files(tmp_path / "torch")


def test_sort_slice_mask_in_place_gives_the_same_set():
    g = np.random.default_rng(3)
    for n, levels in ((5000, 9), (300_000, 40)):
        keys = g.integers(0, levels, n).astype(np.float32)
        expected = CS.sort_slice_mask(keys, 0, n // 4)
        copy = keys.copy()
        assert np.array_equal(CS.sort_slice_mask(copy, 0, n // 4, overwrite=True), expected)
        assert np.array_equal(CS.sort_slice_mask(keys, 0, n // 4), expected)
