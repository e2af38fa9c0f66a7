"""The leaderboard builders run on a tiny model pool with the bench's interfaces and report their cost."""
import copy
from types import SimpleNamespace

import pytest
import torch

from mergelab.databased import builders as B

torch.set_num_threads(1)


class Tasks:
    def __init__(self, names, seqs, labels):
        self.names, self._seqs, self._labels = names, seqs, labels

    def inputs(self, task, split):
        return self._seqs[task]

    def labels(self, task, split):
        return self._labels[task]


def tiny_pools(T=2):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     vocab_size=60, max_position_embeddings=32, attn_implementation="eager")
    base = BertModel(cfg, add_pooling_layer=False).eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    names = [f"t{i}" for i in range(T)]
    fts = {n: {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in base_sd.items()} for n in names}
    heads = {n: torch.nn.Linear(16, 3).requires_grad_(False) for n in names}
    seqs = {n: [torch.randint(1, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                for _ in range(12)] for n in names}
    labels = {n: torch.randint(0, 3, (12,), generator=g).tolist() for n in names}

    def encoder(sd=None):
        enc = copy.deepcopy(base)
        if sd is not None:
            enc.load_state_dict(dict(sd), strict=False)
        return enc.eval()
    models = SimpleNamespace(base=base, base_sd=base_sd, finetuned=fts, heads=heads, pad_id=0, encoder=encoder)
    return models, Tasks(names, seqs, labels)


@pytest.mark.parametrize("row,over", [
    ("regmean", {"num_examples": 12, "batch_size": 4}), ("regmean++", {"num_examples": 12}),
    ("fisher", {"num_examples": 4}), ("fisher_labels", {"num_examples": 4, "estimator": "batch"}),
    ("wudi", {"params": {"iter_num": 3}}), ("ties+lines", {}), ("emr", {}), ("wemoe", {"steps": 2}),
])
def test_builder_runs_and_records_its_cost(row, over):
    models, tasks = tiny_pools()
    builder, params, data = B.ROWS[row]
    n = len(B.STATS)
    built = builder(models, tasks, {**params, **over})
    mods = built.values() if isinstance(built, dict) else [built]
    assert all(isinstance(m, torch.nn.Module) for m in mods)
    if isinstance(built, dict):
        assert sorted(built) == tasks.names
    st = B.STATS[-1]
    assert len(B.STATS) == n + 1 and st["seconds"] > 0 and data
    ids = torch.tensor([[2, 5, 7, 3]])
    with torch.no_grad():
        out = next(iter(mods))(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.isfinite(out).all()
    if row == "emr":
        assert st["extra_bytes_per_task"] == sum((v.numel() + 7) // 8 for v in models.base_sd.values()
                                                 if v.is_floating_point()) + 4
    if row == "wemoe":
        assert st["parameter_counts"]["router"] > 0


def test_unknown_builder_parameter_is_one_clear_error():
    from mergelab.errors import MergelabError
    models, tasks = tiny_pools()
    with pytest.raises(MergelabError, match="unknown parameter 'alpah'"):
        B.regmean_builder(models, tasks, {"alpah": 0.9})
