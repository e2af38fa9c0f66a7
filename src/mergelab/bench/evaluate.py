"""Evaluation loop: accuracy with its binomial standard error, and the per-example outcomes that
paired comparisons between two models need."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from mergelab.bench.train import Progress, embed


@dataclass
class EvalResult:
    """Accuracy of one model on one split; ``correct`` keeps the per-example outcomes."""

    accuracy: float
    n: int
    correct: list[bool] = field(repr=False, default_factory=list)

    @property
    def se(self) -> float:
        """Binomial standard error sqrt(p (1 - p) / n)."""
        return binomial_se(self.accuracy, self.n)


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def evaluate(encoder: nn.Module, head: nn.Module, seqs: Sequence[Sequence[int]],
             labels: Sequence[int], batch_size: int = 128, pad_id: int = 0,
             progress: Progress = None) -> EvalResult:
    """Accuracy of ``head(mean_pool(encoder(x)))`` on pre-tokenized ``seqs``."""
    z = embed(encoder, seqs, batch_size=batch_size, pad_id=pad_id, progress=progress)
    with torch.no_grad():
        pred = head(z.to(next(head.parameters()).device)).argmax(-1).cpu()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    correct = (pred == y).tolist()
    return EvalResult(sum(correct) / len(correct), len(correct), correct)


def mean_se(results: Sequence[EvalResult]) -> tuple[float, float]:
    """Average accuracy over tasks and its SE (independent tasks: sqrt(sum se_i^2) / T)."""
    t = len(results)
    avg = sum(r.accuracy for r in results) / t
    se = math.sqrt(sum(r.se ** 2 for r in results)) / t
    return avg, se


def paired_diff(a: Sequence[EvalResult], b: Sequence[EvalResult]) -> tuple[float, float]:
    """Difference of average accuracies (a - b) over tasks and its paired standard error.

    Both models are scored on the same examples, so the SE of the per-example difference is far
    smaller than the two binomial SEs combined: per task se_t = sd(c_a - c_b) / sqrt(n_t), and the
    average's SE is sqrt(sum se_t^2) / T.
    """
    diffs, var = [], 0.0
    for ra, rb in zip(a, b):
        d = [float(x) - float(y) for x, y in zip(ra.correct, rb.correct)]
        n = len(d)
        mu = sum(d) / n
        sd2 = sum((x - mu) ** 2 for x in d) / max(1, n - 1)
        diffs.append(mu)
        var += sd2 / n
    t = len(diffs)
    return sum(diffs) / t, math.sqrt(var) / t


def bootstrap_replicates(correct: Sequence[Sequence[Sequence[float]]], n_boot: int = 1000,
                         seed: int = 0) -> "torch.Tensor":
    """Bootstrap replicates of the average-over-tasks accuracy of several models at once.

    ``correct[m][t]`` = per-example outcomes (0/1, or a mean over fine-tuning seeds) of model m on
    task t; every model is resampled with the *same* example indices (drawn per task, with
    replacement), so ``rep[a] - rep[b]`` are replicates of the paired difference.  Returns
    ``[models, n_boot]``.
    """
    g = torch.Generator().manual_seed(seed)
    n_models, n_tasks = len(correct), len(correct[0])
    rep = torch.zeros(n_models, n_boot, dtype=torch.float64)
    for t in range(n_tasks):
        c = torch.as_tensor([list(map(float, correct[m][t])) for m in range(n_models)], dtype=torch.float64)
        n = c.shape[1]
        idx = torch.randint(0, n, (n_boot, n), generator=g)
        # counts per example per replicate: rep = counts @ c.T / n (no [n_boot, n] gather per model)
        counts = torch.zeros(n_boot, n, dtype=torch.float64)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        rep += (counts @ c.T).T / n
    return rep / n_tasks


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """Paired bootstrap of the difference of average accuracies a - b (same test examples): the
    observed difference, the bootstrap SE and the 95 % percentile interval."""
    rep = bootstrap_replicates([a, b], n_boot, seed)
    d = rep[0] - rep[1]
    obs = sum(sum(map(float, x)) / len(x) - sum(map(float, y)) / len(y) for x, y in zip(a, b)) / len(a)
    lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": obs, "se": float(d.std()), "ci_low": lo, "ci_high": hi}
