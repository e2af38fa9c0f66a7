"""WEMoE: the merged MLP equals task arithmetic at init, gradients reach every router parameter,
entropy training moves the routers, and the folder round trip."""
import re

import pytest
import torch

from mergelab.adapt.wemoe import (WERouter, find_mlp_groups, load_wemoe, parameter_counts, router_parameters,
                                  save_wemoe, upscale_to_wemoe, wemoe_adapt)
from mergelab.errors import MergelabError

torch.set_num_threads(1)


def setup(num_tasks=2, seed=0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     vocab_size=60, max_position_embeddings=32, attn_implementation="eager")
    base = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    sd = base.state_dict()
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}
           for _ in range(num_tasks)]
    heads = []
    for _ in range(num_tasks):
        lin = torch.nn.Linear(16, 3).requires_grad_(False)
        torch.nn.init.normal_(lin.weight, std=1.0, generator=g)
        heads.append(lambda out, lin=lin: lin(out.last_hidden_state.mean(1)))
    loaders = [[{"input_ids": torch.randint(1, 60, (4, 6), generator=g),
                 "attention_mask": torch.ones(4, 6, dtype=torch.long)} for _ in range(2)] for _ in range(num_tasks)]
    return base, fts, heads, loaders


def test_groups_and_task_arithmetic_at_init():
    base, fts, heads, loaders = setup()
    assert find_mlp_groups(base) == [["encoder.layer.0.intermediate", "encoder.layer.0.output.dense"],
                                     ["encoder.layer.1.intermediate", "encoder.layer.1.output.dense"]]
    moe = upscale_to_wemoe(base, fts, router_hidden_layers=0, init_lambda=0.3)
    ta = type(base)(base.config).eval()
    sd = base.state_dict()
    ta.load_state_dict({k: v + 0.3 * sum(f[k] - v for f in fts) if v.is_floating_point() else v for k, v in sd.items()})
    batch = loaders[0][0]
    with torch.no_grad():
        assert torch.allclose(moe(**batch).last_hidden_state, ta(**batch).last_hidden_state, atol=1e-5)
    counts = parameter_counts(moe)
    assert counts["router"] == 2 * 2                  # depth 0: one free lambda per task and layer
    mlp = sum(p.numel() for n, p in base.named_parameters() if re.search(r"layer\.\d\.(intermediate|output)\.dense", n))
    assert counts["task_vector_buffers"] == 2 * mlp


def test_gradients_reach_every_router_parameter():
    base, fts, heads, loaders = setup()
    moe = upscale_to_wemoe(base, fts)
    params = dict((n, p) for n, p in moe.named_parameters() if p.requires_grad)
    assert params and all(".router." in n for n in params)
    assert len(params) == 2 * 4                       # fc1 and fc2, weight and bias, per layer
    for t in range(2):
        from mergelab.adapt.functional import entropy
        entropy(heads[t](moe(**loaders[t][0]))).backward()
    for n, p in params.items():
        assert p.grad is not None and bool((p.grad != 0).any()), n
    assert all(p.grad is None for n, p in moe.named_parameters() if n not in params)


def test_entropy_training_lowers_entropy_and_per_sample_routing():
    base, fts, heads, loaders = setup()
    moe = upscale_to_wemoe(base, fts)
    before = [p.detach().clone() for p in router_parameters(moe)]
    hist = wemoe_adapt(moe, loaders, heads, steps=8, lr=1e-2)
    assert hist[-1]["entropy"] < hist[0]["entropy"]
    assert any(not torch.equal(a, b) for a, b in zip(before, router_parameters(moe)))
    per = upscale_to_wemoe(base, fts, batch_reduce=False, router_hidden_layers=1)
    with torch.no_grad():
        b = loaders[0][0]
        whole = per(**b).last_hidden_state
        one = per(input_ids=b["input_ids"][1:2], attention_mask=b["attention_mask"][1:2]).last_hidden_state
    assert torch.allclose(whole[1:2], one, atol=1e-5)     # each sample its own merged MLP
    with pytest.raises(MergelabError, match="router_hidden_layers"):
        WERouter(4, 2, hidden_layers=3)


def test_save_load_round_trip(tmp_path):
    base, fts, heads, loaders = setup()
    moe = upscale_to_wemoe(base, fts)
    wemoe_adapt(moe, loaders, heads, steps=2, lr=1e-2)
    folder = save_wemoe(moe, tmp_path / "wemoe")
    loaded = load_wemoe(folder)
    assert type(loaded).__name__ == "BertModel"
    a, b = moe.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        x = loaders[1][1]
        assert torch.equal(moe.eval()(**x).last_hidden_state, loaded(**x).last_hidden_state)
    with pytest.raises(MergelabError, match="already exists"):
        save_wemoe(moe, tmp_path / "wemoe")
    with pytest.raises(MergelabError, match="not a WEMoE folder"):
        load_wemoe(tmp_path)
