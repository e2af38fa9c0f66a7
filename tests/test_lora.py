"""LoRA adapters: real PEFT adapters on a tiny BERT (and GPT-2 for Conv1D), round trips through peft."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertModel, GPT2Config, GPT2Model

from mergelab.kernels import svd as SK
from mergelab.engine import merge, merge_state_dicts
from mergelab.errors import MergelabError
from mergelab.io import load_state_dict, open_checkpoint
from mergelab.engine.lora_export import merge_to_adapter
from mergelab.io.lora import LoraCheckpoint, is_adapter, load_adapter, lora_experts, open_model
from mergelab.upscale.smile import smile_expert_from_lora

from tests.helpers import VOCAB, tiny_bert_config, write_recipe

ADAPTERS = [
    dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    dict(r=2, lora_alpha=4, target_modules=["query", "key"], use_rslora=True, rank_pattern={"key": 3},
         alpha_pattern={"key": 6}),
    dict(r=4, lora_alpha=4, target_modules=["query", "word_embeddings"]),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _base_model():
    torch.manual_seed(0)
    return BertModel(tiny_bert_config()).eval()


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory):
    """Base folder, three saved adapters, and the full models peft's merge_and_unload gives."""
    root = tmp_path_factory.mktemp("lora")
    base = _base_model()
    base.save_pretrained(root / "base")
    (root / "base" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    adapters, full = [], []
    for i, kw in enumerate(ADAPTERS):
        model = get_peft_model(_base_model(), LoraConfig(**kw))
        _randomise(model, 100 + i)
        model.save_pretrained(root / f"ad{i}")
        adapters.append(root / f"ad{i}")
        merged = model.merge_and_unload()
        full.append({k: v.detach().clone() for k, v in merged.state_dict().items()})
    return root, root / "base", adapters, full


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(5, len(VOCAB), (2, 7), generator=g)


def test_dense_delta_equals_peft_merge_and_unload(lora_world):
    root, base_dir, adapters, full = lora_world
    assert all(is_adapter(a) for a in adapters) and not is_adapter(base_dir)
    base = open_checkpoint(base_dir)
    for path, expected in zip(adapters, full):
        ckpt = open_model(path, base)
        assert isinstance(ckpt, LoraCheckpoint)
        assert set(ckpt.keys()) == set(expected)
        for name in expected:
            assert torch.allclose(ckpt.get(name).float(), expected[name].float(), atol=1e-6), name
    ad = load_adapter(adapters[1], base)
    key = "encoder.layer.0.attention.self.key.weight"
    assert ad.modules[key].scaling == pytest.approx(6 / 3 ** 0.5)          # alpha_pattern + rsLoRA, rank 3
    assert ad.modules["encoder.layer.0.attention.self.query.weight"].scaling == pytest.approx(4 / 2 ** 0.5)
    emb = load_adapter(adapters[2], base).modules["embeddings.word_embeddings.weight"]
    assert emb.embedding and emb.transpose


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("tsv", {"alpha": 0.8}),
                                           ("iso_cts", {"alpha": 1.2}), ("task_arithmetic", {"lambda": 0.5})])
def test_recipe_with_adapters_equals_merging_full_models(lora_world, tmp_path, method, params):
    root, base_dir, adapters, full = lora_world
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, adapters, method, params)
    merge(recipe, tmp_path / "out", threads=2)
    got = load_state_dict(tmp_path / "out")
    expected = merge_state_dicts(load_state_dict(base_dir), full, method, params=params)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=2e-6), name
    # and the in-memory API takes LoraCheckpoints directly
    base = open_checkpoint(base_dir)
    direct = merge_state_dicts(base, [open_model(a, base) for a in adapters], method, params=params)
    assert all(torch.allclose(direct[k], expected[k], atol=2e-6) for k in expected)


def _expected_merged(base_dir, full, method, params):
    return merge_state_dicts(load_state_dict(base_dir), full, method, params=params)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("tsv", {"alpha": 1.0})])
def test_full_rank_adapter_reproduces_merged_model_through_peft(lora_world, tmp_path, method, params):
    root, base_dir, adapters, full = lora_world
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, adapters, method, params)
    summary = merge_to_adapter(recipe, tmp_path / "merged", rank=32)
    assert summary.max_relative_error < 1e-6 and summary.modules == 2 * 3 + 1   # q, k, v per layer + embeddings
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == 32 and config["lora_alpha"] == 32
    peft_model = PeftModel.from_pretrained(BertModel.from_pretrained(base_dir, attn_implementation="eager"),
                                           tmp_path / "merged").eval()
    expected_sd = _expected_merged(base_dir, full, method, params)
    reference = BertModel(tiny_bert_config()).eval()
    reference.load_state_dict(expected_sd)
    with torch.no_grad():
        out = peft_model(input_ids=_inputs()).last_hidden_state
        ref = reference(input_ids=_inputs()).last_hidden_state
    assert torch.allclose(out, ref, atol=1e-5)
    unloaded = peft_model.merge_and_unload().state_dict()
    assert all(torch.allclose(unloaded[k], expected_sd[k], atol=1e-5) for k in expected_sd)


def test_lower_rank_adapter_is_best_rank_r_approximation(lora_world, tmp_path):
    root, base_dir, adapters, full = lora_world
    params = {"density": 0.5}
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, adapters, "ties", params)
    summary = merge_to_adapter(recipe, tmp_path / "merged", rank=3)
    expected = _expected_merged(base_dir, full, "ties", params)
    base = load_state_dict(base_dir)
    rank3 = lora_experts(tmp_path / "merged", base_dir)
    errors = []
    for name, (a, b, scaling) in rank3.items():
        assert scaling == 1.0 and a.shape[0] == 3
        delta = expected[name + ".weight"] - base[name + ".weight"]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.allclose(b @ a, best, atol=1e-5), name                      # Eckart-Young optimum
        errors.append(float(s[3:].norm() / s.norm()))
        assert float((delta - b @ a).norm() / delta.norm()) == pytest.approx(errors[-1], rel=1e-3, abs=1e-6)
    assert summary.max_relative_error == pytest.approx(max(errors), rel=1e-3, abs=1e-6)
    # and peft loads it: its merged weights are base + the rank-3 deltas
    peft_model = PeftModel.from_pretrained(BertModel.from_pretrained(base_dir, attn_implementation="eager"),
                                           tmp_path / "merged")
    sd = peft_model.merge_and_unload().state_dict()
    name = "encoder.layer.1.attention.self.key"
    a, b, _ = rank3[name]
    assert torch.allclose(sd[name + ".weight"], base[name + ".weight"] + b @ a, atol=1e-6)


def test_lora_experts_factors(lora_world):
    root, base_dir, adapters, full = lora_world
    base = load_state_dict(base_dir)
    experts = lora_experts(adapters[0], base_dir)
    assert set(experts) == {f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")}
    for name, (a, b, scaling) in experts.items():
        assert a.shape == (4, 32) and b.shape == (32, 4) and scaling == 2.0
        assert torch.allclose(scaling * b @ a, full[0][name + ".weight"] - base[name + ".weight"], atol=1e-6)
        u, s, vh = SK.factored_svd(b, a, scaling)
        assert torch.allclose(s, torch.linalg.svdvals(scaling * b @ a)[:4], atol=1e-5)
    assert set(lora_experts(adapters[0])) == set(experts)   # without a base: the adapter's module names
    emb = lora_experts(adapters[2], base_dir)["embeddings.word_embeddings"]
    assert (emb[1] @ emb[0]).shape == (len(VOCAB), 32)


def test_conv1d_fan_in_fan_out_adapter_matches_peft(tmp_path):
    cfg = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=8, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    base = GPT2Model(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(GPT2Model.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    _randomise(model, 7)
    model.save_pretrained(tmp_path / "ad")
    expected = model.merge_and_unload().state_dict()
    ckpt = open_model(tmp_path / "ad", open_checkpoint(tmp_path / "base"))
    for name in ("h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_proj.weight"):
        assert torch.allclose(ckpt.get(name).float(), expected[name], atol=1e-6), name
    summary = merge_to_adapter(write_recipe(tmp_path / "r.yaml", tmp_path / "base", [tmp_path / "ad"],
                                            "task_arithmetic", {"lambda": 1.0}), tmp_path / "m", rank=16)
    assert summary.max_relative_error < 1e-6
    again = PeftModel.from_pretrained(GPT2Model.from_pretrained(tmp_path / "base"), tmp_path / "m")
    sd = again.merge_and_unload().state_dict()
    assert all(torch.allclose(sd[k], expected[k], atol=1e-5) for k in expected)


def test_biases_and_modules_to_save(tmp_path):
    base = _base_model()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(_base_model(), LoraConfig(r=2, target_modules=["query"], bias="lora_only",
                                                     modules_to_save=["pooler.dense"]))
    _randomise(model, 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.1)
    model.save_pretrained(tmp_path / "ad")
    expected = model.merge_and_unload().state_dict()
    ckpt = open_model(tmp_path / "ad", open_checkpoint(tmp_path / "base"))
    for name in expected:
        assert torch.allclose(ckpt.get(name).float(), expected[name], atol=1e-6), name
    with pytest.raises(MergelabError, match="in full"):
        merge_to_adapter(write_recipe(tmp_path / "r.yaml", tmp_path / "base", [tmp_path / "ad"], "ties"),
                         tmp_path / "m", rank=2)
    assert not (tmp_path / "m").exists()


def test_errors(lora_world, tmp_path):
    root, base_dir, adapters, full = lora_world
    with pytest.raises(MergelabError, match="needs the recipe's base_model"):
        open_model(adapters[0], None)
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, [adapters[0], base_dir / "model.safetensors"], "ties")
    with pytest.raises(MergelabError, match="not a PEFT adapter"):
        merge_to_adapter(recipe, tmp_path / "out", rank=2)
    with pytest.raises(MergelabError, match="rank"):
        merge_to_adapter(write_recipe(tmp_path / "r2.yaml", base_dir, adapters[:1], "ties"), tmp_path / "o", rank=0)
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((adapters[0] / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(MergelabError, match="DoRA"):
        open_model(bad, open_checkpoint(base_dir))
    # an adapter for another architecture: its modules have no counterpart in the base
    other = open_checkpoint({"x.weight": torch.zeros(3, 3)})
    with pytest.raises(MergelabError, match="no counterpart"):
        open_model(adapters[0], other)


def test_cli_lora_merge(lora_world, tmp_path, capsys):
    import argparse

    from mergelab.cli import lora as cli_lora
    root, base_dir, adapters, full = lora_world
    parser = argparse.ArgumentParser()
    cli_lora.add_parser(parser.add_subparsers())
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, adapters[:2], "task_arithmetic", {"lambda": 0.5})
    args = parser.parse_args(["lora-merge", str(recipe), str(tmp_path / "m"), "--rank", "8", "--quiet"])
    assert args.func(args) == 0
    assert "rank 8" in capsys.readouterr().out
    assert is_adapter(tmp_path / "m")


def test_smile_expert_from_lora_matches_dense_svd(lora_world):
    root, base_dir, adapters, full = lora_world
    (a, b, scaling), = [v for k, v in lora_experts(adapters[0], base_dir).items()
                        if k == "encoder.layer.0.attention.self.query"]
    dense = scaling * b @ a
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    gate, ea, eb = smile_expert_from_lora(a, b, scaling, k=3, gate_k=2)
    assert torch.allclose(eb @ ea, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)        # rank-3 expert
    assert torch.allclose(gate.abs(), vh[:2].abs(), atol=1e-4)                     # router rows up to sign
    gate, ea, eb = smile_expert_from_lora(a, b, scaling, k=6, gate_k=6)           # beyond rank 4: zeros
    assert torch.allclose(eb @ ea, dense, atol=1e-5) and not gate[4:].any() and not ea[4:].any()


def test_smile_from_adapters_uses_the_factors_and_matches_the_dense_build(lora_world):
    """SMILE fed with LoRA adapters builds experts from the factors (no dense SVD of the deltas):
    same routing and outputs as the exact dense construction, up to float error."""
    from transformers import AutoModel

    from mergelab.upscale import smile
    root, base_dir, adapters, full = lora_world
    base = open_checkpoint(base_dir)
    checkpoints = [open_model(a, base) for a in adapters]
    calls = []
    dense_svd = smile.truncated_svd

    def counting_svd(*args, **kwargs):
        calls.append(args[0].shape)
        return dense_svd(*args, **kwargs)
    load = lambda: AutoModel.from_pretrained(base_dir, attn_implementation="eager").eval()  # noqa: E731
    smile.truncated_svd = counting_svd
    try:
        from_factors = smile.upscale_to_smile(load(), checkpoints, k=4, gate_k=2, target_modules=["query"])
    finally:
        smile.truncated_svd = dense_svd
    assert calls == []          # every query layer is adapted by every adapter: no dense SVD at all
    dense = smile.upscale_to_smile(load(), full, k=4, gate_k=2, target_modules=["query"], full_svd=True)
    x = _inputs()
    with torch.no_grad():
        a = from_factors(input_ids=x).last_hidden_state
        b = dense(input_ids=x).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------- truncation error, rank clipping (issue 21, item 4)
@pytest.fixture(scope="module")
def two_rank8(tmp_path_factory):
    """The docs' example: two rank-8 adapters on query and value of one base."""
    root = tmp_path_factory.mktemp("rank8")
    _base_model().save_pretrained(root / "base")
    paths = []
    for i in range(2):
        model = get_peft_model(_base_model(), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
        _randomise(model, 200 + i)
        model.save_pretrained(root / f"ad{i}")
        paths.append(root / f"ad{i}")
    return root / "base", paths


def test_lora_merge_reports_truncation_error_per_layer_and_warns(two_rank8, tmp_path):
    base_dir, adapters = two_rank8
    # task arithmetic: the merged delta has rank <= 8 + 8, so rank 16 is exact and nothing is said
    exact = merge_to_adapter(write_recipe(tmp_path / "ta.yaml", base_dir, adapters, "task_arithmetic",
                                          {"lambda": 0.5}), tmp_path / "ta", rank=16)
    assert exact.overall_relative_error < 1e-5 and exact.warnings == []
    assert set(exact.layer_errors) == {f"encoder.layer.{i}.attention.self.{m}" for i in (0, 1)
                                       for m in ("query", "value")}
    # TIES at density 0.5 sparsifies: the merged delta is full rank and rank 16 loses a lot of it
    ties = merge_to_adapter(write_recipe(tmp_path / "ti.yaml", base_dir, adapters, "ties", {"density": 0.5}),
                            tmp_path / "ti", rank=16)
    assert ties.overall_relative_error > 0.05 and len(ties.warnings) == 1
    assert "truncation loses more than 5%" in ties.warnings[0] and "task_arithmetic" in ties.warnings[0]
    assert min(ties.layer_errors.values()) <= ties.overall_relative_error <= max(ties.layer_errors.values())
    # each layer's error is the one of the adapter written
    expected = merge_state_dicts(load_state_dict(base_dir), [open_model(a, open_checkpoint(base_dir))
                                                             for a in adapters], "ties", params={"density": 0.5})
    base = load_state_dict(base_dir)
    lost = total = 0.0
    for name, (a, b, _) in lora_experts(tmp_path / "ti", base_dir).items():
        delta = expected[name + ".weight"] - base[name + ".weight"]
        err = float((delta - b @ a).norm() / delta.norm())
        assert ties.layer_errors[name] == pytest.approx(err, rel=1e-3)
        lost, total = lost + float((delta - b @ a).norm()) ** 2, total + float(delta.norm()) ** 2
    assert ties.overall_relative_error == pytest.approx((lost / total) ** 0.5, rel=1e-3)
    import yaml
    written = yaml.safe_load((tmp_path / "ti" / "mergelab_recipe.yaml").read_text())["truncation_errors"]
    assert written.keys() == ties.layer_errors.keys()


def test_lora_merge_clips_the_rank_to_the_matrix_size(two_rank8, tmp_path):
    base_dir, adapters = two_rank8
    s = merge_to_adapter(write_recipe(tmp_path / "r.yaml", base_dir, adapters, "ties", {"density": 0.5}),
                         tmp_path / "m", rank=500)
    assert s.rank == 32 and s.requested_rank == 500 and s.max_relative_error < 1e-5
    assert any("--rank 500" in w for w in s.warnings)
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["r"] == 32 and config["lora_alpha"] == 32
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "adapter_model.safetensors"), "pt") as f:
        assert all(32 in f.get_slice(k).get_shape() and 500 not in f.get_slice(k).get_shape() for k in f.keys())


def test_lora_merge_rank_pattern_for_modules_smaller_than_the_rank(tmp_path):
    """A GQA Llama: k_proj is [8, 32], so rank 16 becomes 8 there (rank_pattern), 16 on q_proj."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    full = []
    for i in range(2):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                               LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj"]))
        _randomise(model, 300 + i)
        model.save_pretrained(tmp_path / f"ad{i}")
        full.append({k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()})
    s = merge_to_adapter(write_recipe(tmp_path / "r.yaml", tmp_path / "base", [tmp_path / "ad0", tmp_path / "ad1"],
                                      "task_arithmetic", {"lambda": 1.0}), tmp_path / "m", rank=16)
    assert s.rank == 16 and s.layer_ranks == {"model.layers.0.self_attn.k_proj": 8} and s.warnings == []
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "m")
    merged = peft_model.merge_and_unload().state_dict()
    expected = merge_state_dicts(load_state_dict(tmp_path / "base"), full, "task_arithmetic", params={"lambda": 1.0})
    for k in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(merged[k], expected[k], atol=1e-5, rtol=1e-5)


def test_cli_lora_merge_warns_on_stderr(two_rank8, tmp_path, capsys):
    import argparse

    from mergelab.cli import lora as cli_lora
    base_dir, adapters = two_rank8
    parser = argparse.ArgumentParser()
    cli_lora.add_parser(parser.add_subparsers())
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, adapters, "ties", {"density": 0.5})
    args = parser.parse_args(["lora-merge", str(recipe), str(tmp_path / "m"), "--rank", "16"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "overall" in out and "encoder.layer." in out
    assert err.count("warning: rank-16 truncation loses more than 5%") == 1


def test_lora_merge_survives_lapack_failures(two_rank8, tmp_path, monkeypatch):
    base_dir, adapters = two_rank8
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, adapters, "ties", {"density": 0.5})
    ok = merge_to_adapter(recipe, tmp_path / "ok", rank=4)
    real = torch.linalg.svd

    def fail_float32(m, *a, **k):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(m, *a, **k)
    monkeypatch.setattr(torch.linalg, "svd", fail_float32)
    retried = merge_to_adapter(recipe, tmp_path / "retried", rank=4)
    for name, err in ok.layer_errors.items():
        assert retried.layer_errors[name] == pytest.approx(err, rel=1e-4)
