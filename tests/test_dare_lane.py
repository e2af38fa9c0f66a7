"""DARE-TIES and DARE linear in the torch-free lane: the torch engine's folder byte for byte, mergekit's
statistics, inputs checked through the norms, without torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergelab.engine import load_recipe, merge
from mergelab.engine.linear_lane import plan_lane, run_lane
from tests.helpers import make_model_folders, write_recipe
from tests.test_linear_lane import (_files, _with_int_buffer, assert_cli_names_bad_input, assert_cli_runs_without_torch,
                                    lane_and_engine, poison)


CASES = [
    # n, (weight, density) per model, lambda, normalize, seed, input dtype, recipe dtype, out dtype
    (3, [(1.0, 0.5), (1.0, 0.5), (1.0, 0.5)], 1.0, False, 42, torch.float32, "float32", None),
    (3, [(1.0, 0.3), (0.5, 0.1), (-0.4, 0.9)], 0.8, True, 7, torch.float32, None, None),
    (2, [(0.7, 0.001), (0.3, 0.999)], 1.3, False, 0, torch.float32, None, "bfloat16"),
    (4, [(0.25, 0.4), (0.0, 0.3), (1.5, 1.0), (1.0, 0.0)], 0.5, True, 2**40 + 3, torch.float32, "float32", None),
    (1, [(0.9, 0.3)], 1.0, True, 5, torch.float32, "float32", "float16"),
    (2, [(0.6, 0.4), (-0.6, 0.4)], 1.0, True, 11, torch.float32, "float32", None),     # weights sum to 0
    (3, [(1.0, 0.3), (1.0, 0.6), (1.0, 0.2)], 1.0, True, 3, torch.bfloat16, "float32", "bfloat16"),
    (2, [(1.0, 0.25), (0.5, 0.5)], 0.7, False, 9, torch.float16, "float32", "float16"),
    (2, [(1.0, 0.25), (0.5, 0.5)], 1.0, True, 13, torch.float64, "float32", None),
]
IDS = ["three-equal", "mixed", "extreme-densities-bf16-out", "four-models-0-and-1", "one-model-fp16-out",
       "weights-cancel", "bf16-in", "fp16-in", "f64-in"]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("blocks", [None, 1_000], ids=["whole", "blocked"])
def test_dare_lane_writes_the_engines_folder_byte_for_byte(tmp_path, method, case, blocks):
    n, wd, lam, normalize, seed, dtype, recipe_dtype, out_dtype = case
    base, models = make_model_folders(tmp_path / "m", n=n, dtype=dtype)
    _with_int_buffer([base, *models])
    extra = {"compat": "mergekit", **({"dtype": recipe_dtype} if recipe_dtype else {}),
             **({"out_dtype": out_dtype} if out_dtype else {})}
    recipe = write_recipe(tmp_path / "r.yaml", base, models, method,
                          {"lambda": lam, "normalize": normalize, "seed": seed},
                          [{"weight": w, "density": d} for w, d in wd], **extra)
    kw = {"shard_size": 40_000, **({"block_elements": blocks} if blocks else {})}
    lane, engine = lane_and_engine(tmp_path, recipe, method, **kw)
    assert lane.keys() == engine.keys()
    for name in lane:
        assert lane[name] == engine[name], name


def _raw_folders(tmp_path: Path, shapes: dict[str, tuple], n: int) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    folders = []
    for i in range(n + 1):
        sd = base if i == 0 else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        f = tmp_path / f"w{i}"
        f.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, f / "model.safetensors")
        folders.append(f)
    return folders[0], folders[1:]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_lane_large_tensors_whole_and_in_blocks(tmp_path, method):
    """Tensors of several of the norms' 65,536 lanes, merged whole and in the engine's blocks (norms added over
    blocks, masks seeded per block), against the engine; the seed changes the result."""
    base, models = _raw_folders(tmp_path, {"big": (640, 512), "wide": (3, 70_000), "vec": (150_001,)}, 3)
    outs = {}
    for seed in (1, 2):
        recipe = write_recipe(tmp_path / "r.yaml", base, models, method, {"seed": seed, "normalize": True},
                              [{"weight": 1.0, "density": 0.2}, {"weight": 0.6, "density": 0.35},
                               {"weight": 0.3, "density": 0.7}], compat="mergekit")
        for blocks in (None, 200_000):
            kw = {"block_elements": blocks} if blocks else {}
            lane, engine = lane_and_engine(tmp_path / f"{seed}-{blocks}", recipe, method, **kw)
            assert lane == engine
            outs[seed, blocks] = lane["model.safetensors"]
    assert outs[1, None] != outs[2, None] and outs[1, None] != outs[1, 200_000]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_lane_two_passes_in_pieces_give_the_same_bytes(tmp_path, method, monkeypatch):
    """Past the memory it holds, the lane takes norms then the merge over pieces (odd offsets into a mask
    included: pieces of 7,777 rows of a vector), for whole and blocked tensors alike."""
    import mergelab.engine.linear_lane as lane_module
    base, models = _raw_folders(tmp_path, {"big": (640, 512), "odd": (301, 7), "vec": (150_001,)}, 2)
    recipe = write_recipe(tmp_path / "r.yaml", base, models, method, {"seed": 3, "normalize": True},
                          [{"weight": 1.0, "density": 0.3}, {"weight": -0.6, "density": 0.8}], compat="mergekit")
    for blocks in (None, 100_000):
        kw = {"block_elements": blocks} if blocks else {}
        merge(load_recipe(recipe), tmp_path / f"torch{blocks}", **kw)
        monkeypatch.setattr(lane_module, "HOLD_BYTES", 0)
        monkeypatch.setattr(lane_module, "LANE_BLOCK_ELEMENTS", 7_777)         # pieces inside the engine's blocks
        if blocks:
            monkeypatch.setattr(lane_module, "BLOCK_ELEMENTS", blocks)
        run_lane(plan_lane(load_recipe(recipe)), tmp_path / f"lane{blocks}")
        monkeypatch.undo()
        assert _files(tmp_path / f"lane{blocks}") == _files(tmp_path / f"torch{blocks}")


def test_cli_dare_ties_runs_without_torch_and_checks_inputs_through_the_norms(tmp_path):
    """A CLI DARE-TIES merge never imports torch; a NaN input, even where every mask drops it, gets the
    engine's one line, exit 2, nothing written."""
    base, models = make_model_folders(tmp_path / "m", n=3)
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "dare_ties", {"seed": 17},
                          [{"density": 0.5}, {"density": 0.3}, {"weight": 0.5, "density": 0.0}], compat="mergekit")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    assert_cli_runs_without_torch(tmp_path, recipe, "dare_ties", env)
    # a NaN in the model of density 0: its mask drops everything, the norm still sees it
    assert_cli_names_bad_input(tmp_path, recipe, models[2], poison(models[2], float("nan")), env)


@pytest.mark.parametrize("blocks", [None, 1_000])
def test_dare_lane_names_the_first_bad_input_as_the_engine(tmp_path, blocks):
    """NaN in two inputs of one tensor (one in an early block, one late): the lane names the engine's."""
    base, models = make_model_folders(tmp_path / "m", n=2)
    name = None
    for folder, at in ((base, -1), (models[1], 0)):
        sd = load_file(folder / "model.safetensors")
        name = name or max((k for k in sd if sd[k].is_floating_point()), key=lambda k: sd[k].numel())
        sd[name].view(-1)[at] = float("inf")
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "dare_ties", None,
                          [{"density": 0.5}, {"density": 0.5}], compat="mergekit")
    kw = {"block_elements": blocks} if blocks else {}
    with pytest.raises(Exception) as engine:
        merge(load_recipe(recipe), tmp_path / "engine", **kw)
    with pytest.raises(Exception) as lane:
        run_lane(plan_lane(load_recipe(recipe)), tmp_path / "lane", **kw)
    assert str(lane.value) == str(engine.value) and "contains NaN or Inf" in str(lane.value)
    assert not (tmp_path / "lane").exists()


def test_what_the_dare_lane_leaves_to_the_torch_engine(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=5)

    def plan(method="dare_ties", ms=models[:2], params=None, model_params=None, **extra):
        extra.setdefault("compat", "mergekit")
        r = write_recipe(tmp_path / "r.yaml", base, ms, method, params, model_params, **extra)
        return plan_lane(load_recipe(r))

    dens = [{"density": 0.3}, {"density": 0.5}]
    assert plan(model_params=dens) is not None and plan("dare_linear", model_params=dens) is not None
    assert plan(model_params=dens, compat="paper") is None               # the paper's 1 / (1 - p) rescale
    assert plan(params={"rescale": False}, model_params=dens) is None
    assert plan(model_params=dens, dtype="bfloat16") is None              # half-precision arithmetic
    assert plan(ms=models) is None                                        # more than 4 models
    assert plan(model_params=[{"density": [0.2, 0.8]}, {"density": 0.5}]) is None     # a gradient
    assert plan("della", model_params=dens) is None


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_lane_keeps_mergekits_statistics(tmp_path, method):
    """mergekit 0.1.5 itself (skips without its virtualenv): its masks are torch.bernoulli's, so per large
    tensor the changed fraction and the norm of the change are compared (``tests/test_recipes_mergekit.py``)."""
    from tests.recipe_helpers import make_llama, mergekit_exe, run_mergekit
    from tests.test_recipes_mergekit import _random_stats_agree
    mergekit_exe()
    base = make_llama(tmp_path / "base", 0)
    a = make_llama(tmp_path / "a", 1, base=base)
    b = make_llama(tmp_path / "b", 2, base=base)
    recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 0.6, "density": 0.3}},
                         {"model": str(b), "parameters": {"weight": 0.45, "density": 0.6}}],
              "parameters": {"normalize": True}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = plan_lane(load_recipe(path))
    assert plan is not None and plan.method == method
    run_lane(plan, tmp_path / "lane")
    run_mergekit(path, tmp_path / "mk")
    assert _random_stats_agree(tmp_path / "mk", tmp_path / "lane", base) == ""


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("blocks", [None, 1_000], ids=["whole", "blocked"])
def test_dare_lane_with_mergekits_masks_writes_the_engines_folder(tmp_path, monkeypatch, method, case, blocks):
    """``--random-seed``: the lane's numpy Mersenne Twister gives the engine's torch masks (mergekit's own; the
    engine is checked against mergekit in ``test_mergekit_stream``), with generator states kept every 700
    entries so that pieces start between them."""
    from mergelab.kernels import mergekit_stream, numpy_mergekit_stream
    monkeypatch.setattr(mergekit_stream, "CHECKPOINT", 700)
    monkeypatch.setattr(numpy_mergekit_stream, "CHECKPOINT", 700)
    n, wd, lam, normalize, seed, dtype, recipe_dtype, out_dtype = case
    base, models = make_model_folders(tmp_path / "m", n=n, dtype=dtype)
    extra = {"compat": "mergekit", **({"dtype": recipe_dtype} if recipe_dtype else {}),
             **({"out_dtype": out_dtype} if out_dtype else {})}
    recipe = write_recipe(tmp_path / "r.yaml", base, models, method, {"lambda": lam, "normalize": normalize},
                          [{"weight": w, "density": d} for w, d in wd], **extra)
    kw = {"shard_size": 40_000, **({"block_elements": blocks} if blocks else {})}
    plan = plan_lane(load_recipe(recipe))
    assert plan is not None
    plan.random_seed = seed % 2**32
    run_lane(plan, tmp_path / "lane", **kw)
    merge(load_recipe(recipe), tmp_path / "torch", random_seed=seed % 2**32, **kw)
    lane, engine = _files(tmp_path / "lane"), _files(tmp_path / "torch")
    assert lane.keys() == engine.keys()
    for name in lane:
        assert lane[name] == engine[name], name


def test_dare_lane_with_mergekits_masks_two_passes_and_the_cli_without_torch(tmp_path, monkeypatch):
    """Tensors past HOLD_BYTES (norms, then the merge, in 1 M-entry pieces) and blocked ones, with the stream's
    states 100,000 entries apart; the CLI's ``--random-seed`` runs in the lane without importing torch once the
    bernoulli check's verdict is stored, and writes the engine's folder."""
    import subprocess
    import sys

    from mergelab.engine.linear_lane import merge_recipe
    from mergelab.kernels import cpu_sort as CS
    from mergelab.kernels import mergekit_stream, numpy_mergekit_stream
    from tests.test_linear_lane import _PROBE, ROOT
    base, models = _raw_folders(tmp_path, {"big": (4, 1_100_000), "wide": (3, 70_000), "vec": (150_001,)}, 3)
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "dare_ties", {"normalize": True},
                          [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.7},
                           {"weight": -0.3, "density": 0.0}], compat="mergekit")
    with monkeypatch.context() as m:
        m.setattr(mergekit_stream, "CHECKPOINT", 100_000)
        m.setattr(numpy_mergekit_stream, "CHECKPOINT", 100_000)
        for kw in ({}, {"block_elements": 1_000_000}):
            plan = plan_lane(load_recipe(recipe))
            plan.random_seed = 77
            run_lane(plan, tmp_path / "lane", **kw)
            merge(load_recipe(recipe), tmp_path / "torch", random_seed=77, **kw)
            assert _files(tmp_path / "lane") == _files(tmp_path / "torch"), kw
            for d in ("lane", "torch"):
                import shutil
                shutil.rmtree(tmp_path / d)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    numpy_mergekit_stream.bernoulli_replay_trusted.cache_clear()
    try:
        assert numpy_mergekit_stream.bernoulli_replay_trusted()
        assert CS.stored_verdict("bernoulli") is True
        assert merge_recipe(recipe, tmp_path / "api", random_seed=77).engine == "numpy"
    finally:
        numpy_mergekit_stream.bernoulli_replay_trusted.cache_clear()
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _PROBE, "merge", str(recipe), str(tmp_path / "out"), "--quiet",
                          "--random-seed", "77"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "TORCH:False" and "(numpy, without torch)" in out.stdout
    merge(load_recipe(recipe), tmp_path / "engine", random_seed=77)
    assert _files(tmp_path / "out") == _files(tmp_path / "engine") == _files(tmp_path / "api")
