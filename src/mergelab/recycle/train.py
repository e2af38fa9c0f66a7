"""Encoder + linear head: building from a base folder, training with best-on-validation selection,
and accuracy.  Works with any Hugging Face encoder (MiniLM in the benchmark, a tiny BERT in tests)
on pre-tokenized data, so that workers never need a tokenizer.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from mergelab.bench.train import embed, mean_pool, pad_batch, train_linear_probe
from mergelab.errors import MergelabError

ENC = "encoder."
HEAD = "head."


@dataclass
class Split:
    """Pre-tokenized examples: token-id lists and integer labels."""

    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_json(cls, d: Mapping) -> "Split":
        return cls([list(map(int, s)) for s in d["ids"]], [int(y) for y in d["labels"]])

    def to_json(self) -> dict:
        return {"ids": self.ids, "labels": self.labels}


class Classifier(nn.Module):
    """Mean-pooled encoder features into a linear head; its state dict is ``encoder.*`` + ``head.*``."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(mean_pool(self.encoder, ids, mask))


def load_encoder(base_path: str, dropout: float | None = None) -> nn.Module:
    """The base encoder with eager attention (4-5x faster than SDPA on CPU), dropout overridden."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    kwargs = {}
    if dropout is not None:
        kwargs = {"hidden_dropout_prob": float(dropout), "attention_probs_dropout_prob": float(dropout)}
    try:
        return AutoModel.from_pretrained(base_path, attn_implementation="eager", **kwargs)
    except (OSError, ValueError) as e:
        raise MergelabError(f"{base_path}: cannot load the base model: {str(e).splitlines()[0]}") from e


def encoder_part(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                 where: str) -> dict[str, torch.Tensor]:
    """The encoder weights of ``state`` named as in ``reference`` (an encoder's state dict).

    Accepts a classifier state (``encoder.*``), a bare encoder, or one with a model prefix
    (``bert.``, ``model.``...), so that fine-tunes saved by other tools can be recycled.
    """
    ref = set(reference)
    for prefix in (ENC, "", "bert.", "model.", "roberta.", "encoder_model."):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if ref.issubset(sub):
            out = {k: sub[k] for k in reference}
            for k in reference:
                if tuple(out[k].shape) != tuple(reference[k].shape):
                    raise MergelabError(f"{where}: tensor {k!r} has shape {tuple(out[k].shape)}, "
                                        f"the base has {tuple(reference[k].shape)}")
            return out
    missing = sorted(ref - set(state))[:3]
    raise MergelabError(f"{where}: not a fine-tune of the base encoder (missing e.g. {missing})")


def batches_in_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index batches for ``steps`` steps: reshuffled epochs, reproducible from ``seed``."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


@torch.no_grad()
def accuracy(model: Classifier, split: Split, pad_id: int = 0, batch_size: int = 128) -> tuple[float, list[bool]]:
    """Top-1 accuracy and per-example outcomes (for paired comparisons)."""
    if not len(split):
        raise MergelabError("cannot evaluate on an empty split")
    was = model.training
    model.eval()
    z = embed(model.encoder, split.ids, batch_size=batch_size, pad_id=pad_id)
    pred = model.head(z).argmax(-1)
    model.train(was)
    correct = (pred == torch.as_tensor(split.labels)).tolist()
    return sum(correct) / len(correct), correct


def probe_head(encoder: nn.Module, split: Split, n_classes: int, pad_id: int = 0, seed: int = 0,
               weight_decay: float = 1e-4, max_iter: int = 300) -> nn.Linear:
    """Linear probe on the frozen encoder's features (the shared LP head of Ratatouille Stage 0)."""
    feats = embed(encoder, split.ids, pad_id=pad_id)
    head = train_linear_probe(feats, split.labels, n_classes, weight_decay=weight_decay, max_iter=max_iter,
                              seed=seed)
    head.requires_grad_(True)
    return head


def train_classifier(model: Classifier, train: Split, val: Split, hp: Mapping, seed: int, *,
                     lp_steps: int = 0, keep: str = "best", train_head: bool = True, pad_id: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> tuple[dict, float, list[dict]]:
    """Fine-tune ``model`` with AdamW at a constant learning rate (DomainBed's ERM).

    ``lp_steps`` first train the head alone at ``hp['lp_lr']`` (Ratatouille's re-probe for runs
    started from an auxiliary featurizer).  Validation accuracy is measured every
    ``hp['eval_every']`` steps and at the end; ``keep='best'`` returns the best-on-validation weights,
    ``keep='last'`` the final ones.  Returns ``(state, val_acc of that state, history)``.
    """
    steps, bs = int(hp["steps"]), int(hp["batch_size"])
    eval_every = int(hp.get("eval_every") or steps)
    if steps < 1 or bs < 1 or len(train) == 0:
        raise MergelabError("training needs steps >= 1, batch_size >= 1 and a non-empty training split")
    torch.manual_seed(seed)
    y = torch.as_tensor(train.labels, dtype=torch.long)
    history: list[dict] = []
    t0 = time.perf_counter()

    def run_phase(n: int, params: list, lr: float, wd: float, phase_seed: int, step0: int, evaluate: bool):
        nonlocal best
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        model.train()
        for i, idx in enumerate(batches_in_order(len(train), bs, n, phase_seed)):
            ids, mask = pad_batch([train.ids[j] for j in idx], pad_id)
            loss = nn.functional.cross_entropy(model(ids, mask), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step = step0 + i + 1
            if progress:
                progress(step, total)
            if evaluate and ((i + 1) % eval_every == 0 or i == n - 1):
                acc, _ = accuracy(model, val, pad_id)
                history.append({"step": step, "loss": loss.item(), "val_acc": acc,
                                "seconds": round(time.perf_counter() - t0, 2)})
                if keep == "last" or best is None or acc > best[1]:
                    best = ({k: v.detach().clone() for k, v in model.state_dict().items()}, acc, step)
                model.train()

    best: tuple[dict, float, int] | None = None
    total = lp_steps + steps
    if lp_steps > 0:
        model.encoder.requires_grad_(False)
        model.head.requires_grad_(True)
        run_phase(lp_steps, list(model.head.parameters()), float(hp.get("lp_lr", 1e-3)), 0.0,
                  seed * 7919 + 1, 0, False)
    model.encoder.requires_grad_(True)
    model.head.requires_grad_(train_head)
    params = [p for p in model.parameters() if p.requires_grad]
    run_phase(steps, params, float(hp["lr"]), float(hp.get("weight_decay", 0.0)), seed, lp_steps, True)
    model.eval()
    model.requires_grad_(False)
    state, acc, step = best
    history.append({"best_step": step})
    return state, acc, history
