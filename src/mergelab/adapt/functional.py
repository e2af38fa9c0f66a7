"""A merged model that stays differentiable in its merge coefficients and mask.

theta[k] = base[k] + mask[k] * sum_t coeff[t (, k)] * tau_t[k]   for every merged tensor k

The model itself is never copied: each step builds the merged tensors and runs the module with
`torch.func.functional_call`, so gradients flow to the coefficients and the mask logits.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch.func import functional_call

from mergelab.errors import MergelabError


def task_vectors_from(base_sd: Mapping[str, torch.Tensor],
                      finetuned: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """tau_t = theta_t - theta_0 for every floating-point tensor of the base (float32)."""
    out = []
    for i, sd in enumerate(finetuned):
        tv = {}
        for k, b in base_sd.items():
            if not b.is_floating_point():
                continue
            if k not in sd:
                raise MergelabError(f"model {i + 1} lacks tensor '{k}' of the base")
            if tuple(sd[k].shape) != tuple(b.shape):
                raise MergelabError(f"model {i + 1} tensor '{k}' has shape {tuple(sd[k].shape)}, "
                                    f"base has {tuple(b.shape)}")
            tv[k] = sd[k].float() - b.float()
        out.append(tv)
    return out


class MergeSpace:
    """Base weights plus stacked task vectors; builds merged parameters from coefficients and a mask.

    Only floating-point tensors of the base are merged; integer buffers (and any tensor the task
    vectors do not cover) are taken from the base unchanged.
    """

    def __init__(self, base_sd: Mapping[str, torch.Tensor], task_vectors: Sequence[Mapping[str, torch.Tensor]],
                 device: str | torch.device | None = None):
        if len(task_vectors) == 0:
            raise MergelabError("need at least one task vector")
        self.dtypes = {k: v.dtype for k, v in base_sd.items()}
        self.keys = [k for k, v in base_sd.items() if v.is_floating_point()]
        for i, tv in enumerate(task_vectors):
            extra = [k for k in tv if k not in base_sd]
            if extra:
                raise MergelabError(f"task vector {i + 1} has tensor '{extra[0]}' that the base lacks")
            for k in self.keys:
                if k not in tv:
                    raise MergelabError(f"task vector {i + 1} lacks tensor '{k}'")
                if tuple(tv[k].shape) != tuple(base_sd[k].shape):
                    raise MergelabError(f"task vector {i + 1} tensor '{k}' has shape {tuple(tv[k].shape)}, "
                                        f"base has {tuple(base_sd[k].shape)}")
        dev = torch.device(device) if device is not None else None
        self.base = {k: base_sd[k].detach().to(device=dev, dtype=torch.float32) for k in self.keys}
        self.tv = {k: torch.stack([tv[k].detach().to(device=dev, dtype=torch.float32) for tv in task_vectors])
                   for k in self.keys}
        self.frozen = {k: v.detach().to(dev) for k, v in base_sd.items() if k not in self.base}
        self.num_tasks = len(task_vectors)

    @property
    def num_tensors(self) -> int:
        return len(self.keys)

    def coefficient_shape(self, granularity: str) -> tuple[int, ...]:
        if granularity == "task":
            return (self.num_tasks,)
        if granularity == "layer":
            return (self.num_tensors, self.num_tasks)
        raise MergelabError(f"granularity must be 'task' or 'layer', got '{granularity}'")

    def params(self, coeffs: torch.Tensor, mask: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Merged float32 tensors; differentiable in `coeffs` ([T] or [K, T]) and `mask` (per key)."""
        out = {}
        for i, k in enumerate(self.keys):
            c = coeffs if coeffs.dim() == 1 else coeffs[i]
            delta = torch.tensordot(c, self.tv[k], dims=1)
            if mask is not None:
                delta = delta * mask[k]
            out[k] = self.base[k] + delta
        return out

    def state_dict(self, coeffs: torch.Tensor, mask: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Full merged state dict, detached, in the base's dtypes and key order."""
        with torch.no_grad():
            merged = self.params(coeffs.detach(), None if mask is None else {k: m.detach() for k, m in mask.items()})
        return {k: (merged[k].to(self.dtypes[k]) if k in merged else self.frozen[k]).cpu().contiguous()
                for k in self.dtypes}


def _to(batch, device):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


class FunctionalModel:
    """Runs `model` with given tensors in place of its own (`torch.func.functional_call`); the
    space's unmerged tensors (integer buffers) fill in what `params` lacks.

    A batch is a Tensor (one positional input), a tuple/list (positional inputs) or a dict
    (keyword inputs). `head`, if given, is applied to the model's output.
    """

    def __init__(self, model: torch.nn.Module, space: MergeSpace | None = None, device=None):
        self.model = model
        self.frozen = space.frozen if space is not None else {}
        self.device = device
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        if space is not None:
            all_names = ({n for n, _ in model.named_parameters(remove_duplicate=False)}
                         | {n for n, _ in model.named_buffers(remove_duplicate=False)})
            missing = [k for k in space.dtypes if k not in all_names]
            if missing:
                raise MergelabError(f"the model has no tensor named '{missing[0]}' (from the base state dict)")
        self._names = names  # canonical names: tied aliases are not passed twice

    def __call__(self, params: Mapping[str, torch.Tensor], batch, head: Callable | None = None) -> torch.Tensor:
        tensors = {k: v for k, v in self.frozen.items() if k in self._names}
        tensors.update({k: v for k, v in params.items() if k in self._names})
        if self.device is not None:
            tensors = {k: v.to(self.device) for k, v in tensors.items()}
        batch = _to(batch, self.device)
        if isinstance(batch, Mapping):
            out = functional_call(self.model, tensors, args=(), kwargs=dict(batch))
        elif isinstance(batch, (tuple, list)):
            out = functional_call(self.model, tensors, args=tuple(batch))
        else:
            out = functional_call(self.model, tensors, args=(batch,))
        return out if head is None else head(out)


def as_logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    raise MergelabError("the model's output is not logits; give a head per task")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean (over the batch) Shannon entropy of softmax(logits), as in the AdaMerging code."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


class Cycle:
    """Endless iteration over a (re-iterable) loader: restarts it when exhausted."""

    def __init__(self, loader: Iterable, name: str = "loader"):
        self.loader, self.name, self.it = loader, name, None

    def __next__(self):
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None
        raise MergelabError(f"{self.name} yields no batches")
