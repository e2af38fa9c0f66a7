"""AdaMerging / Concrete subspace learning: gradients, recovery of known optima, entropy, saving."""
import json

import pytest
import torch
from safetensors.torch import load_file

from mergelab.adapt import (FunctionalModel, MergeSpace, adamerging, concrete_merge, entropy, sample_mask,
                            task_vectors_from)
from mergelab.adapt.adamerging import entropy_backward
from mergelab.adapt.functional import Cycle
from mergelab.errors import MergelabError

torch.set_num_threads(1)  # tiny ops: a second thread only waits for a busy core


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
        entropy_backward(fm, space.params(coeffs, mask), [Cycle(l) for l in loaders], heads, 1)
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
    entropy_backward(fm, space.params(coeffs), [Cycle(l) for l in loaders], heads, 2)
    assert (coeffs.grad != 0).all()
    # per-batch backward gives the gradient of one backward through the summed loss
    ref_c = coeffs.detach().clone().requires_grad_()
    cycles = [Cycle(l) for l in loaders]
    params = space.params(ref_c)
    total = sum(entropy(heads[t](fm(params, next(cycles[t])))) for t in range(2) for _ in range(2))
    total.backward()
    torch.testing.assert_close(coeffs.grad, ref_c.grad, rtol=1e-4, atol=1e-7)
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
    res = adamerging(TwoBranch(d=2), base, tvs, loaders, granularity="layer", steps=100, lr=0.03,
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
    res = adamerging(TwoBranch(d=2), base, tvs, loaders, granularity="task", steps=100, lr=0.03,
                     batches_per_task=1)
    torch.testing.assert_close(res.coefficients, torch.tensor(want, dtype=torch.float32), atol=0.02, rtol=0)
    # a task vector that only raises a competitor: the optimum is lambda = 0, reached only by clamping
    base2, tvs2, loaders2 = known_problem([0.5], [0.5])
    tvs2 = [{"w1": torch.zeros(5, 1), "w2": torch.tensor([[0.0], [3.0], [0], [0], [0]])}]
    res = adamerging(TwoBranch(d=1), base2, tvs2, loaders2, granularity="task", steps=60, lr=0.03,
                     batches_per_task=1, clamp=True)
    assert float(res.coefficients[0]) == 0.0
    res = adamerging(TwoBranch(d=1), base2, tvs2, loaders2, granularity="task", steps=60, lr=0.03,
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
    res = concrete_merge(model, base, tvs, loaders, inner="task_arithmetic", steps=120, lr=0.05,
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
    res = adamerging(model, base, tvs, loaders, heads, granularity="layer", steps=12, lr=0.05,
                     progress=seen.append, eval_fn=lambda sd: 0.5, eval_every=5)
    assert len(seen) == 12 and seen[-1]["step"] == 12
    ent = [h["entropy"] for h in res.history if "entropy" in h]
    assert sum(ent[-4:]) / 4 < sum(ent[:4]) / 4
    assert [h["step"] for h in res.history if "val_accuracy" in h] == [0, 5, 10, 12]
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


def test_ties_select_matches_worked_example():
    from mergelab.adapt.tiesprep import ties_select
    tv = torch.tensor([[0.9, -0.1, 0.3, -0.6, 0.05], [-0.4, 0.2, 0.8, 0.7, -0.02], [0.5, -0.3, -0.1, 0.2, 0.01]])
    out = ties_select([{"a": r[:2].clone(), "b": r[2:].clone()} for r in tv], 0.4)
    got = torch.stack([torch.cat([o["a"], o["b"]]) for o in out])
    want = torch.tensor([[0.9, 0, 0.3, 0, 0], [0, 0, 0.8, 0.7, 0], [0.5, -0.3, 0, 0.2, 0]])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(0), torch.tensor([1.4, -0.3, 1.1, 0.9, 0]))  # TIES dis-sum


# ---------------------------------------------------------------- CLI end to end
WORDS = [f"w{i}" for i in range(95)]


def _cli(argv):
    import argparse
    from mergelab.cli.adapt import add_parser
    parser = argparse.ArgumentParser(prog="mergelab")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MergelabError as exc:
        return f"error: {exc}"


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    """A tiny BERT base with its tokenizer, two fine-tunes trained for a few real steps on two toy
    tasks through frozen linear heads, and a --data folder with inputs, heads and labelled val."""
    from safetensors.torch import save_file
    from transformers import BertTokenizer
    root = tmp_path_factory.mktemp("adapt_cli")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizer(vocab_file=str(vocab))
    base = tiny_bert(0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(0)
    rng = torch.Generator().manual_seed(1)

    def make(task, n):  # task 0: label = first word in w0..w47 ; task 1: 3 classes by word id mod 3
        texts, labels = [], []
        for _ in range(n):
            ids = torch.randint(0, 95, (6,), generator=rng).tolist()
            texts.append(" ".join(WORDS[i] for i in ids))
            labels.append(int(ids[0] < 47) if task == 0 else ids[0] % 3)
        return texts, labels

    recipe_models, data = [], root / "data"
    for t, ncls in enumerate((2, 3)):
        head = torch.nn.Linear(32, ncls)
        torch.nn.init.normal_(head.weight, std=0.3, generator=g)
        head.requires_grad_(False)
        model = tiny_bert(0)
        from mergelab.adapt.text import PooledEncoder, pad_batch, tokenize
        pm = PooledEncoder(model)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        texts, labels = make(t, 64)
        seqs = tokenize(tok, texts, 16)
        for step in range(4):
            b = pad_batch(seqs[step * 16:(step + 1) * 16])
            loss = torch.nn.functional.cross_entropy(head(pm(**b)), torch.tensor(labels[step * 16:(step + 1) * 16]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(root / f"ft{t}")
        recipe_models.append(str(root / f"ft{t}"))
        d = data / f"task{t}"
        d.mkdir(parents=True)
        (d / "inputs.txt").write_text("\n".join(make(t, 24)[0]) + "\n")
        save_file({"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}, str(d / "head.safetensors"))
        vt, vl = make(t, 20)
        (d / "val.tsv").write_text("".join(f"{lab}\t{txt}\n" for txt, lab in zip(vt, vl)))
    (data / "tasks.txt").write_text("task0\ntask1\n")
    import yaml
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base_model": str(root / "base"),
                                      "models": [{"model": m} for m in recipe_models],
                                      "parameters": {"batch_size": 8, "max_length": 16}}))
    return root, recipe, data, tok


def _merged_from_side(root, out, res_mask=None):
    from mergelab.io import load_state_dict
    base = load_state_dict(root / "base")
    fts = [load_state_dict(root / f"ft{t}") for t in range(2)]
    side = load_file(str(out / "adapt_result.safetensors"))
    doc = json.loads((out / "adapt_result.json").read_text())
    c = side["coefficients"]
    merged = {}
    for i, k in enumerate(doc["keys"]):
        ci = c if c.dim() == 1 else c[i]
        delta = sum(ci[t] * (fts[t][k] - base[k]) for t in range(2))
        if f"mask.{k}" in side:
            delta = delta * side[f"mask.{k}"]
        merged[k] = base[k] + delta
    return merged, side, doc


def test_cli_adamerging_writes_checkpoint_that_reproduces_outputs(cli_world, capsys):
    from transformers import AutoModel
    from mergelab.adapt.text import PooledEncoder, pad_batch, tokenize
    from mergelab.io import load_state_dict
    root, recipe, data, tok = cli_world
    out = root / "out_am"
    assert _cli(["adapt", "adamerging", str(recipe), str(out), "--data", str(data), "--steps", "6",
                 "--lr", "0.05", "--granularity", "layer", "--eval-every", "3"]) == 0
    printed = capsys.readouterr().out
    assert "seconds per step" in printed and "average validation accuracy" in printed
    for f in ("config.json", "model.safetensors", "tokenizer.json", "adapt_result.safetensors", "adapt_result.json", "history.png"):
        assert (out / f).is_file(), f
    assert not [p for p in root.iterdir() if p.name.startswith(".out_am")]  # no temp folder left
    merged, side, doc = _merged_from_side(root, out)
    assert side["coefficients"].shape == (len(doc["keys"]), 2)
    assert [h["step"] for h in doc["history"]] == list(range(7))  # step 0 = validation before adapting
    assert [h["step"] for h in doc["history"] if "val_accuracy" in h] == [0, 3, 6]
    saved = load_state_dict(out)
    for k, v in merged.items():
        torch.testing.assert_close(saved[k], v, rtol=1e-5, atol=1e-6)
    # the checkpoint loads with transformers and gives the adapted model's outputs
    model = AutoModel.from_pretrained(out, attn_implementation="eager").eval()
    ref = tiny_bert(3)
    ref.load_state_dict(merged, strict=False)
    ref.eval()
    b = pad_batch(tokenize(tok, ["w1 w2 w3", "w40 w41 w50 w60"], 16))
    with torch.no_grad():
        torch.testing.assert_close(PooledEncoder(model)(**b), PooledEncoder(ref)(**b), rtol=1e-5, atol=1e-5)
    # an existing OUT_DIR is refused without --force
    msg = _cli(["adapt", "adamerging", str(recipe), str(out), "--data", str(data), "--steps", "1"])
    assert isinstance(msg, str) and "already exists" in msg


def test_cli_concrete_adamerging_and_errors(cli_world, capsys):
    from mergelab.io import load_state_dict
    root, recipe, data, tok = cli_world
    out = root / "out_cc"
    assert _cli(["adapt", "concrete", str(recipe), str(out), "--data", str(data), "--inner", "adamerging",
                 "--steps", "3", "--tta-steps", "3", "--lr", "0.05", "--mask", "threshold",
                 "--granularity", "task", "--batches-per-task", "1"]) == 0
    merged, side, doc = _merged_from_side(root, out)
    # the summary gives each stage's own start and end entropy (issue 21, item 7)
    ent = {st: [h["entropy"] for h in doc["history"] if h.get("stage") == st and "entropy" in h]
           for st in ("mask", "tta")}
    expected = (f"mask entropy {ent['mask'][0]:.4f} -> {ent['mask'][-1]:.4f}; "
                f"tta entropy {ent['tta'][0]:.4f} -> {ent['tta'][-1]:.4f}")
    assert expected in capsys.readouterr().out
    assert doc["config"]["method"] == "concrete_adamerging" and side["coefficients"].shape == (2,)
    for k in doc["keys"]:  # a thresholded mask is binary, rescaled by 1/mean: values {0, c}, mean 1
        m = side[f"mask.{k}"]  # (or all 0, e.g. attention key biases: their gradient is exactly 0)
        assert (m == 0).all() or (len(m[m != 0].unique()) == 1 and abs(float(m.mean()) - 1) < 1e-4), k
    saved = load_state_dict(out)
    for k, v in merged.items():
        torch.testing.assert_close(saved[k], v, rtol=1e-5, atol=1e-6)
    bad = root / "bad_recipe.yaml"
    bad.write_text(recipe.read_text().replace("batch_size: 8", "batch_sise: 8"))
    msg = _cli(["adapt", "concrete", str(bad), str(root / "x"), "--data", str(data), "--steps", "1"])
    assert "batch_sise" in msg
    msg = _cli(["adapt", "adamerging", str(recipe), str(root / "x"), "--data", str(data / "task0"), "--steps", "1"])
    assert "task folders for 2 models" in msg
    assert not (root / "x").exists()


def test_bench_builder_returns_adapted_encoder(tmp_path):
    """The builder protocol of mergelab.bench (ModelPool / TaskPool duck-typed here)."""
    import copy
    from types import SimpleNamespace
    from mergelab.bench.adapt_methods import STATS, adapt_builder
    model, base, tvs, heads, loaders = bert_setup()
    names = ["a", "b"]
    g = torch.Generator().manual_seed(3)
    seqs = {n: [torch.randint(1, 100, (int(L),), generator=g).tolist() for L in torch.randint(3, 9, (10,), generator=g)]
            for n in names}

    def encoder(sd=None):
        enc = copy.deepcopy(model)
        if sd is not None:
            enc.load_state_dict(sd, strict=False)
        return enc.eval()

    lin = [torch.nn.Linear(32, 3).requires_grad_(False) for _ in names]
    models = SimpleNamespace(base=model, base_sd=base, pad_id=0, encoder=encoder,
                             finetuned={n: {k: base[k] + tvs[i].get(k, 0) for k in base} for i, n in enumerate(names)},
                             heads=dict(zip(names, lin)))
    tasks = SimpleNamespace(names=names, inputs=lambda n, split: seqs[n], labels=lambda n, split: [0] * 10)
    enc = adapt_builder(models, tasks, {"kind": "adamerging", "granularity": "task", "steps": 3, "lr": 0.05,
                                        "batches_per_task": 1, "batch_size": 4, "label": "am", "track_val": True,
                                        "plot_dir": str(tmp_path)})
    st = STATS[-1]
    c = torch.tensor(st["coefficients"])
    want = {k: base[k] + c[0] * tvs[0][k] + c[1] * tvs[1][k] if k in tvs[0] else base[k] for k in base}
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)
    assert st["steps_run"] == 3 and st["seconds_per_step"] > 0 and len(st["val_accuracy"]) >= 2
    assert (tmp_path / "am.png").is_file()
    info = enc.bench_info     # what the benchmark row reports
    assert info["coefficients"] == [round(float(x), 4) for x in c] and info["steps_run"] == 3
    assert info["coefficients_min"] == pytest.approx(float(c.min())) and "mask_kept_fraction" not in info
    enc = adapt_builder(models, tasks, {"kind": "concrete", "inner": "task_arithmetic", "steps": 2, "lr": 0.05,
                                        "batch_size": 4, "label": "cta"})
    info = enc.bench_info
    assert 0.0 <= info["mask_kept_fraction"] <= 1.0 and 0.0 < info["mask_mean_keep_probability"] < 1.0
    assert info["mask_entries"] == sum(v.numel() for v in tvs[0].values()) and info["warnings"] == []


def test_pairing_warnings_name_the_models_a_task_seems_to_belong_to():
    from mergelab.cli.adapt import pairing_warnings
    models = ["cache/ft_foldoc", "cache/ft_gcide", "cache/ft_wordnet"]
    assert pairing_warnings(["foldoc", "gcide", "wordnet"], models) == []
    assert pairing_warnings(["task0", "task1", "task2"], models) == []          # nothing to compare
    warns = pairing_warnings(["gcide", "foldoc", "wordnet"], models)
    assert len(warns) == 2 and "task 'gcide' (task folder 1) is paired with models[0] (cache/ft_foldoc)" in warns[0]
    assert "models[1] (cache/ft_gcide)" in warns[0] and "check the order" in warns[0]
    # whole tokens of the model folder's own name only: 't1' is not in 'ft1', nor in '/tmp/pytest-1/...'
    assert pairing_warnings(["t0", "t1"], ["/tmp/pytest-1/models/ft1", "/tmp/pytest-1/models/ft2"]) == []
    assert pairing_warnings(["wordnet_noun", "foldoc"], ["c/foldoc-ab12", "c/wordnet_noun-cd34"])[0].startswith(
        "task 'wordnet_noun' (task folder 1) is paired with models[0] (c/foldoc-ab12), but its name is in models[1]")


def test_cli_warns_on_misaligned_tasks_and_notes_the_head_fallback(cli_world, tmp_path, capsys):
    import shutil

    import yaml
    root, recipe, data, tok = cli_world
    models = []
    for t, name in enumerate(("foldoc", "gcide")):
        shutil.copytree(root / f"ft{t}", tmp_path / "models" / name)
        shutil.copy(data / f"task{t}" / "head.safetensors", tmp_path / "models" / name / "head.safetensors")
        models.append(str(tmp_path / "models" / name))
        (tmp_path / "data" / name).mkdir(parents=True)
        shutil.copy(data / f"task{t}" / "inputs.txt", tmp_path / "data" / name / "inputs.txt")
    (tmp_path / "data" / "tasks.txt").write_text("gcide\nfoldoc\n")       # the wrong order for the recipe
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"base_model": str(root / "base"),
                                                     "models": [{"model": m} for m in models],
                                                     "parameters": {"batch_size": 8, "max_length": 16}}))
    assert _cli(["adapt", "adamerging", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--data",
                 str(tmp_path / "data"), "--steps", "1", "--granularity", "task"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: task '") == 2 and "task 'gcide' (task folder 1) is paired with models[0]" in err
    assert err.count("uses the head of its model folder") == 2
    assert f"{tmp_path / 'data' / 'gcide' / 'head.safetensors'} is missing" in err


# ---------------------------------------------------------------- Concrete: defaults, warnings, start, stop (issue 15)
def _known_mask_problem():
    T, C = 2, 4
    base = {"w1": torch.zeros(C, T), "w2": torch.zeros(C, T)}
    base["w1"][0, 0], base["w2"][1, 1] = 0.5, 0.5
    tv = {"w1": torch.zeros(C, T), "w2": torch.zeros(C, T)}
    tv["w1"][:, 0], tv["w2"][:, 1] = 4.0, 4.0
    loaders = [[torch.eye(T)[t].repeat(4, 1)] for t in range(T)]
    return TwoBranch(c=C, d=T), base, [tv, {k: v.clone() for k, v in tv.items()}], loaders


def test_concrete_defaults_are_the_authors_and_degenerate_settings_are_named():
    model, base, tvs, loaders = _known_mask_problem()
    res = concrete_merge(model, base, tvs, loaders, inner="adamerging", granularity="task", steps=2, tta_steps=2)
    assert res.config["clamp"] is True and res.config["inner_lr"] == 1e-3 and res.config["warnings"] == []
    bad = concrete_merge(model, base, tvs, loaders, inner="adamerging", granularity="task", steps=2, tta_steps=2,
                         inner_lr=1.0, clamp=False, tta_lr=0.1)
    text = " ".join(bad.config["warnings"])
    assert "inner_lr 1.0 with Adam" in text and "clamp off" in text and "tta_lr 0.1" in text
    sgd = concrete_merge(model, base, tvs, loaders, inner="adamerging", granularity="task", steps=2, tta_steps=0,
                         inner_optimizer="sgd", inner_lr=1.0)
    assert sgd.config["warnings"] == [] and sgd.config["inner_optimizer"] == "sgd"
    with pytest.raises(MergelabError, match="inner_optimizer"):
        concrete_merge(model, base, tvs, loaders, inner_optimizer="rmsprop", steps=1)


def test_concrete_starts_from_given_mask_logits():
    model, base, tvs, loaders = _known_mask_problem()
    start = {k: torch.where(torch.rand(v.shape, generator=torch.Generator().manual_seed(1)) > 0.5, 3.0, -3.0)
             for k, v in base.items()}
    res = concrete_merge(model, base, tvs, loaders, inner="task_arithmetic", steps=0, mask="threshold",
                         init_mask_logits=start)
    for k in base:
        kept = start[k] > 0
        assert bool((res.mask[k] > 0).eq(kept).all()) and res.config["started_from_mask"]
        torch.testing.assert_close(res.mask_logits[k], start[k])
    with pytest.raises(MergelabError, match="has no logits for 'w2'"):
        concrete_merge(model, base, tvs, loaders, steps=0, init_mask_logits={"w1": start["w1"]})


def test_concrete_early_stopping_keeps_the_best_mask():
    model, base, tvs, loaders = _known_mask_problem()
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2, 0.1])           # validation gets worse after the first evaluation
    seen = []

    def eval_fn(sd):
        return next(scores)

    res = concrete_merge(model, base, tvs, loaders, inner="task_arithmetic", steps=50, lr=0.05, mask="threshold",
                         eval_fn=eval_fn, eval_every=2, patience=2, progress=seen.append)
    assert res.config["mask_steps_run"] == 6 and res.config["best_mask_step"] == 2 and seen[-1].get("early_stop")
    # held-out unlabelled data as the criterion: runs, and records the held-out entropy
    res = concrete_merge(model, base, tvs, loaders, inner="task_arithmetic", steps=6, lr=0.05, eval_every=3,
                         patience=5, holdout_loaders=loaders)
    assert [round(h["step"]) for h in res.history if "holdout_entropy" in h] == [3, 6]
    with pytest.raises(MergelabError, match="patience needs eval_every"):
        concrete_merge(model, base, tvs, loaders, steps=1, patience=1, holdout_loaders=loaders)


def test_cli_concrete_adamerging_starts_from_the_concrete_ta_mask(cli_world, capsys):
    root, recipe, data, tok = cli_world
    ta = root / "out_cta"
    assert _cli(["adapt", "concrete", str(recipe), str(ta), "--data", str(data), "--steps", "2"]) == 0
    out = root / "out_cam"
    assert _cli(["adapt", "concrete", str(recipe), str(out), "--data", str(data), "--inner", "adamerging",
                 "--steps", "1", "--tta-steps", "1", "--granularity", "task", "--init-mask", str(ta),
                 "--inner-lr", "1.0"]) == 0
    doc = json.loads((out / "adapt_result.json").read_text())
    assert doc["config"]["started_from_mask"] is True
    assert "inner_lr 1.0 with Adam" in capsys.readouterr().err        # the degenerate setting is named
    msg = _cli(["adapt", "concrete", str(recipe), str(root / "y"), "--data", str(data), "--init-mask", str(data)])
    assert isinstance(msg, str) and "cannot read mask logits" in msg and not (root / "y").exists()
