"""Tokenizer union and vocabulary-aligned embeddings (tokenizer_source / tokenizer section, mergekit's rules)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from mergelab import load_state_dict, merge
from mergelab.errors import MergelabError

BASE_WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]


def _save_tokenizer(folder: Path, words: list[str], added: list[str] = ()) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    for a in added:
        fast.add_special_tokens({"additional_special_tokens": [a]})
    fast.save_pretrained(folder)


def _model(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base (64 tokens); ft_a: + 4 private words (68 rows); ft_b: + one added special token (65 rows)."""
    root = tmp_path_factory.mktemp("vocab")
    base = _model(64, 0)
    base.save_pretrained(root / "base")
    _save_tokenizer(root / "base", BASE_WORDS)
    for name, extra, added, seed in (("ft_a", ["a0", "a1", "a2", "a3"], [], 1), ("ft_b", [], ["<tool>"], 2)):
        m = _model(64 + len(extra) + len(added), seed)
        sd = m.state_dict()
        g = torch.Generator().manual_seed(seed)
        for k, v in base.state_dict().items():
            noisy = v + 0.05 * torch.randn(v.shape, generator=g)
            if v.shape == sd[k].shape:
                sd[k] = noisy
            else:                   # the base's rows, then new rows for the new tokens
                sd[k] = torch.cat([noisy, torch.randn(sd[k].shape[0] - v.shape[0], *v.shape[1:], generator=g)])
        m.load_state_dict(sd)
        m.save_pretrained(root / name)
        _save_tokenizer(root / name, BASE_WORDS + extra, added)
    return root


def _recipe(root, tmp_path, method="linear", **extra):
    r = {"merge_method": method, "base_model": str(root / "base"),
         "models": [{"model": str(root / "ft_a")}, {"model": str(root / "ft_b")}],
         "parameters": {"weight": 1.0} if method == "linear" else {"weight": 1.0, "lambda": 1.0}, **extra}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _rows_by_token(folder: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder).get_vocab(), load_state_dict(folder)


def test_union_of_two_vocabularies_loads_and_rows_follow_mergekits_rules(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    merge(_recipe(world, tmp_path, tokenizer_source="union", compat="mergekit"), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = tok.get_vocab()
    assert len(vocab) == 69 and {"a0", "a3", "<tool>"} <= set(vocab)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.vocab_size == 69
    ids = tok("w1 a2 <tool> w5", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
    out = load_state_dict(tmp_path / "out")
    srcs = {n: _rows_by_token(world / n) for n in ("base", "ft_a", "ft_b")}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for token in ("w7", "<s>"):   # mergekit's linear averages the listed base too: mean of three rows
            want = sum(srcs[n][1][name][srcs[n][0][token]] for n in ("base", "ft_a", "ft_b")) / 3
            assert torch.allclose(out[name][vocab[token]], want, atol=1e-6)
        # only ft_a has a2: every model gets ft_a's row (donor), so the average is that row
        v_a, sd_a = srcs["ft_a"]
        assert torch.allclose(out[name][vocab["a2"]], sd_a[name][v_a["a2"]], atol=1e-6)
        v_b, sd_b = srcs["ft_b"]
        assert torch.allclose(out[name][vocab["<tool>"]], sd_b[name][v_b["<tool>"]], atol=1e-6)


def test_base_tokenizer_drops_private_tokens_and_keeps_shared_rows(world, tmp_path):
    merge(_recipe(world, tmp_path, "task_arithmetic", tokenizer_source="base"), tmp_path / "out")
    vocab, out = _rows_by_token(tmp_path / "out")
    assert len(vocab) == 64 and out["model.embed_tokens.weight"].shape == (64, 16)
    srcs = {n: _rows_by_token(world / n) for n in ("base", "ft_a", "ft_b")}
    name = "model.embed_tokens.weight"
    (vb, b), (va, a), (vbb, bb) = srcs["base"], srcs["ft_a"], srcs["ft_b"]
    want = b[name][vb["w9"]] + (a[name][va["w9"]] - b[name][vb["w9"]]) + (bb[name][vbb["w9"]] - b[name][vb["w9"]])
    assert torch.allclose(out[name][vocab["w9"]], want, atol=1e-6)


def test_tokens_section_forced_sources_and_padding(world, tmp_path):
    section = {"source": "union", "pad_to_multiple_of": 8,
               "tokens": {"w3": {"source": {"kind": "zero"}, "force": True},
                          "<tool>": {"source": str(world / "ft_b")},
                          "new_tok": {"source": {"kind": "model_token", "model": str(world / "ft_a"), "token": "a1"}}}}
    merge(_recipe(world, tmp_path, tokenizer=section, compat="mergekit"), tmp_path / "out")
    vocab, out = _rows_by_token(tmp_path / "out")
    emb = out["model.embed_tokens.weight"]
    assert len(vocab) == 70 and emb.shape[0] == 72                   # 70 tokens, padded to a multiple of 8
    assert not emb[vocab["w3"]].any()                               # forced zero in every model
    va, a = _rows_by_token(world / "ft_a")
    assert torch.allclose(emb[vocab["new_tok"]], a["model.embed_tokens.weight"][va["a1"]], atol=1e-6)
    assert torch.allclose(emb[70], emb[71]) and torch.allclose(emb[70], emb[:70].mean(dim=0), atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "not both"),
    ({"tokenizer": {"source": "union", "pad_to": 8}}, "unknown key 'pad_to'"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "positive integer"),
    ({"tokenizer_source": "/no/such/tokenizer"}, "tokenizer_source: /no/such/tokenizer: no such file or folder"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "/no/such"}}}}}, "needs 'model'"),
])
def test_bad_tokenizer_settings_are_refused_before_merging(world, tmp_path, extra, message):
    with pytest.raises(MergelabError) as e:
        merge(_recipe(world, tmp_path, **extra), tmp_path / "out")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


MERGEKIT_VENV = os.environ.get("MERGELAB_MERGEKIT_VENV")


@pytest.mark.skipif(not MERGEKIT_VENV, reason="set MERGELAB_MERGEKIT_VENV to a virtualenv with mergekit 0.1.5")
@pytest.mark.parametrize("method, source", [("linear", "union"), ("task_arithmetic", "union"),
                                            ("task_arithmetic", "base")])
def test_union_rows_equal_mergekits_token_by_token(world, tmp_path, method, source):
    """mergekit orders the union's new tokens by a set's iteration order: rows are compared by token."""
    recipe = _recipe(world, tmp_path, method, tokenizer_source=source, compat="mergekit")
    raw = yaml.safe_load(recipe.read_text())
    raw.pop("compat")
    mk_recipe = tmp_path / "mk.yaml"
    mk_recipe.write_text(yaml.safe_dump(raw))
    ref = subprocess.run([str(Path(MERGEKIT_VENV) / "bin" / "mergekit-yaml"), str(mk_recipe), str(tmp_path / "mk")],
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    merge(recipe, tmp_path / "ml")
    (v_mk, mk), (v_ml, ml) = _rows_by_token(tmp_path / "mk"), _rows_by_token(tmp_path / "ml")
    assert set(v_mk) == set(v_ml)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for token, i in v_ml.items():
            assert torch.allclose(ml[name][i], mk[name][v_mk[token]], atol=1e-6), (name, token)
    for name in ml:
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.allclose(ml[name], mk[name], atol=1e-6), name
