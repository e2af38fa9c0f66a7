"""Evaluation loop, probes and fine-tuning on a tiny random BertModel (real training steps)."""
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from mergelab.bench import train
from mergelab.bench.evaluate import EvalResult, binomial_se, evaluate, mean_se, paired_diff


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64, attn_implementation="eager")
    return BertModel(cfg).eval()


def seqs_and_labels(n=48, seed=0):
    """Label = whether token 7 occurs; sequences of varied length (padding matters)."""
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        s = [2] + torch.randint(10, 100, (length,), generator=g).tolist() + [3]
        if i % 2:
            s[1] = 7
        seqs.append(s)
        labels.append(i % 2)
    return seqs, labels


def test_embed_is_padding_invariant_and_in_order():
    enc = tiny_bert()
    seqs, _ = seqs_and_labels(20)
    z = train.embed(enc, seqs, batch_size=7)
    for i in (0, 5, 19):
        ids = torch.tensor([seqs[i]])
        ref = enc(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(1)
        assert torch.allclose(z[i], ref[0], atol=1e-5)


def test_evaluate_matches_hand_count():
    enc = tiny_bert()
    seqs, labels = seqs_and_labels(30)
    head = nn.Linear(32, 2)
    res = evaluate(enc, head, seqs, labels, batch_size=8)
    with torch.no_grad():
        preds = [int(head(train.mean_pool(enc, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))).argmax())
                 for s in seqs]
    hand = [p == y for p, y in zip(preds, labels)]
    assert res.correct == hand
    assert res.accuracy == pytest.approx(sum(hand) / 30)
    assert res.n == 30 and res.se == pytest.approx(math.sqrt(res.accuracy * (1 - res.accuracy) / 30))


def _loss(enc, head, seqs, labels):
    with torch.no_grad():
        z = train.embed(enc, seqs)
        return nn.functional.cross_entropy(head(z), torch.tensor(labels)).item()


def test_probe_then_finetune_lowers_loss_and_keeps_head_frozen():
    enc = tiny_bert()
    seqs, labels = seqs_and_labels(32)
    head = nn.Linear(32, 2)  # a deliberately poor head: fine-tuning must adapt the encoder to it
    head.requires_grad_(False)
    head_before = head.weight.clone()
    w_before = enc.encoder.layer[0].attention.self.query.weight.clone()
    loss_before = _loss(enc, head, seqs, labels)
    train.finetune(enc, head, seqs, labels, epochs=4, lr=3e-3, batch_size=16, seed=0)
    assert torch.equal(head.weight, head_before)  # the head stays frozen
    assert not torch.equal(enc.encoder.layer[0].attention.self.query.weight, w_before)
    assert _loss(enc, head, seqs, labels) < loss_before - 0.05
    assert not enc.training


def test_probe_on_base_embeddings():
    enc = tiny_bert()
    seqs, labels = seqs_and_labels(40)
    head = train.train_linear_probe(train.embed(enc, seqs), labels, 2, seed=0)
    assert not any(p.requires_grad for p in head.parameters())
    assert evaluate(enc, head, seqs, labels).accuracy >= 0.9  # 40 points in 32 dims: separable


def test_finetune_rejects_empty():
    from mergelab.errors import MergelabError
    with pytest.raises(MergelabError):
        train.finetune(tiny_bert(), nn.Linear(32, 2), [], [])


def test_standard_errors_by_hand():
    a = [EvalResult(0.75, 4, [True, True, True, False]), EvalResult(0.5, 2, [True, False])]
    b = [EvalResult(0.5, 4, [True, False, True, False]), EvalResult(0.5, 2, [True, False])]
    avg, se = mean_se(a)
    assert avg == pytest.approx(0.625)
    assert se == pytest.approx(math.sqrt(0.75 * 0.25 / 4 + 0.25 / 2) / 2)
    d, dse = paired_diff(a, b)
    # task 1: diffs [0,1,0,0], mean .25, sample var .25 -> se^2 = .25/4; task 2: all 0
    assert d == pytest.approx(0.125)
    assert dse == pytest.approx(math.sqrt(0.25 / 4) / 2)
    assert binomial_se(1.0, 10) == 0.0
