"""``--random-seed``: DARE and DELLA masks entry for entry as ``mergekit-yaml --random-seed N`` draws them.

The stream itself against torch.bernoulli drawn in one sequence (any sizes, offsets, checkpoints, probability
dtypes, the fallback path); the engine against a port of mergekit's loop (tensors by name, models in recipe
order, one global generator) whole, blocked and threaded; mergekit 0.1.5 itself (skips without its virtualenv):
every tensor bit for bit (bfloat16 checkpoints; float32 with ``rescale: false``; all four methods), the same
masks and the float32 rescale to its rounding; the CLI's flag and its one-line errors.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergelab import load_state_dict
from mergelab.engine.linear_lane import merge_recipe
from mergelab.engine.streaming import merge_state_dicts
from mergelab.errors import MergelabError
from mergelab.kernels import mergekit_stream as MS

ROOT = Path(__file__).resolve().parents[1]


def _sequential(seed: int, masks: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What mergekit draws: one generator, seeded once, one torch.bernoulli per mask in order."""
    g = torch.Generator().manual_seed(seed)
    return {key: torch.bernoulli(p, generator=g) for key, p in masks}


@pytest.fixture
def small_checkpoints(monkeypatch):
    monkeypatch.setattr(MS, "CHECKPOINT", 1000)


@pytest.mark.parametrize("fast", [True, False])
def test_stream_draws_torch_bernoullis_sequence_from_any_offset(small_checkpoints, monkeypatch, fast):
    if not fast:
        monkeypatch.setattr(MS, "_fast_path_agrees", lambda: False)
    g = torch.Generator().manual_seed(0)
    masks = [("a", torch.full((2501,), 0.3)), ("b", torch.full((1,), 0.9)), ("c", torch.rand(3000, generator=g)),
             ("d", torch.full((999,), 0.5, dtype=torch.bfloat16)), ("e", torch.full((1000,), 0.25, dtype=torch.float16)),
             ("f", torch.tensor([0.0, 1.0, 2.0 ** -24, 1 - 2.0 ** -24] * 300))]
    expected = _sequential(7, masks)
    stream = MS.MergekitMaskStream(7, [(k, p.numel()) for k, p in masks])
    assert stream.fast is fast and stream.entries == sum(p.numel() for _, p in masks)
    for key, p in masks:
        assert torch.equal(stream.bernoulli(key, 0, p), expected[key])
        assert stream.bernoulli(key, 0, p).dtype == p.dtype
        for start, stop in [(1, 5), (999, 1001), (1000, 2000), (p.numel() - 3, p.numel())]:
            if 0 <= start < stop <= p.numel():
                assert torch.equal(stream.bernoulli(key, start, p[start:stop]), expected[key][start:stop]), (key, start)
    for key in ("a", "b", "d", "e"):       # masks of one probability: float32 0/1 from one threshold
        p = dict(masks)[key]
        n = p.numel()
        assert torch.equal(stream.keep(key, 0, (n,), p[0]), expected[key].float())
        if n > 1000:
            assert torch.equal(stream.keep(key, 998, (2, 3), p[0]), expected[key][998:1004].reshape(2, 3).float())
    with pytest.raises(ValueError, match="outside"):
        stream.bernoulli("a", 2500, torch.full((2,), 0.3))
    with pytest.raises(ValueError, match="outside"):
        stream.keep("b", 0, (2,), torch.tensor(0.9))
    assert "z" not in stream and "a" in stream
    with pytest.raises(ValueError, match="twice"):
        MS.MergekitMaskStream(0, [("a", 3), ("a", 3)])


def test_fast_path_agrees_with_the_installed_torch():
    """If this fails the stream still gives mergekit's masks (through torch.bernoulli), only slower."""
    assert MS._fast_path_agrees()


def _mergekit_port(base: dict, models: list[dict], method: str, model_params: list[dict], seed: int,
                   rescale: bool) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's dare_ties / dare_linear (normalize off, lambda 1) in the tensors' dtype, written as its
    ``sparsify.bernoulli`` and ``generalized_task_arithmetic`` are, on one generator seeded once: tensors by
    name, then models in order (``graph.py``'s schedule)."""
    torch.manual_seed(seed)
    out = {}
    for name in sorted(base):
        b = base[name]
        deltas = b.new_empty((len(models), *b.shape))
        for j, (m, p) in enumerate(zip(models, model_params)):
            d = m[name] - b
            if p["density"] < 1:
                work = d.dtype if d.dtype == torch.bfloat16 else torch.float32
                mask = torch.bernoulli(torch.full_like(d, p["density"], dtype=work))
                masked = d.to(work) * mask
                if rescale:
                    before, after = d.to(work).abs().sum(), masked.abs().sum()
                    if not (before < 1e-7 or after < 1e-7):
                        masked = masked * (before / after)
                d = masked.to(d.dtype)
            deltas[j] = d
        weights = torch.tensor([p["weight"] for p in model_params], dtype=deltas.dtype)
        deltas.mul_(weights.reshape(-1, *[1] * b.dim()))
        if method == "dare_ties":
            sign = deltas.sign()
            majority = (deltas.sum(dim=0) >= 0).to(b.dtype) * 2 - 1
            mixed = (deltas * (sign == majority)).sum(dim=0)
        else:
            mixed = deltas.sum(dim=0)
        out[name] = (b + mixed).to(b.dtype)
    return out


def _state_dicts(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w.big": (96, 70), "a.small": (33,), "m.mid": (17, 40)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    return {k: v.to(dtype) for k, v in base.items()}, [{k: v.to(dtype) for k, v in m.items()} for m in models]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_engine_masks_follow_mergekits_order_whole_blocked_and_threaded(method):
    base, models = _state_dicts()
    mp = [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 1.0}, {"weight": -0.3, "density": 0.0}]
    params = {"rescale": False, "normalize": False}
    expected = _mergekit_port(base, models, method, mp, 1234, rescale=False)
    for kwargs in ({}, {"block_elements": 700, "threads": 2}, {"block_elements": 70, "threads": 3}):
        got = merge_state_dicts(base, models, method, params, mp, compat="mergekit", random_seed=1234, **kwargs)
        for k in base:
            assert torch.equal(got[k], expected[k]), (k, kwargs)
    other = merge_state_dicts(base, models, method, params, mp, compat="mergekit", random_seed=1235)
    assert not torch.equal(other["w.big"], expected["w.big"])
    # without --random-seed: mergelab's own masks (reproducible, other draws)
    own = merge_state_dicts(base, models, method, {**params, "seed": 0}, mp, compat="mergekit")
    assert not torch.equal(own["w.big"], expected["w.big"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_rescaled_masks_are_mergekits_and_the_rescale_rounds_alike(tmp_path, dtype):
    """A recipe over safetensors folders (mergekit semantics: arithmetic in the inputs' dtype). bfloat16: bit for
    bit (mergekit's two sums and their quotient are bfloat16: so are ours); float32: the same entries, values to
    the rounding of the rescale factor (its sums are torch's cascade, ours a fixed order)."""
    from safetensors.torch import save_file

    from mergelab.engine.streaming import merge
    base, models = _state_dicts(1, dtype)
    folders = []
    for i, sd in enumerate([base, *models]):
        (tmp_path / f"m{i}").mkdir()
        save_file(sd, str(tmp_path / f"m{i}" / "model.safetensors"), metadata={"format": "pt"})
        folders.append(str(tmp_path / f"m{i}"))
    mp = [{"weight": 0.75, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": -0.25, "density": 0.9}]
    expected = _mergekit_port(base, models, "dare_ties", mp, 5, rescale=True)
    recipe = {"merge_method": "dare_ties", "base_model": folders[0], "parameters": {"normalize": False},
              "models": [{"model": f, "parameters": p} for f, p in zip(folders[1:], mp)]}
    for j, kwargs in enumerate(({}, {"block_elements": 512, "threads": 2})):
        merge(recipe, tmp_path / f"out{j}", random_seed=5, **kwargs)
        got = load_state_dict(tmp_path / f"out{j}")
        for k in base:
            if dtype == torch.bfloat16:
                assert torch.equal(got[k], expected[k]), (k, kwargs)
                continue
            assert torch.equal(got[k] != base[k], expected[k] != base[k]), k
            scale = float((expected[k] - base[k]).abs().max())
            assert float((got[k] - expected[k]).abs().max()) <= 1e-6 * scale, k


def test_random_seed_needs_mergekit_semantics():
    base, models = _state_dicts()
    with pytest.raises(MergelabError, match="mergekit semantics"):
        merge_state_dicts(base, models, "dare_ties", {}, [{"density": 0.5}] * 3, compat="paper", random_seed=1)


def _llamas(tmp_path: Path, dtype: torch.dtype):
    from tests.recipe_helpers import make_llama
    base = make_llama(tmp_path / "base", 0, dtype=dtype, intermediate=320)    # rows of 320: bf16 rounds ranks
    return base, [make_llama(tmp_path / n, s, base=base, dtype=dtype, intermediate=320) for n, s in (("a", 1), ("b", 2))]


def _recipe(tmp_path: Path, method: str, base: Path, models: list[Path], rescale: bool, dtype: str | None) -> Path:
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    recipe = {"merge_method": method, "base_model": str(base), **({"dtype": dtype} if dtype else {}),
              "models": [{"model": str(models[0]), "parameters": {"weight": 0.6, "density": 0.3, **extra}},
                         {"model": str(models[1]), "parameters": {"weight": 0.45, "density": 0.6, **extra}}],
              "parameters": {"normalize": True, "rescale": rescale}}
    path = tmp_path / f"{method}-{rescale}-{dtype}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_weights_as_mergekit_with_its_random_seed(tmp_path, dtype):
    """mergekit 0.1.5 with ``random_seed``: bit for bit on every tensor, whole and in blocks, except float32 with the
    L1 rescale: the same entries kept, values to float32 rounding (its sums are torch's, ours a fixed order)."""
    from tests.recipe_helpers import mergekit_exe, run_mergekit_batch
    mergekit_exe()
    base, models = _llamas(tmp_path, dtype)
    name = "float32" if dtype == torch.float32 else "bfloat16"
    cases = [(m, r, d) for m in ("dare_ties", "dare_linear", "della", "della_linear") for r in (False, True)
             for d in ((name,) if dtype == torch.float32 else (name, None))]
    jobs = [(_recipe(tmp_path, m, base, models, r, d), tmp_path / f"mk-{m}-{r}-{d}") for m, r, d in cases]
    assert run_mergekit_batch(jobs, random_seed=11) == {}
    base_sd = load_state_dict(base)
    for (method, rescale, d), (recipe, mk) in zip(cases, jobs):
        ours = tmp_path / f"ml-{method}-{rescale}-{d}"
        merge_recipe(recipe, ours, random_seed=11)
        a, b = load_state_dict(mk), load_state_dict(ours)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            if not rescale or dtype == torch.bfloat16:     # bfloat16: its sums and their quotient round alike
                assert torch.equal(a[k], b[k]), (method, rescale, d, k)
            else:
                assert torch.equal(a[k] != base_sd[k], b[k] != base_sd[k]), (method, d, k)
                scale = float((a[k] - base_sd[k]).abs().max())
                assert float((a[k] - b[k]).abs().max()) <= 1e-6 * scale, (method, k)
        if not rescale and method == "dare_ties":     # blocks of rows on two threads: the same bits
            from mergelab.engine.streaming import merge
            merge(recipe, tmp_path / f"blocks-{d}", random_seed=11, block_elements=1000, threads=2)
            c = load_state_dict(tmp_path / f"blocks-{d}")
            assert all(torch.equal(a[k], c[k]) for k in a)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergelab", "merge", *args, "--quiet"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_cli_random_seed_and_its_errors(tmp_path):
    base, models = _llamas(tmp_path, torch.float32)
    recipe = _recipe(tmp_path, "dare_ties", base, models, False, "float32")
    ok = _cli(str(recipe), str(tmp_path / "out"), "--random-seed", "11")
    assert ok.returncode == 0, ok.stderr
    again = _cli(str(recipe), str(tmp_path / "again"), "--random-seed", "11")
    assert again.returncode == 0, again.stderr
    a, b = load_state_dict(tmp_path / "out"), load_state_dict(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = tmp_path / "plain.yaml"           # parameters both semantics know
    plain.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(base), "models": [
        {"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}))
    for r, args, message in [(recipe, ["--random-seed", "-1"], "random seed -1: must be an integer in [0, 2^32)"),
                             (recipe, ["--random-seed", str(2**32)], "must be an integer in [0, 2^32)"),
                             (plain, ["--random-seed", "3", "--compat", "paper"], "needs mergekit semantics")]:
        bad = _cli(str(r), str(tmp_path / "bad"), *args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert message in bad.stderr and "Traceback" not in bad.stderr
        assert not (tmp_path / "bad").exists()
