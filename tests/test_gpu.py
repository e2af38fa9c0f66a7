"""GPU path: the per-tensor math on CUDA gives the CPU results. Skipped on machines without a GPU
(CI has none); run on a GPU machine with `pytest tests/test_gpu.py`."""

import pytest
import torch

from mergelab import merge, merge_state_dicts
from mergelab.io import load_state_dict
from mergelab.methods import list_methods
from tests.helpers import make_model_folders, write_recipe
from tests.test_methods import tiny_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("compat", ["paper", "mergekit"])
def test_cuda_matches_cpu_for_every_method(compat):
    base, models = tiny_models(seed=11)
    for m in list_methods():
        if compat == "mergekit" and m.name in ("average", "model_stock"):
            params = {}
        else:
            params = {"density": 0.4} if any(p.name == "density" for p in m.params) else {}
        b = None if m.name == "average" else base
        cpu = merge_state_dicts(b, models, m.name, params, compat=compat)
        gpu = merge_state_dicts(b, models, m.name, params, compat=compat, device="cuda")
        for k in cpu:
            assert torch.allclose(cpu[k], gpu[k], atol=1e-6), (m.name, k)


def test_cuda_streaming_merge_of_folders(tmp_path):
    base, models = make_model_folders(tmp_path / "m")
    recipe = write_recipe(tmp_path / "r.yaml", base, models, "ties", {"density": 0.3})
    merge(recipe, tmp_path / "cpu")
    merge(recipe, tmp_path / "gpu", device="cuda", threads=3)
    a, b = load_state_dict(tmp_path / "cpu"), load_state_dict(tmp_path / "gpu")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_smile_on_cuda_matches_cpu(tmp_path):
    """SMILE built from CUDA modules (SVD on the GPU) routes and computes like the CPU build."""
    from transformers import AutoModel

    from mergelab.upscale.smile import upscale_to_smile
    base_dir, model_dirs = make_model_folders(tmp_path / "m", scale=0.05)
    load = lambda p, dev: AutoModel.from_pretrained(p, attn_implementation="eager").to(dev).eval()  # noqa: E731
    x = torch.randint(5, 100, (2, 12))
    outputs = {}
    for dev in ("cpu", "cuda"):
        model = upscale_to_smile(load(base_dir, dev), [load(p, dev) for p in model_dirs], k=8, gate_k=4,
                                 full_svd=True)
        with torch.no_grad():
            outputs[dev] = model(input_ids=x.to(dev)).last_hidden_state.cpu()
    assert torch.allclose(outputs["cpu"], outputs["cuda"], atol=1e-4)


def bench_on(device, cache):
    """The tiny two-task benchmark (real BERT, real fine-tuning steps, zero-shot heads) on one device."""
    from mergelab.bench import smile_methods
    from mergelab.bench.runner import run_benchmark
    from mergelab.bench.suite import MethodSpec
    from tests.test_bench_zeroshot import _tiny_suite, tiny

    methods = [MethodSpec("ties", "ties", grid={"density": [0.2, 0.5]}, default={"density": 0.2}),
               MethodSpec("smile", builder=smile_methods.bench_builder, params={"k": 2, "gate_k": 2})]
    return run_benchmark(_tiny_suite(methods, steps=4), cache_dir=cache, threads=None, base=tiny(), device=device,
                         eval_cache=False)


def test_bench_fine_tunes_merges_and_scores_on_cuda(tmp_path):
    """`mergelab bench --device cuda`: the same rows as on the CPU, each accuracy within two test examples per
    task of the CPU's (fine-tuning on another device is not bit-identical)."""
    cpu = bench_on("cpu", tmp_path / "cpu")
    gpu = bench_on("cuda", tmp_path / "cuda")
    assert gpu["device"] == "cuda" and set(gpu["rows"]) == set(cpu["rows"])
    for name, row in cpu["rows"].items():
        assert row.get("kind") != "failed" and gpu["rows"][name].get("kind") != "failed", (name, gpu["rows"][name])
        for task, acc in row["per_task"].items():
            assert abs(gpu["rows"][name]["per_task"][task] - acc) <= 2 / 12 + 1e-9, (name, task)
