"""Tests of SMILE upscaling (mergelab.upscale.smile): routing, construction, SVD, save/load, transformers."""

import json
import os

import pytest
import torch
from torch import nn

from mergelab.errors import MergelabError
from mergelab.upscale.smile import (
    SmileLinear,
    count_parameters,
    load_smile,
    parameter_report,
    save_smile,
    smile_linear_from_weights,
    truncated_svd,
    upscale_to_smile,
)

torch.set_num_threads(2)


def _orth(n, r, gen):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
    return q


# ---------------------------------------------------------------- routing on hand-built experts
def _subspace_experts(d_in=12, d_out=7, n_exp=3, rank=2, seed=0):
    """Experts whose deltas live on disjoint input subspaces (blocks of the identity)."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=gen)
    b0 = torch.randn(d_out, generator=gen)
    eye = torch.eye(d_in)
    ws, bs, spans = [], [], []
    for i in range(n_exp):
        v = eye[:, i * rank * 2:(i + 1) * rank * 2][:, :rank]  # rank directions of expert i
        u = torch.randn(d_out, rank, generator=gen)
        ws.append(w0 + u @ v.T)
        bs.append(b0 + torch.randn(d_out, generator=gen))
        spans.append(v)
    return w0, b0, ws, bs, spans, gen


def test_router_picks_the_expert_whose_subspace_holds_the_input():
    w0, b0, ws, bs, spans, gen = _subspace_experts()
    layer = smile_linear_from_weights(w0, b0, ws, bs, k=2, gate_k=2, top_k=1, svd="full")
    for i, v in enumerate(spans):
        x = torch.randn(20, v.shape[1], generator=gen) @ v.T  # inputs in expert i's subspace
        w, idx = layer.routing(x)
        assert torch.equal(idx[:, 0], torch.full((20,), i))
        assert torch.allclose(w, torch.ones(20, 1))
        # the output is exactly base + expert i (rank 2 keeps the whole delta)
        expected = x @ ws[i].T + bs[i]
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_router_logits_are_norms_of_gate_projections_without_singular_values():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(6, 5, generator=gen)
    ws = [w0 + torch.randn(6, 5, generator=gen) * s for s in (0.5, 1.0, 2.0)]
    layer = smile_linear_from_weights(w0, None, ws, k=3, gate_k=2, svd="full")
    x = torch.randn(4, 5, generator=gen)
    manual = []
    for w in ws:
        _, _, vh = torch.linalg.svd(w - w0)
        manual.append((x @ vh[:2].T).norm(dim=1))  # ||V_gate^T x||, no S scaling
    torch.testing.assert_close(layer.router_logits(x), torch.stack(manual, 1), atol=1e-5, rtol=1e-5)


def test_top2_weights_are_renormalised_softmax_and_output_mixes_two_experts():
    gen = torch.Generator().manual_seed(2)
    w0, b0 = torch.randn(5, 8, generator=gen), torch.randn(5, generator=gen)
    ws = [w0 + torch.randn(5, 8, generator=gen) for _ in range(4)]
    bs = [b0 + torch.randn(5, generator=gen) for _ in range(4)]
    layer = smile_linear_from_weights(w0, b0, ws, bs, k=-1, gate_k=3, top_k=2, svd="full")
    x = torch.randn(6, 8, generator=gen)
    p = torch.softmax(layer.router_logits(x), dim=1)
    top, idx = p.topk(2, dim=1)
    w = top / top.sum(1, keepdim=True)
    expected = x @ w0.T + b0
    for t in range(6):
        for j in range(2):
            e = idx[t, j]
            expected[t] += w[t, j] * (x[t] @ (ws[e] - w0).T + (bs[e] - b0))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(layer.routing(x)[0].sum(1), torch.ones(6))


def test_one_expert_has_routing_weight_one_and_batched_shapes_work():
    w0, b0, ws, bs, _, gen = _subspace_experts(n_exp=1)
    layer = smile_linear_from_weights(w0, b0, ws, bs, k=-1, gate_k=1, svd="full")
    x = torch.randn(2, 3, 12, generator=gen)  # [batch, seq, d_in]
    torch.testing.assert_close(layer(x), x @ ws[0].T + bs[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- vectorised forward vs the per-expert loop
def _reference_forward(layer, x):
    """The forward of mergelab <= 2026-11 (loop over experts, torch.where + gather + index_add per expert):
    kept here as the reference the vectorised forward must reproduce."""
    out = torch.nn.functional.linear(x, layer.weight, layer.bias)
    h = x.reshape(-1, layer.in_features)
    w, idx = layer.routing(h)
    delta = torch.zeros(h.shape[0], layer.out_features, dtype=out.dtype)
    for e in range(layer.num_experts):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        d = layer.expert_delta(e, h[tok]) * w[tok, slot].unsqueeze(-1)
        delta.index_add_(0, tok, d.to(delta.dtype))
    return out + delta.view(out.shape)


def _random_smile(n_exp, k, top_k, bias, d_in=24, d_out=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=gen)
    b0 = torch.randn(d_out, generator=gen) if bias else None
    ws = [w0 + torch.randn(d_out, d_in, generator=gen) * 0.3 for _ in range(n_exp)]
    bs = [b0 + torch.randn(d_out, generator=gen) for _ in range(n_exp)] if bias else None
    return smile_linear_from_weights(w0, b0, ws, bs, k=k, gate_k=3, top_k=top_k, svd="full"), gen


@pytest.mark.parametrize("k", [4, -1])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_vectorised_forward_matches_the_per_expert_loop(k, top_k, bias):
    layer, gen = _random_smile(5, k, top_k, bias)
    for shape in [(37, 24), (3, 11, 24), (1, 24)]:
        x = torch.randn(*shape, generator=gen)
        ref = _reference_forward(layer, x)
        for mode in (None, "masked", "grouped"):
            got = layer(x, mode=mode)
            assert got.shape == (*shape[:-1], 20)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # many tokens x unrouted experts: the default groups tokens by expert (only routed pairs computed)
    assert layer.expert_mode(1) == ("grouped" if k == -1 else "masked")
    assert layer.expert_mode(10_000) == "grouped"
    x = torch.randn(4, 200, 24, generator=gen)
    torch.testing.assert_close(layer(x), _reference_forward(layer, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(MergelabError, match="expert mode"):
        layer(x, mode="loop")


def test_vectorised_forward_keeps_gradients_and_bfloat16():
    layer, gen = _random_smile(4, 3, 2, True)
    x = torch.randn(6, 24, generator=gen, requires_grad=True)
    for mode in ("masked", "grouped"):
        layer.zero_grad()
        layer(x, mode=mode).square().sum().backward()
        grads = [layer.expert_A.grad.clone(), layer.expert_B.grad.clone(), layer.expert_bias.grad.clone()]
        layer.zero_grad()
        _reference_forward(layer, x).square().sum().backward()
        for g, ref in zip(grads, [layer.expert_A.grad, layer.expert_B.grad, layer.expert_bias.grad]):
            torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)
    half = layer.to(torch.bfloat16)
    xb = x.detach().to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(half(xb).float(), _reference_forward(half, xb).float(), atol=5e-2, rtol=5e-2)


def test_routing_accepts_any_leading_shape():
    layer, gen = _random_smile(4, 3, 2, True)
    x = torch.randn(2, 5, 24, generator=gen)
    w, idx = layer.routing(x)
    assert w.shape == idx.shape == (2, 5, 2)
    w2, idx2 = layer.routing(x.reshape(10, 24))
    assert torch.equal(idx.reshape(10, 2), idx2)
    torch.testing.assert_close(w.reshape(10, 2), w2)
    assert layer.router_logits(x).shape == (2, 5, 4)
    one, _ = _random_smile(1, 3, 1, True)
    assert [t.shape for t in one.routing(x)] == [(2, 5, 1), (2, 5, 1)]


# ---------------------------------------------------------------- construction semantics
def test_expert_factors_follow_fusionbench_layout():
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(10, 6, generator=gen)
    w1 = w0 + torch.randn(10, 6, generator=gen)
    layer = smile_linear_from_weights(w0, None, [w1], k=3, gate_k=2, svd="full")
    u, s, vh = torch.linalg.svd(w1 - w0, full_matrices=False)
    # A = (S_k V_k)^T, B = U_k, up to the sign of each singular pair
    sign = torch.sign((layer.expert_B[0] * u[:, :3]).sum(0))
    torch.testing.assert_close(layer.expert_B[0], u[:, :3] * sign, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.expert_A[0], (s[:3, None] * vh[:3]) * sign[:, None], atol=1e-5, rtol=1e-4)
    assert layer.gate_weight.shape == (2, 6) and layer.expert_bias is None
    assert layer.k == 3 and layer.gate_k == 2


def test_k_and_gate_k_are_clipped_to_the_matrix_rank_bound():
    w0 = torch.zeros(4, 3)
    layer = smile_linear_from_weights(w0, None, [torch.ones(4, 3), -torch.ones(4, 3)], k=50, gate_k=9)
    assert layer.k == 3 and layer.gate_k == 3 and layer.gate_weight.shape == (6, 3)


def test_all_zero_deltas_leave_a_plain_linear():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ft = {k: v.clone() for k, v in base.state_dict().items()}
    ft["1.weight"] += 0.1
    m = upscale_to_smile(base, [ft, base.state_dict()], k=2, gate_k=1)
    assert type(m[0]) is nn.Linear and isinstance(m[1], SmileLinear)
    assert m.smile_info["skipped_zero_delta"] == ["0"]
    assert isinstance(base[1], nn.Linear)  # the input model is not modified


def test_n1_dense_equals_the_fine_tune_and_full_rank_lowrank_too():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    ft = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    x = torch.randn(32, 8)
    for k in (-1, 8):  # dense experts, and rank = min(out, in) for every layer (8 and 3)
        m = upscale_to_smile(base, [ft], k=k, gate_k=4, full_svd=True)
        torch.testing.assert_close(m(x), ft(x), atol=1e-5, rtol=1e-5)


def test_routing_use_diff_false_builds_gates_from_finetuned_weights():
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(5, 7, generator=gen)
    ws = [w0 + torch.randn(5, 7, generator=gen) for _ in range(2)]
    layer = smile_linear_from_weights(w0, None, ws, k=2, gate_k=2, routing_use_diff=False, svd="full")
    x = torch.randn(3, 7, generator=gen)
    manual = torch.stack([(x @ torch.linalg.svd(w)[2][:2].T).norm(dim=1) for w in ws], 1)
    torch.testing.assert_close(layer.router_logits(x), manual, atol=1e-5, rtol=1e-5)


def test_target_patterns_average_experts_and_bad_inputs():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    fts = []
    for s in (1.0, 3.0):
        sd = {k: v + s for k, v in base.state_dict().items()}
        fts.append(sd)
    m = upscale_to_smile(base, fts, k=1, gate_k=1, target_modules=["2"], average_experts=True)
    assert isinstance(m[2], SmileLinear) and type(m[0]) is nn.Linear
    torch.testing.assert_close(m[0].weight, base[0].weight + 2.0)  # averaged (+1, +3)
    torch.testing.assert_close(m[1].weight, base[1].weight + 2.0)
    torch.testing.assert_close(m[2].weight, base[2].weight)  # upscaled layer keeps the base
    m = upscale_to_smile(base, fts, k=1, gate_k=1, target_modules="2")
    torch.testing.assert_close(m[1].weight, base[1].weight)  # default: base values
    with pytest.raises(MergelabError, match="matches no nn.Linear"):
        upscale_to_smile(base, fts, target_modules=["nope"])
    with pytest.raises(MergelabError, match="k must be"):
        upscale_to_smile(base, fts, k=0)
    bad = dict(fts[0])
    bad["2.weight"] = torch.zeros(3, 4)
    with pytest.raises(MergelabError, match=r"fine-tuned model 1: tensor '2.weight' has shape"):
        upscale_to_smile(base, [fts[0], bad])
    del bad["2.weight"]
    with pytest.raises(MergelabError, match="fine-tuned model 1 has no tensor for '2.weight'"):
        upscale_to_smile(base, [fts[0], bad])


def test_parameter_count_matches_the_published_formula():
    torch.manual_seed(0)
    d_in, d_out, e, k, gk = 12, 20, 3, 4, 2
    base = nn.Sequential(nn.Linear(d_in, d_out))
    fts = [{k_: v + torch.randn_like(v) for k_, v in base.state_dict().items()} for _ in range(e)]
    m = upscale_to_smile(base, fts, k=k, gate_k=gk)
    extra = e * (k * (d_in + d_out) + d_out) + e * gk * d_in
    assert count_parameters(m) == count_parameters(base) + extra
    rep = parameter_report(m, count_parameters(base), e)
    assert rep["separate_params"] == 3 * count_parameters(base)
    assert rep["ratio_vs_base"] == pytest.approx(count_parameters(m) / count_parameters(base))


# ---------------------------------------------------------------- randomized SVD
def _powerlaw(m, n, alpha, gen):
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -alpha
    return (_orth(m, r, gen) * s) @ _orth(n, r, gen).T


@pytest.mark.parametrize("shape", [(96, 96), (192, 48), (48, 192)])
def test_lowrank_svd_matches_full_svd(shape):
    gen = torch.Generator().manual_seed(5)
    a = _powerlaw(*shape, alpha=1.0, gen=gen)  # decaying spectrum, as in fine-tuning deltas
    uf, sf, vf = truncated_svd(a, 6, "full")
    ul, sl, vl = truncated_svd(a, 6, "lowrank")
    assert ul.shape == uf.shape and vl.shape == vf.shape
    torch.testing.assert_close(sl, sf, atol=1e-4, rtol=1e-3)
    ef, el = (uf * sf) @ vf.T, (ul * sl) @ vl.T
    assert ((ef - el).norm() / ef.norm()) < 1e-2
    x = torch.randn(50, shape[1], generator=gen)  # gate norms ||V_g^T x|| agree
    torch.testing.assert_close((x @ vl[:, :4]).norm(dim=1), (x @ vf[:, :4]).norm(dim=1), atol=1e-3, rtol=1e-2)
    # whole layers: randomized and exact construction give the same outputs within tolerance
    w0 = torch.zeros(shape)
    ws = [a, _powerlaw(*shape, alpha=1.0, gen=gen)]
    lf = smile_linear_from_weights(w0, None, ws, k=6, gate_k=4, svd="full")
    ll = smile_linear_from_weights(w0, None, ws, k=6, gate_k=4, svd="lowrank")
    x = torch.randn(50, shape[1], generator=gen)
    yf, yl = lf(x), ll(x)
    assert torch.equal(lf.routing(x)[1], ll.routing(x)[1])
    assert ((yf - yl).norm() / yf.norm()) < 1e-2


def test_lowrank_svd_is_reproducible_and_leaves_the_global_generator_alone():
    """A SMILE layer built after other random work is the same layer; the caller's random stream goes on
    as if no factorisation had happened (torch.svd_lowrank alone draws from the global generator)."""
    gen = torch.Generator().manual_seed(2)
    w0, ws = torch.zeros(96, 96), [_powerlaw(96, 96, 1.0, gen), _powerlaw(96, 96, 1.0, gen)]
    torch.manual_seed(0)
    first = smile_linear_from_weights(w0, None, ws, k=6, gate_k=4, svd="lowrank").state_dict()
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.rand(1000)                       # other random work before the second build
    second = smile_linear_from_weights(w0, None, ws, k=6, gate_k=4, svd="lowrank").state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)


def test_auto_svd_choice_and_bad_method():
    a = torch.randn(64, 64)
    torch.testing.assert_close(truncated_svd(a, 20, "auto")[1], torch.linalg.svdvals(a)[:20])  # 8*20 > 64: full
    with pytest.raises(MergelabError, match="unknown SVD method"):
        truncated_svd(a, 2, "magic")


# ---------------------------------------------------------------- transformers, save / load
def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return BertModel(cfg).eval(), cfg


def _finetune(cfg, base_sd, seed, steps=3):
    """A real (tiny) fine-tune: a few SGD steps of a sequence classifier from the base weights."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    clf = BertForSequenceClassification(cfg)
    clf.bert.load_state_dict(base_sd)
    opt = torch.optim.SGD(clf.parameters(), lr=0.5)
    ids = torch.randint(0, 100, (8, 10))
    labels = (ids[:, 0] % 2 + seed) % 2
    clf.train()
    for _ in range(steps):
        opt.zero_grad()
        clf(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    return clf.eval()


def test_tiny_bert_upscaled_end_to_end_and_save_load_round_trip(tmp_path):
    base, cfg = _tiny_bert()
    clfs = [_finetune(cfg, base.state_dict(), s) for s in (1, 2, 3)]
    # fine-tunes given as BertForSequenceClassification state dicts: the "bert." prefix is resolved
    sds = [c.state_dict() for c in clfs]
    seen = []
    m = upscale_to_smile(base, sds, k=4, gate_k=2, progress=lambda stage, d, t: seen.append((d, t)))
    n_lin = sum(isinstance(x, nn.Linear) for x in base.modules())
    smile_layers = [n for n, x in m.named_modules() if isinstance(x, SmileLinear)]
    assert len(smile_layers) == n_lin == 13 and seen[-1] == (n_lin, n_lin)
    ids = torch.randint(0, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.allclose(out, ref)

    path = save_smile(m, tmp_path / "smile")
    assert sorted(os.listdir(path)) == [".mergelab-output", "README.md", "config.json", "model.safetensors",
                                        "smile_config.json"]
    assert os.listdir(tmp_path) == ["smile"]  # no temp folder left behind
    meta = json.loads((tmp_path / "smile" / "smile_config.json").read_text())
    assert meta["model_class"] == "BertModel" and len(meta["layers"]) == 13
    assert meta["parameters"] == count_parameters(m)
    loaded = load_smile(path)
    assert count_parameters(loaded) == count_parameters(m)
    with torch.no_grad():
        again = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(again, out)

    with pytest.raises(MergelabError, match="already exists"):
        save_smile(m, path)
    save_smile(m, path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["smile"]


def test_n1_dense_on_bert_equals_the_fine_tuned_encoder():
    base, cfg = _tiny_bert()
    clf = _finetune(cfg, base.state_dict(), 7)
    # LayerNorm/embeddings come from the base unless averaged: the average of one model is itself
    m = upscale_to_smile(base, [clf.bert], k=-1, gate_k=2, average_experts=True)
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).last_hidden_state, clf.bert(input_ids=ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_load_rejects_foreign_or_broken_folders(tmp_path):
    with pytest.raises(MergelabError, match="not a SMILE model folder"):
        load_smile(tmp_path)
    base = nn.Sequential(nn.Linear(3, 3))
    m = upscale_to_smile(base, [{"0.weight": torch.ones(3, 3), "0.bias": torch.zeros(3)}], k=1, gate_k=1)
    path = save_smile(m, tmp_path / "plain")
    with pytest.raises(MergelabError, match="no config.json"):
        load_smile(path)
    # a plain torch architecture can be given as a skeleton
    again = load_smile(path, model=nn.Sequential(nn.Linear(3, 3)))
    x = torch.randn(2, 3)
    assert torch.equal(again(x), m(x))
    with pytest.raises(MergelabError, match="does not exist in the architecture"):
        load_smile(path, model=nn.Sequential(nn.ReLU()).__class__())


# ---------------------------------------------------------------- CLI
def _run_cli(argv):
    import argparse

    from mergelab.cli import smile as cli_smile

    parser = argparse.ArgumentParser(prog="mergelab")
    cli_smile.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_upscale_smile_from_hf_folders(tmp_path, capsys):
    import yaml

    base, cfg = _tiny_bert()
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "vocab.txt").write_text("[PAD]\n[UNK]\n")  # a tokenizer file travels along
    paths = []
    for s in (1, 2):
        clf = _finetune(cfg, base.state_dict(), s)
        clf.save_pretrained(tmp_path / f"ft{s}")  # keys carry the "bert." prefix
        paths.append(str(tmp_path / f"ft{s}"))
    recipe = {"base_model": str(tmp_path / "base"), "models": [{"model": p} for p in paths],
              "merge_method": "smile", "parameters": {"k": 8, "gate_k": 4, "top_k": 2, "target_modules": ["query"]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert _run_cli(["upscale", "smile", str(tmp_path / "r.yaml"), str(out), "--k", "3", "--svd", "full",
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "upscaled 2 Linear layers with 2 experts (k=3, gate_k=4, top_k=2, svd=full)" in printed
    assert "separate models" in printed
    assert (out / "vocab.txt").exists()
    loaded = load_smile(out)
    layers = [n for n, x in loaded.named_modules() if isinstance(x, SmileLinear)]
    assert layers == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    assert loaded.encoder.layer[0].attention.self.query.k == 3
    # same model as the Python API on the in-memory fine-tunes
    from transformers import BertForSequenceClassification

    fts = [BertForSequenceClassification.from_pretrained(p).bert for p in paths]
    ref = upscale_to_smile(base, fts, k=3, gate_k=4, top_k=2, target_modules=["query"], full_svd=True)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)

    with pytest.raises(MergelabError, match="already exists"):
        _run_cli(["upscale", "smile", str(tmp_path / "r.yaml"), str(out), "--quiet"])
    for bad, msg in [({"parameters": {"rank": 3}}, "unknown SMILE parameter 'rank'"),
                     ({"merge_method": "ties"}, "this command runs SMILE"),
                     ({"parameters": {"k": "big"}}, "parameters.k must be an integer"),
                     ({"models": [{"model": paths[0], "parameters": {"weight": 1.0}}]}, "no per-model parameters")]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**recipe, **bad}))
        with pytest.raises(MergelabError, match=msg):
            _run_cli(["upscale", "smile", str(tmp_path / "bad.yaml"), str(tmp_path / "o2"), "--quiet"])
    assert not (tmp_path / "o2").exists()


def test_bench_builder_upscales_the_pool_in_task_order():
    from types import SimpleNamespace

    from mergelab.bench.smile_methods import bench_builder

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5))
    fts = {n: {"0.weight": base[0].weight + torch.randn(5, 6), "0.bias": base[0].bias + 1.0} for n in "ab"}
    m = bench_builder(SimpleNamespace(base=base, finetuned=fts), SimpleNamespace(names=["b", "a"]),
                      {"k": -1, "gate_k": 2})
    torch.testing.assert_close(m[0].expert_weight[0], fts["b"]["0.weight"] - base[0].weight)
    assert not m.training
    with pytest.raises(MergelabError, match="unknown parameter 'rank'"):
        bench_builder(SimpleNamespace(base=base, finetuned=fts), SimpleNamespace(names=["a"]), {"rank": 3})


def test_dense_experts_round_trip_and_bfloat16_base(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3, bias=False)).to(torch.bfloat16)
    fts = [{k: v + 0.5 * torch.randn_like(v) for k, v in base.state_dict().items()} for _ in range(3)]
    m = upscale_to_smile(base, fts, k=-1, gate_k=2, top_k=2)
    assert m[0].expert_weight.dtype == torch.bfloat16 and m[1].expert_bias is None
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    path = save_smile(m, tmp_path / "dense")
    again = load_smile(path, model=nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3, bias=False)).to(torch.bfloat16))
    assert torch.equal(again(x), m(x)) and again[0].k == -1 and again[0].top_k == 2


# ---------------------------------------------------------------- causal LMs keep their head (issue 21, item 2)
def _tiny_llama_folders(root, n=2, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tie, attn_implementation="eager")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    models = []
    for i in range(1, n + 1):
        g = torch.Generator().manual_seed(i)
        ft = LlamaForCausalLM(cfg).eval()
        ft.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        ft.save_pretrained(root / f"ft{i}")
        models.append(ft)
    return root / "base", [root / f"ft{i}" for i in range(1, n + 1)], models


def test_smile_on_a_causal_lm_keeps_lm_head_and_generates(tmp_path, capsys):
    import yaml
    from transformers import LlamaForCausalLM

    base, fts, models = _tiny_llama_folders(tmp_path)
    recipe = {"base_model": str(base), "models": [{"model": str(fts[0])}]}
    (tmp_path / "r1.yaml").write_text(yaml.safe_dump(recipe))
    # one dense expert (routing weight 1) and the other parameters averaged over the one fine-tune: the SMILE
    # model is exactly the fine-tune, lm_head included
    assert _run_cli(["upscale", "smile", str(tmp_path / "r1.yaml"), str(tmp_path / "one"), "--k", "-1",
                     "--average-experts", "--quiet"]) == 0
    loaded = load_smile(tmp_path / "one")
    assert isinstance(loaded, LlamaForCausalLM)
    assert isinstance(loaded.lm_head, SmileLinear)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, models[0](input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    out = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = models[0].generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11) and torch.equal(out, ref)

    # two low-rank experts: a real mixture that still produces logits and generates
    recipe["models"] = [{"model": str(p)} for p in fts]
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump(recipe))
    assert _run_cli(["upscale", "smile", str(tmp_path / "r2.yaml"), str(tmp_path / "two"), "--k", "4",
                     "--gate-k", "2", "--quiet"]) == 0
    mixed = load_smile(tmp_path / "two")
    assert "lm_head" in mixed.smile_info["layers"]
    assert mixed.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 9)


def test_smile_refuses_a_base_whose_architecture_transformers_lacks(tmp_path):
    import yaml

    base, fts, _ = _tiny_llama_folders(tmp_path, n=1)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["MyCustomLlamaForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"base_model": str(base), "models": [{"model": str(fts[0])}]}))
    with pytest.raises(MergelabError, match="architecture 'MyCustomLlamaForCausalLM' is not a transformers model"):
        _run_cli(["upscale", "smile", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out").exists()


def test_smile_on_a_causal_lm_with_tied_embeddings_leaves_the_tied_head_to_the_embedding(tmp_path):
    import yaml

    base, fts, models = _tiny_llama_folders(tmp_path, n=1, tie=True)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"base_model": str(base), "models": [{"model": str(fts[0])}]}))
    assert _run_cli(["upscale", "smile", str(tmp_path / "r.yaml"), str(tmp_path / "o"), "--k", "-1",
                     "--average-experts", "--quiet"]) == 0
    loaded = load_smile(tmp_path / "o")
    assert "lm_head" not in loaded.smile_info["layers"]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, models[0](input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"base_model": str(base), "models": [{"model": str(fts[0])}],
                                                     "parameters": {"target_modules": ["lm_head"]}}))
    with pytest.raises(MergelabError, match="'lm_head' shares its weight with 'model.embed_tokens'"):
        _run_cli(["upscale", "smile", str(tmp_path / "t.yaml"), str(tmp_path / "o2"), "--quiet"])
