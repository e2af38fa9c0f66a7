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
