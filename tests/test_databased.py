"""RegMean, RegMean++ and Fisher merging on hand-computed examples and a tiny BERT."""
import pytest
import torch

from mergelab.databased import regmean, regmean_merge_linear, reduce_non_diagonal
from mergelab.errors import MergelabError

torch.set_num_threads(1)

W1, W2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
X1, X2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])


def gram(x):
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("alpha,want", [(1.0, [0.545455, 0.909091]), (0.95, [0.571976, 0.901104]),
                                        (0.0, [1.0, 0.833333])])
def test_regmean_worked_example(alpha, want):
    w = regmean_merge_linear([W1, W2], [gram(X1), gram(X2)], alpha)
    assert torch.allclose(w.float(), torch.tensor([want]), atol=1e-6)


def test_regmean_hooks_on_a_linear_model_give_the_worked_example():
    """The same example end to end: forward hooks collect G_t from each model's own inputs."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=True))
    sds = [{"0.weight": W1, "0.bias": torch.tensor([1.0])}, {"0.weight": W2, "0.bias": torch.tensor([3.0])}]
    merged = regmean(model, sds, [[X1[:1], X1[1:]], [X2]], alpha=0.95)
    assert torch.allclose(merged["0.weight"], torch.tensor([[0.571976, 0.901104]]), atol=1e-6)
    assert torch.allclose(merged["0.bias"], torch.tensor([2.0]))       # other parameters: the mean


def test_identity_grams_give_the_average():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 4, generator=g) for _ in range(3)]
    got = regmean_merge_linear(ws, [torch.eye(4)] * 3, alpha=0.95)
    assert torch.allclose(got.float(), sum(ws) / 3, atol=1e-6)
    assert torch.equal(reduce_non_diagonal(torch.ones(2, 2), 0.5), torch.tensor([[1.0, 0.5], [0.5, 1.0]]))


def tiny_bert_task(num_tasks=2, seed=0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     vocab_size=60, max_position_embeddings=32, attn_implementation="eager")
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    base = model.state_dict()
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
           for _ in range(num_tasks)]
    loaders = []
    for _ in range(num_tasks):
        ids = torch.randint(1, 60, (8, 10), generator=g)
        mask = torch.ones(8, 10, dtype=torch.long)
        mask[:4, 7:] = 0
        loaders.append([{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]} for i in (0, 4)])
    return model, base, fts, loaders


@pytest.mark.parametrize("plus_plus", [False, True])
def test_one_task_gives_that_task_model(plus_plus):
    model, base, fts, loaders = tiny_bert_task(1)
    merged = regmean(model, fts, loaders, alpha=0.95, plus_plus=plus_plus)
    for k, v in fts[0].items():
        assert torch.allclose(merged[k], v, atol=1e-5), k


def test_regmean_plus_plus_merges_through_the_merged_prefix():
    model, base, fts, loaders = tiny_bert_task(2)
    plain = regmean(model, fts, loaders, alpha=0.9)
    pp = regmean(model, fts, loaders, alpha=0.9, plus_plus=True)
    q0 = "encoder.layer.0.attention.self.query.weight"
    q1 = "encoder.layer.1.attention.self.query.weight"
    # block 0 sees the same inputs (embeddings are averaged only in the merged model: they differ), block 1 differs
    assert not torch.allclose(plain[q1], pp[q1], atol=1e-6)
    mean_ln = (fts[0]["encoder.layer.1.output.LayerNorm.weight"] + fts[1]["encoder.layer.1.output.LayerNorm.weight"]) / 2
    assert torch.allclose(pp["encoder.layer.1.output.LayerNorm.weight"], mean_ln)
    assert plain[q0].shape == pp[q0].shape
    with pytest.raises(MergelabError, match="2 fine-tuned models but 1 data loaders"):
        regmean(model, fts, loaders[:1])


def test_padding_rows_are_not_counted():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x, attention_mask):
            return self.lin(x)
    wrap = Wrap()
    sds = [{"lin.weight": W1, "lin.bias": torch.zeros(1)}, {"lin.weight": W2, "lin.bias": torch.zeros(1)}]
    pad = torch.tensor([[[5.0, -7.0]]])
    b1 = {"x": torch.cat([X1[None], pad], 1), "attention_mask": torch.tensor([[1, 1, 0]])}
    b2 = {"x": torch.cat([X2[None], pad], 1), "attention_mask": torch.tensor([[1, 1, 0]])}
    merged = regmean(wrap, sds, [[b1], [b2]], alpha=1.0)
    assert torch.allclose(merged["lin.weight"], torch.tensor([[0.545455, 0.909091]]), atol=1e-6)
    del model


# ---------------------------------------------------------------- Fisher merging
def test_fisher_worked_example_and_equal_fishers_give_the_average():
    from mergelab.databased import fisher_merge
    models = [{"p": torch.tensor([1.0, 2.0])}, {"p": torch.tensor([3.0, 0.0])}]
    fishers = [{"p": torch.tensor([0.5, 0.1])}, {"p": torch.tensor([0.5, 0.0])}]
    got = fisher_merge(models, fishers, normalize=True)["p"]
    assert torch.allclose(got, torch.tensor([2.009805, 1.999979]), atol=1e-6)
    got = fisher_merge(models, fishers, normalize=False)["p"]
    assert torch.allclose(got, torch.tensor([2.0, 1.999980]), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    ms = [{"a": torch.randn(3, 2, generator=g), "n": torch.tensor(3)} for _ in range(3)]
    f = {"a": torch.rand(3, 2, generator=g)}
    for norm in (True, False):
        out = fisher_merge(ms, [f, f, f], normalize=norm)
        assert torch.allclose(out["a"], sum(m["a"] for m in ms) / 3, atol=1e-6)
        assert torch.equal(out["n"], ms[0]["n"])


def test_per_example_fisher_matches_the_closed_form_of_a_linear_softmax():
    """For logits = W x, d log p_c / dW = (e_c - p) x^T: the expected Fisher is sum_c p_c ((e_c - p) x^T)^2."""
    from mergelab.databased import diagonal_fisher
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(3, 4, bias=False)
    x = torch.randn(5, 3, generator=g)
    want = torch.zeros(4, 3)
    with torch.no_grad():
        for xi in x:
            p = lin(xi).softmax(-1)
            for c in range(4):
                want += p[c] * torch.outer(torch.eye(4)[c] - p, xi) ** 2
    got = diagonal_fisher(lin, [x[:2], x[2:]], num_examples=5)["weight"]
    assert torch.allclose(got, want / 5, atol=1e-6)
    y = torch.tensor([0, 1, 2, 3, 0])
    emp = torch.zeros(4, 3)
    with torch.no_grad():
        for xi, yi in zip(x, y):
            emp += torch.outer(torch.eye(4)[yi] - lin(xi).softmax(-1), xi) ** 2
    got = diagonal_fisher(lin, [(x[:3], y[:3]), (x[3:], y[3:])], labeled=True, num_examples=4)["weight"]
    emp4 = torch.zeros(4, 3)
    with torch.no_grad():
        for xi, yi in zip(x[:4], y[:4]):
            emp4 += torch.outer(torch.eye(4)[yi] - lin(xi).softmax(-1), xi) ** 2
    assert torch.allclose(got, emp4 / 4, atol=1e-6)
    batch = diagonal_fisher(lin, [x], estimator="batch", num_examples=5)["weight"]
    assert batch.shape == (4, 3) and bool((batch >= 0).all())


def test_fisher_merging_a_tiny_bert_with_heads():
    from mergelab.databased import fisher_merging
    model, base, fts, loaders = tiny_bert_task(2)
    heads = [torch.nn.Linear(16, 3).requires_grad_(False) for _ in range(2)]
    fwd = [lambda out, h=h: h(out.last_hidden_state[:, 0]) for h in heads]
    merged = fisher_merging(model, fts, loaders, fwd, num_examples=4)
    k = "encoder.layer.0.intermediate.dense.weight"
    lo = torch.minimum(fts[0][k], fts[1][k]) - 1e-6
    hi = torch.maximum(fts[0][k], fts[1][k]) + 1e-6
    assert bool(((merged[k] >= lo) & (merged[k] <= hi)).all())        # a convex combination per entry
    assert not torch.allclose(merged[k], (fts[0][k] + fts[1][k]) / 2)
    assert list(merged) == list(model.state_dict())
