"""What the data-based merges share: running a batch, counting its examples, token masks."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from mergelab.errors import MergelabError


def to_device(batch, device):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def run_batch(model: torch.nn.Module, batch):
    """A dict batch is keyword inputs, a tuple/list positional ones, a Tensor the one input."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    vals = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    for v in vals:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise MergelabError("cannot tell how many examples a batch holds (no tensor input)")


def token_mask(batch) -> torch.Tensor | None:
    """The batch's attention mask [B, N] when it has one (padding rows are not data)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        m = batch["attention_mask"]
        return m if m.dim() == 2 else None
    return None


def limited(loader: Iterable, num_examples: int, name: str = "loader") -> Iterator:
    """Batches of ``loader`` until ``num_examples`` examples were seen (the last one cut to fit)."""
    seen = 0
    for batch in loader:
        if seen >= num_examples:
            return
        n = batch_size(batch)
        if seen + n > num_examples:
            batch = take(batch, num_examples - seen)
            n = num_examples - seen
        seen += n
        yield batch
    if seen == 0:
        raise MergelabError(f"{name} yields no batches")


def take(batch, n: int):
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: take(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(v, n) for v in batch)
    return batch


def linear_names(model: torch.nn.Module, exclude: str | None = None) -> list[str]:
    import re
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n and not (exclude and re.search(exclude, n))]
