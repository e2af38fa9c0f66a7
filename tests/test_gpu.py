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
