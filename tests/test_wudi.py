"""WUDI-Merging: the worked example (15.4), both Gram forms, the registry path and CUDA when present."""
import pytest
import torch

from mergelab.engine.streaming import merge_state_dicts
from mergelab.methods.wudi import wudi_tensor


def test_worked_example_three_adam_steps():
    tvs = torch.tensor([[[1.0, 0.5], [0.0, 0.0]], [[0.5, 0.0], [0.0, 1.0]]])
    hist = []
    out = wudi_tensor(tvs, iter_num=3, lr=1e-5, history=hist)
    assert hist == pytest.approx([0.8, 0.799964, 0.799928], abs=2e-6)
    assert torch.allclose(out, torch.tensor([[1.49997, 0.49997], [-3.0e-5, 0.99997]]), atol=2e-6)
    orth = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    hist = []
    assert torch.equal(wudi_tensor(orth, 3, history=hist), torch.eye(2)) and hist == [0.0, 0.0, 0.0]


def test_gram_form_of_tall_matrices_follows_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    tall = torch.randn(3, 7, 4, generator=g)      # more rows than columns: the <X^T X, Y^T Y> form
    a = wudi_tensor(tall, iter_num=20, lr=1e-3)
    v = torch.nn.Parameter(tall.sum(0).clone())
    opt = torch.optim.Adam([v], lr=1e-3)
    l2 = tall.reshape(3, -1).pow(2).sum(-1)
    for _ in range(20):
        loss = ((v.unsqueeze(0) - tall) @ tall.transpose(1, 2)).pow(2).sum((1, 2)).div(l2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(a, v.detach(), atol=1e-5)


def test_registry_merge_keeps_non_matrices_at_the_mean():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(5, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    out = merge_state_dicts(base, models, "wudi", {"iter_num": 5})
    tv = torch.stack([m["b"] - base["b"] for m in models])
    assert torch.allclose(out["b"], base["b"] + tv.mean(0), atol=1e-6)
    tvw = torch.stack([m["w"] - base["w"] for m in models])
    assert torch.allclose(out["w"], base["w"] + wudi_tensor(tvw, 5), atol=1e-6)
    excluded = merge_state_dicts(base, models, "wudi", {"iter_num": 5, "exclude": "^w$"})
    assert torch.allclose(excluded["w"], base["w"] + tvw.mean(0), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(2)
    tvs = torch.randn(4, 64, 32, generator=g)
    assert torch.allclose(wudi_tensor(tvs.cuda(), 50, 1e-3).cpu(), wudi_tensor(tvs, 50, 1e-3), atol=1e-4)
