"""AdaMerging / Concrete subspace learning: gradients, recovery of known optima, entropy, saving."""
import json

import pytest
import torch
from safetensors.torch import load_file

from mergelab.adapt import (FunctionalModel, MergeSpace, adamerging, concrete_merge, entropy, sample_mask,
                            task_vectors_from)
from mergelab.adapt.adamerging import entropy_loss
from mergelab.adapt.functional import Cycle
from mergelab.errors import MergelabError

torch.set_num_threads(2)


# ---------------------------------------------------------------- tiny BERT helpers
def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64, attn_implementation="eager")
    return BertModel(cfg, add_pooling_layer=False)


def bert_setup(num_tasks=2, seed=0):
    model = tiny_bert(seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    tvs = [{k: 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()}
           for _ in range(num_tasks)]
    heads = []
    for t in range(num_tasks):
        lin = torch.nn.Linear(32, 3 + t)
        torch.nn.init.normal_(lin.weight, std=0.5, generator=g)
        heads.append(lambda out, lin=lin: lin(out.last_hidden_state.mean(1)))
    loaders = []
    for t in range(num_tasks):
        ids = torch.randint(1, 100, (12, 8), generator=g)
        loaders.append([{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 8, dtype=torch.long)}
                        for i in range(0, 12, 4)])
    for h in heads:
        for p in h.__defaults__[0].parameters():
            p.requires_grad_(False)
    return model, base, tvs, heads, loaders


# ---------------------------------------------------------------- gradients
def test_gradients_reach_every_coefficient_and_mask_logit():
    model, base, tvs, heads, loaders = bert_setup()
    model.eval()
    space = MergeSpace(base, tvs)
    fm = FunctionalModel(model, space)
    assert "embeddings.position_ids" not in space.keys or base["embeddings.position_ids"].is_floating_point()
    coeffs = torch.full(space.coefficient_shape("layer"), 0.3, requires_grad=True)
    logits = {k: torch.zeros(v.shape, requires_grad=True) for k, v in space.base.items()}
    gen = torch.Generator().manual_seed(0)
    # two mask samples: in float32 a relaxed-Bernoulli draw saturates (m == 1.0 exactly, zero
    # gradient) with probability ~3e-4 per entry, so a single draw leaves a few isolated zeros
    for _ in range(2):
        mask = sample_mask(logits, 0.5, gen)
        loss, _ = entropy_loss(fm, space.params(coeffs, mask), [Cycle(l) for l in loaders], heads, 1)
        loss.backward()
    assert coeffs.grad.shape == (space.num_tensors, 2)
    assert (coeffs.grad != 0).all(), space.keys[int((coeffs.grad == 0).any(1).nonzero()[0])]
    for k, x in logits.items():
        assert x.grad is not None and (x.grad != 0).all(), k
    # the model's own parameters are untouched and get no gradient
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k])


def test_task_wise_gradient_and_functional_output_matches_loaded_model():
    model, base, tvs, heads, loaders = bert_setup()
    model.eval()
    space = MergeSpace(base, tvs)
    fm = FunctionalModel(model, space)
    coeffs = torch.tensor([0.3, 0.7], requires_grad=True)
    loss, _ = entropy_loss(fm, space.params(coeffs), [Cycle(l) for l in loaders], heads, 1)
    loss.backward()
    assert (coeffs.grad != 0).all()
    # the functional model equals a real model loaded with theta0 + sum lambda tau
    merged = {k: base[k] + 0.3 * tvs[0][k] + 0.7 * tvs[1][k] if k in tvs[0] else base[k] for k in base}
    ref = tiny_bert(5)
    ref.load_state_dict(merged)
    ref.eval()
    batch = loaders[0][0]
    with torch.no_grad():
        a = fm(space.params(coeffs.detach()), batch).last_hidden_state
        b = ref(**batch).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- known optimum (synthetic)
class TwoBranch(torch.nn.Module):
    """logits = W1 x + W2 x: two tensors, so layer-wise coefficients differ from task-wise ones."""

    def __init__(self, c=5, d=2):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.zeros(c, d))
        self.w2 = torch.nn.Parameter(torch.zeros(c, d))

    def forward(self, x):
        return x @ self.w1.T + x @ self.w2.T


S, K = 4.0, 3.0


def known_problem(alpha, beta):
    """Task t sees inputs e_t. Its logits are (0, -S + K(a - a*), -S - K(a - a*), -S + K(b - b*),
    -S - K(b - b*)) with a = lambda[w1, t], b = lambda[w2, t]: by the B<->C and D<->E symmetry and
    because S, K keep class 0 on top, the entropy minimum is exactly (a*, b*) = (alpha[t], beta[t])."""
    T = len(alpha)
    base = {"w1": torch.zeros(5, T), "w2": torch.zeros(5, T)}
    tvs = []
    for t in range(T):
        base["w1"][1, t], base["w1"][2, t] = -S - K * alpha[t], -S + K * alpha[t]
        base["w2"][3, t], base["w2"][4, t] = -S - K * beta[t], -S + K * beta[t]
        tv = {"w1": torch.zeros(5, T), "w2": torch.zeros(5, T)}
        tv["w1"][1, t], tv["w1"][2, t] = K, -K
        tv["w2"][3, t], tv["w2"][4, t] = K, -K
        tvs.append(tv)
    loaders = [[torch.eye(T)[t].repeat(4, 1)] for t in range(T)]
    return base, tvs, loaders


def grid_entropy(a, b, astar, bstar):
    z = torch.stack([torch.zeros_like(a), -S + K * (a - astar), -S - K * (a - astar),
                     -S + K * (b - bstar), -S - K * (b - bstar)], -1).double()
    return -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


def test_layer_wise_recovers_known_coefficients():
    alpha, beta = [0.2, 0.6], [0.7, 0.45]
    # the claim in known_problem's docstring, checked on a grid
    g = torch.linspace(0, 1, 201, dtype=torch.float64)
    A, B = torch.meshgrid(g, g, indexing="ij")
    for t in range(2):
        h = grid_entropy(A, B, alpha[t], beta[t])
        i = int(h.argmin())
        assert abs(float(A.flatten()[i]) - alpha[t]) < 1e-9 and abs(float(B.flatten()[i]) - beta[t]) < 1e-9
    base, tvs, loaders = known_problem(alpha, beta)
    res = adamerging(TwoBranch(d=2), base, tvs, loaders, granularity="layer", steps=300, lr=0.01,
                     batches_per_task=1)
    assert res.keys == ["w1", "w2"]
    torch.testing.assert_close(res.coefficients, torch.tensor([alpha, beta]), atol=0.02, rtol=0)
    assert res.history[-1]["entropy"] < res.history[0]["entropy"] - 0.05
    # merged state dict is theta0 + sum lambda tau with the returned coefficients
    c = res.coefficients
    torch.testing.assert_close(res.merged_state_dict["w1"], base["w1"] + c[0, 0] * tvs[0]["w1"] + c[0, 1] * tvs[1]["w1"])


def test_task_wise_recovers_grid_optimum_and_clamps():
    alpha, beta = [0.2, 0.6], [0.7, 0.45]
    base, tvs, loaders = known_problem(alpha, beta)
    g = torch.linspace(0, 1, 2001, dtype=torch.float64)
    want = [float(g[grid_entropy(g, g, alpha[t], beta[t]).argmin()]) for t in range(2)]
    res = adamerging(TwoBranch(d=2), base, tvs, loaders, granularity="task", steps=300, lr=0.01,
                     batches_per_task=1)
    torch.testing.assert_close(res.coefficients, torch.tensor(want, dtype=torch.float32), atol=0.02, rtol=0)
    # a task vector that only raises a competitor: the optimum is lambda = 0, reached only by clamping
    base2, tvs2, loaders2 = known_problem([0.5], [0.5])
    tvs2 = [{"w1": torch.zeros(5, 1), "w2": torch.tensor([[0.0], [3.0], [0], [0], [0]])}]
    res = adamerging(TwoBranch(d=1), base2, tvs2, loaders2, granularity="task", steps=200, lr=0.01,
                     batches_per_task=1, clamp=True)
    assert float(res.coefficients[0]) == 0.0
    res = adamerging(TwoBranch(d=1), base2, tvs2, loaders2, granularity="task", steps=200, lr=0.01,
                     batches_per_task=1, clamp=False)
    assert float(res.coefficients[0]) < -0.5


def test_concrete_ta_learns_the_known_mask():
    """Task t's input only meets column t; tau raises every class there (w1 holds task 0's column,
    w2 task 1's). Only the entry that raises the class the base already prefers lowers the entropy,
    so the learned mask keeps exactly those; entries where tau is 0 only dilute the 1/mean rescale."""
    T, C = 2, 4
    base = {"w1": torch.zeros(C, T), "w2": torch.zeros(C, T)}
    base["w1"][0, 0], base["w2"][1, 1] = 0.5, 0.5
    tv = {"w1": torch.zeros(C, T), "w2": torch.zeros(C, T)}
    tv["w1"][:, 0], tv["w2"][:, 1] = 4.0, 4.0
    tvs = [tv, {k: v.clone() for k, v in tv.items()}]
    loaders = [[torch.eye(T)[t].repeat(4, 1)] for t in range(T)]
    model = TwoBranch(c=C, d=T)
    res = concrete_merge(model, base, tvs, loaders, inner="task_arithmetic", steps=150, lr=0.05,
                         mask="threshold", lam=0.3)
    want = {"w1": torch.zeros(C, T), "w2": torch.zeros(C, T)}
    want["w1"][0, 0] = want["w2"][1, 1] = float(C * T)  # one kept entry, rescaled by 1/mean
    torch.testing.assert_close(res.mask, want)
    ent = [h["entropy"] for h in res.history]
    assert sum(ent[-10:]) / 10 < sum(ent[:10]) / 10 - 0.1
    for k in ("w1", "w2"):
        torch.testing.assert_close(res.merged_state_dict[k], base[k] + 0.3 * 2 * tv[k] * res.mask[k])


# ---------------------------------------------------------------- real tiny transformer
def test_adamerging_bert_entropy_decreases_and_result_reproduces_outputs(tmp_path):
    model, base, tvs, heads, loaders = bert_setup()
    seen = []
    res = adamerging(model, base, tvs, loaders, heads, granularity="layer", steps=25, lr=0.05,
                     progress=seen.append, eval_fn=lambda sd: 0.5, eval_every=10)
    assert len(seen) == 25 and seen[-1]["step"] == 25
    ent = [h["entropy"] for h in res.history if "entropy" in h]
    assert sum(ent[-5:]) / 5 < sum(ent[:5]) / 5
    assert [h["step"] for h in res.history if "val_accuracy" in h] == [0, 10, 20, 25]
    # save, reload into a fresh model: outputs equal the functional model's with the final coefficients
    from safetensors.torch import save_file
    save_file(res.merged_state_dict, str(tmp_path / "model.safetensors"))
    res.save_side_files(tmp_path)
    fresh = tiny_bert(9)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    fresh.eval()
    model.eval()
    space = MergeSpace(base, tvs)
    side = load_file(str(tmp_path / "adapt_result.safetensors"))
    with torch.no_grad():
        for t in range(2):
            a = heads[t](FunctionalModel(model, space)(space.params(side["coefficients"]), loaders[t][0]))
            b = heads[t](fresh(**loaders[t][0]))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    doc = json.loads((tmp_path / "adapt_result.json").read_text())
    assert doc["config"]["granularity"] == "layer" and len(doc["keys"]) == side["coefficients"].shape[0]


def test_concrete_adamerging_bert_runs_both_stages():
    model, base, tvs, heads, loaders = bert_setup()
    res = concrete_merge(model, base, tvs, loaders, heads, inner="adamerging", steps=6, tta_steps=6,
                         lr=0.05, tta_lr=0.05, mask="continuous")
    stages = [h["stage"] for h in res.history]
    assert stages == ["mask"] * 6 + ["tta"] * 6 and "inner_entropy" in res.history[0]
    assert res.coefficients.shape == (len(res.keys), 2)
    assert not torch.allclose(res.coefficients, torch.full_like(res.coefficients, 0.3))
    for k in res.keys:
        torch.testing.assert_close(res.mask[k].mean(), torch.tensor(1.0))
    space = MergeSpace(base, tvs)
    torch.testing.assert_close(res.merged_state_dict, space.state_dict(res.coefficients, res.mask))


def test_bad_inputs_are_reported():
    model, base, tvs, heads, loaders = bert_setup()
    with pytest.raises(MergelabError, match="2 task vectors but 1 data loaders"):
        adamerging(model, base, tvs, loaders[:1], heads, steps=1)
    with pytest.raises(MergelabError, match="granularity"):
        adamerging(model, base, tvs, loaders, heads, granularity="row", steps=1)
    bad = [dict(tvs[0]), tvs[1]]
    bad[0]["encoder.layer.0.output.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(MergelabError, match="encoder.layer.0.output.dense.weight"):
        adamerging(model, base, bad, loaders, heads, steps=1)
    with pytest.raises(MergelabError, match="yields no batches"):
        adamerging(model, base, tvs, [[], loaders[1]], heads, steps=1)
    with pytest.raises(MergelabError, match="mask must be"):
        concrete_merge(model, base, tvs, loaders, heads, mask="soft", steps=1)
    with pytest.raises(MergelabError, match="lacks tensor"):
        task_vectors_from(base, [{}])


def test_entropy_matches_definition():
    z = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    torch.testing.assert_close(entropy(z), torch.tensor(0.6931472 / 2), atol=1e-6, rtol=0)
