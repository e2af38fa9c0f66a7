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
