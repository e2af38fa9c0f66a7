"""Fisher merging (Matena & Raffel, NeurIPS 2022, arXiv 2111.09832; ALGORITHMS-2.md 15.3).

Diagonal Fisher F_t of each fine-tuned model on its own task's examples, then the Fisher-weighted
average  theta*[p] = sum_t c_t (F_t[p] + eps) theta_t[p] / sum_t c_t (F_t[p] + eps),  eps = 1e-6, with
``normalize`` (FusionBench default) c_t proportional to 1 / ||F_t||_2 (over all parameters), else c_t = 1.

Estimators of F_t (mean over ``num_examples`` examples):
* ``per_example`` (the paper's): per-example squared gradients of log p_c(x) of the model's own
  predictive distribution, F = E_x sum_c p_c(x) (d log p_c(x))^2 (one backward per class), or of
  log p_y(x) of the given label when the loader yields ``(batch, labels)`` (empirical Fisher);
* ``batch`` (FusionBench's cheaper approximation): the squared gradient of the per-BATCH sum
  sum_b sum_c sqrt(p_c).detach() * log p_c, summed over batches and divided by the examples.
Tensors that are not parameters (buffers) are averaged.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from mergelab.databased.common import batch_size, run_batch, take, to_device
from mergelab.errors import MergelabError

ESTIMATORS = ("per_example", "batch")


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    raise MergelabError("Fisher merging: the model's output is not logits; give a head per task")


def _one(batch, i: int):
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1]
    if isinstance(batch, Mapping):
        return {k: _one(v, i) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_one(v, i) for v in batch)
    return batch


def diagonal_fisher(model: torch.nn.Module, loader: Iterable, *, head: Callable | None = None,
                    num_examples: int = 256, estimator: str = "per_example", labeled: bool = False,
                    device: str | torch.device | None = None, forward: Callable | None = None
                    ) -> dict[str, torch.Tensor]:
    """Diagonal Fisher (float32, on the CPU) of every trainable parameter of ``model``."""
    if estimator not in ESTIMATORS:
        raise MergelabError(f"Fisher estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    forward = forward or run_batch
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise MergelabError("Fisher merging: no parameter of the model requires gradients (frozen model?)")
    names, tensors = list(params), list(params.values())
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    seen = 0

    def logits_of(batch):
        out = _logits(forward(model, batch) if head is None else head(forward(model, batch)))
        return out.float().reshape(-1, out.shape[-1])

    def add(grads, weight=1.0):
        for n, g in zip(names, grads):
            if g is not None:
                fisher[n].add_(g.detach().float().pow(2), alpha=weight)

    for item in loader:
        if seen >= num_examples:
            break
        batch, labels = item if labeled else (item, None)
        if labeled and not isinstance(item, (tuple, list)):
            raise MergelabError("Fisher merging with labels: the loader must yield (batch, labels) pairs")
        n = batch_size(batch)
        if seen + n > num_examples:
            n = num_examples - seen
            batch = take(batch, n)
            labels = None if labels is None else labels[:n]
        labels = None if labels is None else torch.as_tensor(labels)
        batch = to_device(batch, device)
        if estimator == "batch":
            logp = logits_of(batch).log_softmax(-1)
            obj = (logp.exp().detach().sqrt() * logp).sum() if labels is None else \
                logp.gather(1, labels.to(logp.device).reshape(-1, 1)).sum()
            add(torch.autograd.grad(obj, tensors, allow_unused=True))
        else:
            for i in range(n):
                logp = logits_of(_one(batch, i)).log_softmax(-1)[0]
                if labels is not None:
                    add(torch.autograd.grad(logp[int(labels[i])], tensors, allow_unused=True))
                    continue
                probs = logp.detach().exp()
                for c in range(logp.shape[0]):
                    add(torch.autograd.grad(logp[c], tensors, retain_graph=c + 1 < logp.shape[0], allow_unused=True),
                        float(probs[c]))
        seen += n
    if seen == 0:
        raise MergelabError("Fisher merging: the data loader yields no batches")
    return {k: (v / seen).cpu() for k, v in fisher.items()}


def fisher_merge(models: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]], *,
                 normalize: bool = True, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """The Fisher-weighted average of state dicts; tensors without a Fisher get the plain mean."""
    T = len(models)
    if T == 0 or len(fishers) != T:
        raise MergelabError(f"Fisher merging: {T} models and {len(fishers)} Fisher dicts")
    if normalize:
        norms = [sum(float(f.double().pow(2).sum()) for f in fs.values()) ** 0.5 for fs in fishers]
        inv = [1.0 / (n + eps) for n in norms]
        coeffs = [x / sum(inv) for x in inv]
    else:
        coeffs = [1.0] * T
    out = {}
    for k, ref in models[0].items():
        if not ref.is_floating_point():
            out[k] = ref.clone()
        elif all(k in fs for fs in fishers):
            num = sum(c * (fs[k].double() + eps) * m[k].double() for c, fs, m in zip(coeffs, fishers, models))
            den = sum(c * (fs[k].double() + eps) for c, fs in zip(coeffs, fishers))
            out[k] = (num / den).to(ref.dtype)
        else:
            out[k] = (sum(m[k].double() for m in models) / T).to(ref.dtype)
    return out


def fisher_merging(model: torch.nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor]], loaders: Sequence[Iterable],
                   heads: Sequence[Callable] | None = None, *, num_examples: int = 256, estimator: str = "per_example",
                   labeled: bool = False, normalize: bool = True, eps: float = 1e-6,
                   device: str | torch.device | None = None, forward: Callable | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Fisher merging of ``finetuned`` state dicts of ``model``'s architecture, each model's Fisher
    from ``loaders[t]`` (and ``heads[t]`` on the model's output, when given). Returns the merged state dict."""
    T = len(finetuned)
    if len(loaders) != T or (heads is not None and len(heads) != T):
        raise MergelabError(f"{T} fine-tuned models but {len(loaders)} data loaders"
                            + ("" if heads is None else f" and {len(heads)} heads"))
    work = copy.deepcopy(model).to(device or "cpu").eval()
    keys = list(work.state_dict().keys())
    fishers = []
    for t, sd in enumerate(finetuned):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise MergelabError(f"fine-tuned model {t + 1} lacks tensor '{missing[0]}'")
        work.load_state_dict({k: sd[k] for k in keys}, strict=True)
        with torch.enable_grad():
            fishers.append(diagonal_fisher(work, loaders[t], head=None if heads is None else heads[t],
                                           num_examples=num_examples, estimator=estimator, labeled=labeled,
                                           device=device, forward=forward))
        if progress is not None:
            progress("Fisher", t + 1, T)
    return fisher_merge([{k: sd[k] for k in keys} for sd in finetuned], fishers, normalize=normalize, eps=eps)
