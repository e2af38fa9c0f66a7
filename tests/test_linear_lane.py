"""The torch-free task-arithmetic lane: the same folder as the torch engine, byte for byte, without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergelab.engine import load_recipe, merge
from mergelab.engine.linear_lane import (MAX_MODELS, CHUNK, _from_float32, plan_lane, run_lane,
                                         task_arithmetic_block)
from tests.helpers import make_model_folders, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the ownership marker's without the pid of the process that wrote it."""
    import json
    from mergelab.io import MARKER
    out = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    marker = json.loads(out.pop(MARKER))
    assert marker.pop("pid") > 0
    out[MARKER] = json.dumps(marker).encode()
    return out


def _with_int_buffer(folders: list[Path]) -> None:
    """An integer tensor in every input (copied from the base, never merged)."""
    for i, f in enumerate(folders):
        sd = load_file(f / "model.safetensors")
        sd["embeddings.position_ids"] = torch.arange(32, dtype=torch.int64).reshape(1, 32) + i
        save_file(sd, f / "model.safetensors", metadata={"format": "pt"})


def lane_and_engine(tmp_path: Path, recipe: Path, method: str | None = None, **kw
                    ) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The folders the lane and the torch engine write for ``recipe`` (the lane must take it, as ``method``)."""
    plan = plan_lane(load_recipe(recipe))
    assert plan is not None and method in (None, plan.method), "the recipe should run in the lane"
    run_lane(plan, tmp_path / "lane", **kw)
    merge(load_recipe(recipe), tmp_path / "torch", **kw)
    return _files(tmp_path / "lane"), _files(tmp_path / "torch")


def poison(folder: Path, value: float, index: int = 4) -> str:
    """Entry 3 of the ``index``-th floating tensor (by name) of a model folder set to ``value``; its name."""
    sd = load_file(folder / "model.safetensors")
    name = sorted(k for k in sd if sd[k].is_floating_point())[index]
    sd[name].view(-1)[3] = value
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return name


def assert_cli_names_bad_input(tmp_path: Path, recipe: Path, culprit: Path, name: str, env: dict | None = None) -> None:
    """``mergelab merge`` of ``recipe``: the one line naming ``culprit``'s tensor, exit 2, nothing written (no
    temporary either); the torch engine names the same."""
    out = subprocess.run([sys.executable, "-m", "mergelab", "merge", str(recipe), str(tmp_path / "bad"), "--quiet"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"mergelab: error: {culprit}: tensor {name!r} contains NaN or Inf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad") or p.name.startswith("bad")]
    with pytest.raises(Exception, match=f"{culprit}: tensor '{name}' contains NaN or Inf"):
        merge(load_recipe(recipe), tmp_path / "engine-bad")


def assert_cli_runs_without_torch(tmp_path: Path, recipe: Path, method: str, env: dict | None = None) -> None:
    """``mergelab merge`` of ``recipe`` never imports torch, says so, writes the engine's folder byte for byte, and
    transformers loads it."""
    out = subprocess.run([sys.executable, "-c", _PROBE, "merge", str(recipe), str(tmp_path / "out"), "--quiet"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "TORCH:False"
    assert method in out.stdout and "(numpy, without torch)" in out.stdout
    merge(load_recipe(recipe), tmp_path / "engine")
    assert _files(tmp_path / "out") == _files(tmp_path / "engine")
    from transformers import BertModel
    BertModel.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("n, weights, lam, normalize, dtype, recipe_dtype, out_dtype", [
    (3, [1.0, 1.0, 1.0], 0.5, False, torch.float32, "float32", None),
    (1, [0.7], 1.0, False, torch.float32, None, None),
    (2, [0.3, -0.45], 1.3, True, torch.float32, "float32", "bfloat16"),
    (4, [0.25, 0.5, 0.125, 1.5], 0.8, True, torch.bfloat16, "float32", "bfloat16"),
    (3, [1.0, 0.0, 2.0], 0.3, False, torch.float16, "float32", "float16"),
    (2, [0.6, 0.4], 1.0, True, torch.float32, "float32", "float16"),
    # bfloat16 / float16 arithmetic (each operation rounded, as torch's kernels of these dtypes)
    (3, [1.0, 1.0, 1.0], 0.5, False, torch.bfloat16, None, None),
    (4, [0.3, 0.7, -0.2, 1.1], 0.85, True, torch.bfloat16, "bfloat16", None),
    (2, [0.35, 0.65], 1.0, True, torch.float32, "bfloat16", "float32"),
    (1, [0.9], 1.7, False, torch.float16, None, "bfloat16"),
    (3, [0.2, 0.5, 0.3], 0.6, True, torch.float16, "float16", "float16"),
    (2, [0.7, 0.3], 0.9, False, torch.float64, "float32", None),          # float64 inputs rounded to float32
], ids=["ta-3", "one-model", "negative-normalized-bf16-out", "four-bf16-in", "fp16-zero-weight", "fp16-out",
        "bf16-arith", "bf16-arith-normalized", "f32-in-bf16-arith", "fp16-arith-one", "fp16-arith-normalized",
        "f64-in-f32-arith"])
def test_lane_writes_the_engines_folder_byte_for_byte(tmp_path, n, weights, lam, normalize, dtype, recipe_dtype,
                                                      out_dtype):
    base, models = make_model_folders(tmp_path / "m", n=n, dtype=dtype)
    _with_int_buffer([base, *models])
    extra = {"compat": "mergekit", **({"dtype": recipe_dtype} if recipe_dtype else {}),
             **({"out_dtype": out_dtype} if out_dtype else {})}
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "task_arithmetic",
                          {"lambda": lam, "normalize": normalize}, [{"weight": w} for w in weights], **extra)
    # small shards and blocks: several output files, tensors merged in row blocks and chunks
    lane, engine = lane_and_engine(tmp_path, recipe, shard_size=40_000, block_elements=1_000)
    assert len([k for k in lane if k.endswith(".safetensors")]) > 1
    assert lane.keys() == engine.keys()
    for name in lane:
        assert lane[name] == engine[name], name


def test_lane_sharded_inputs_and_the_copied_integer_tensor(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=2, shard="20KB")
    assert (base / "model.safetensors.index.json").exists()
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "task_arithmetic", {"lambda": 0.7}, compat="mergekit",
                          dtype="float32")
    lane, engine = lane_and_engine(tmp_path, recipe)
    assert lane == engine


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, MAX_MODELS), size=st.integers(0, 3 * 4099),
       weights=st.lists(st.sampled_from([1.0, 0.5, -0.3, 0.0, 2.75, 1e-9, 0.1]), min_size=MAX_MODELS,
                        max_size=MAX_MODELS),
       lam=st.sampled_from([1.0, 0.3, -1.25, 0.0, 7.0]), normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_block_matches_the_torch_kernel_bit_for_bit(n, size, weights, lam, normalize, seed):
    """numpy's float32 arithmetic in the lane's order against ``kernels.fused_task_arithmetic`` with the
    divisor of ``common.mergekit_weight_sum`` (chunks of 4099 here: several, with a partial last one)."""
    from mergelab import kernels as K
    from mergelab.methods.common import mergekit_weight_sum
    g = np.random.default_rng(seed)
    base = g.standard_normal(size).astype(np.float32)
    models = [base + g.standard_normal(size).astype(np.float32) * np.float32(10.0 ** g.integers(-4, 2))
              for _ in range(n)]
    w = weights[:n]
    w32 = np.array(w, dtype=np.float32)
    tw = torch.tensor(w, dtype=torch.float32)
    divisor = mergekit_weight_sum(tw) if normalize else None
    total = np.float32(0)
    for x in w32:
        total = np.float32(total + x)
    ours_div = (np.float32(1) if abs(total) < 1e-8 else total) if normalize else None
    assert divisor is None or np.float32(divisor.item()) == ours_div
    expected, ok = K.fused_task_arithmetic(torch.from_numpy(base), [torch.from_numpy(m) for m in models],
                                           tw if any(x != 1 for x in w) else None, lam, divisor, chunk=4099)
    got, finite = task_arithmetic_block(base, "F32", models, w32 if any(x != 1 for x in w) else None, lam, ours_div,
                                        chunk=4099)
    assert np.array_equal(got.view(np.uint32), expected.numpy().view(np.uint32))
    assert finite == ok


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, MAX_MODELS), size=st.integers(1, 2 * 4099), compute=st.sampled_from(["BF16", "F16"]),
       stored=st.sampled_from(["same", "F32"]),
       weights=st.lists(st.sampled_from([1.0, 0.5, -0.3, 0.0, 2.75, 0.1, 1 / 3]), min_size=MAX_MODELS,
                        max_size=MAX_MODELS),
       lam=st.sampled_from([1.0, 0.3, -1.25, 7.0]), normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_reduced_block_matches_the_engines_kernel(n, size, compute, stored, weights, lam, normalize, seed):
    """bfloat16 / float16 arithmetic against the method's own per-tensor function on tensors of that dtype
    (values over many binades, so that sums round), inputs stored in that dtype or in float32."""
    from mergelab.engine.linear_lane import ROUNDERS, _coefficients, reduced_task_arithmetic_block
    from mergelab.methods import TensorJob, get_method
    tdtype = {"BF16": torch.bfloat16, "F16": torch.float16}[compute]
    g = np.random.default_rng(seed)
    top = 4 if compute == "F16" else 30
    base32 = (g.standard_normal(size) * 2.0 ** g.integers(-12, top, size)).astype(np.float32)
    models32 = [base32 + (g.standard_normal(size) * 2.0 ** g.integers(-14, top - 2, size)).astype(np.float32)
                for _ in range(n)]
    w = weights[:n]
    job = TensorJob("t", torch.from_numpy(base32).to(tdtype), [torch.from_numpy(m).to(tdtype) for m in models32],
                    {"lambda": lam, "normalize": normalize}, [{"weight": x} for x in w], compat="mergekit")
    expected = get_method("task_arithmetic").merge_tensor(job)
    assert expected.dtype == tdtype
    if stored == "F32":          # float32 inputs cast to the arithmetic dtype first (mergekit's ``dtype``)
        raws, kind = [base32, *models32], "F32"
    else:
        raws = [ROUNDERS[compute](x.copy()) for x in [base32, *models32]]
        raws = [r.astype(np.float16) if compute == "F16" else (r.view(np.uint32) >> 16).astype(np.uint16)
                for r in raws]
        kind = compute
    wts, div = _coefficients(w, normalize, compute)
    if div == 0:          # the lane leaves a division by zero to the engine (plan_lane returns None)
        assert compute == "F16" and normalize and sum(w) == 0
        return
    got, _ = reduced_task_arithmetic_block(raws[0], kind, raws[1:], compute, wts, lam, div, chunk=4099)
    want = expected.float().numpy()
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), (np.nonzero(~same)[0][:5], got[~same][:5], want[~same][:5])


def test_bfloat16_and_float16_rounding_is_torchs():
    g = np.random.default_rng(0)
    bits = np.concatenate([g.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x00000001, 0x80000000, 0x3F808000,
                                     0x3F818000, 0x7F7FFFFF, 0x477FF000], dtype=np.uint32)])
    x = bits.view(np.float32)
    numbers = x[~np.isnan(x)]      # NaN: torch's vector and scalar paths differ in the payload; the lane writes 0x7FC0
    t = torch.from_numpy(numbers.copy())
    assert np.array_equal(_from_float32(numbers, "BF16"),
                          t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    assert (_from_float32(x, "BF16")[np.isnan(x)] == 0x7FC0).all()
    finite = x[np.isfinite(x)]
    tf = torch.from_numpy(finite.copy())
    assert np.array_equal(_from_float32(finite, "F16").view(np.uint16),
                          tf.to(torch.float16).view(torch.int16).numpy().view(np.uint16))


def test_what_the_lane_leaves_to_the_torch_engine(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=MAX_MODELS + 1)

    def plan(method="task_arithmetic", ms=models[:2], params=None, model_params=None, **extra):
        extra.setdefault("compat", "mergekit")
        r = write_recipe(tmp_path / "r.yaml", base, ms, method, params, model_params, **extra)
        return plan_lane(load_recipe(r))

    assert plan() is not None and plan(dtype="float32", out_dtype="bfloat16") is not None
    assert plan(compat="paper") is None                                    # the papers' fused sum
    assert plan(method="della", params={"density": 0.5}) is None             # TIES: tests/test_ties_lane.py
    assert plan(ms=models) is None                                         # more than 4: torch's reduction
    assert plan(dtype="bfloat16") is not None                              # rounded as torch rounds
    assert plan(dtype="float64") is None                                   # float64 arithmetic
    base64, models64 = make_model_folders(tmp_path / "m64", n=2, dtype=torch.float64)
    r64 = write_recipe(tmp_path / "r64.yaml", base64, models64, "task_arithmetic", compat="mergekit",
                       dtype="bfloat16")
    assert plan_lane(load_recipe(r64)) is None                             # float64 -> bfloat16 in one rounding
    assert plan(model_params=[{"weight": [0.1, 0.9]}, {"weight": 1.0}]) is None    # a gradient
    assert plan(lines={"beta": 0.5}) is None
    zero = [{"weight": 0.5}, {"weight": -0.5}]
    assert plan(model_params=zero, params={"normalize": True}, dtype="float16") is None     # divides by 0
    assert plan(model_params=zero, params={"normalize": True}, dtype="float32") is not None  # divisor 1
    assert plan_lane(load_recipe(write_recipe(tmp_path / "r.yaml", base, models[:2], "task_arithmetic",
                                              compat="mergekit")), device="cuda") is None
    # inputs: a .bin model, tensors that differ
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(load_file(models[0] / "model.safetensors"), binary / "pytorch_model.bin")
    assert plan(ms=[binary, models[1]]) is None
    odd = tmp_path / "odd"
    odd.mkdir()
    sd = load_file(models[0] / "model.safetensors")
    sd.pop(sorted(sd)[0])
    save_file(sd, odd / "model.safetensors")
    assert plan(ms=[odd, models[1]]) is None


_PROBE = """
import sys
from mergelab.cli import main
rc = main(sys.argv[1:])
print("TORCH:" + str("torch" in sys.modules))
sys.exit(rc)
"""


def test_cli_task_arithmetic_runs_without_torch(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=3)
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "task_arithmetic", {"lambda": 0.5}, compat="mergekit",
                          dtype="float32")
    out = subprocess.run([sys.executable, "-c", _PROBE, "merge", str(recipe), str(tmp_path / "out"), "--quiet"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "TORCH:False"
    assert "merged" in out.stdout and "task_arithmetic" in out.stdout and "(numpy, without torch)" in out.stdout
    merge(load_recipe(recipe), tmp_path / "engine")
    assert _files(tmp_path / "out") == _files(tmp_path / "engine")
    # and the output is a model transformers loads
    from transformers import BertModel
    BertModel.from_pretrained(tmp_path / "out")
    # a recipe the lane does not take still merges (through torch)
    ties = write_recipe(tmp_path / "t.yaml", base, models, "della", {"density": 0.5}, compat="mergekit")
    out = subprocess.run([sys.executable, "-c", _PROBE, "merge", str(ties), str(tmp_path / "out-ties"), "--quiet"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "TORCH:True" and "without torch" not in out.stdout


def test_cli_lane_names_a_nan_input_and_leaves_nothing(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=2)
    sd = load_file(models[1] / "model.safetensors")
    name = sorted(k for k in sd if sd[k].is_floating_point())[3]
    sd[name].view(-1)[5] = float("nan")
    save_file(sd, models[1] / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "task_arithmetic", compat="mergekit")
    assert plan_lane(load_recipe(recipe)) is not None
    out = subprocess.run([sys.executable, "-m", "mergelab", "merge", str(recipe), str(tmp_path / "out"), "--quiet"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [f"mergelab: error: {models[1]}: tensor {name!r} contains NaN or Inf"], out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r.yaml"]
    # the torch engine says the same
    with pytest.raises(Exception, match=f"{models[1]}: tensor '{name}' contains NaN or Inf"):
        merge(load_recipe(recipe), tmp_path / "engine")


def test_lane_constants_follow_the_kernels():
    from mergelab.engine.linear_lane import ADAPTER_CONFIG
    from mergelab.io.lora import CONFIG
    from mergelab.kernels.merge import FUSED_CHUNK, SEQUENTIAL_ROWS
    assert MAX_MODELS == SEQUENTIAL_ROWS and CHUNK == FUSED_CHUNK and ADAPTER_CONFIG == CONFIG


def test_recipe_written_for_the_lane_is_recorded(tmp_path):
    base, models = make_model_folders(tmp_path / "m", n=2)
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "task_arithmetic", {"lambda": 0.4}, compat="mergekit")
    run_lane(plan_lane(load_recipe(recipe)), tmp_path / "out")
    saved = yaml.safe_load((tmp_path / "out" / "mergelab_recipe.yaml").read_text())
    assert saved["resolved_parameters"]["lambda"] == 0.4 and saved["compat"] == "mergekit"


@pytest.mark.parametrize("dtype, recipe_dtype", [(torch.bfloat16, "bfloat16"), (torch.bfloat16, None),
                                                 (torch.float16, "float16")])
def test_lane_equals_mergekit(tmp_path, dtype, recipe_dtype):
    """mergekit 0.1.5 itself (skips without its virtualenv): the lane's weights equal its output, bit for bit."""
    from tests.recipe_helpers import make_llama, mergekit_exe
    mergekit_exe()
    base = make_llama(tmp_path / "base", 0, dtype=dtype)
    a = make_llama(tmp_path / "a", 1, dtype=dtype, base=base)
    b = make_llama(tmp_path / "b", 2, dtype=dtype, base=base)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(a), "parameters": {"weight": 0.6}},
                         {"model": str(b), "parameters": {"weight": 0.45}}],
              "parameters": {"lambda": 0.7, "normalize": True}, **({"dtype": recipe_dtype} if recipe_dtype else {})}
    assert_lane_equals_mergekit(tmp_path, recipe)


def assert_lane_equals_mergekit(tmp_path: Path, recipe: dict) -> None:
    """The lane's weights for ``recipe`` equal mergekit 0.1.5's, tensor for tensor (``torch.equal``)."""
    from tests.recipe_helpers import run_mergekit
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = plan_lane(load_recipe(path))
    assert plan is not None
    run_lane(plan, tmp_path / "lane")
    run_mergekit(path, tmp_path / "mk")
    ours = load_file(tmp_path / "lane" / "model.safetensors")
    theirs = {}
    for f in sorted((tmp_path / "mk").glob("*.safetensors")):
        theirs.update(load_file(f))
    assert ours.keys() == theirs.keys()
    bad = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not bad, bad[:3]


def test_multistage_task_arithmetic_runs_without_torch(tmp_path):
    """Every stage the lane takes runs in it: a file of task-arithmetic stages never imports torch."""
    base, models = make_model_folders(tmp_path / "m", n=3)
    docs = [{"name": "mid", "merge_method": "task_arithmetic", "base_model": str(base),
             "models": [{"model": str(models[0])}, {"model": str(models[1])}], "parameters": {"lambda": 0.5}},
            {"merge_method": "task_arithmetic", "base_model": str(base),
             "models": [{"model": "mid"}, {"model": str(models[2])}], "parameters": {"lambda": 0.8}}]
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    out = subprocess.run([sys.executable, "-c", _PROBE, "merge", str(path), str(tmp_path / "out"), "--quiet"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "TORCH:False"
    mid = merge(load_recipe(docs[0]), tmp_path / "mid-engine")
    final = dict(docs[1], models=[{"model": str(mid.out_dir)}, {"model": str(models[2])}])
    merge(load_recipe(final), tmp_path / "engine")
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == \
        load_file(tmp_path / "engine" / "model.safetensors").keys()
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "engine" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
