"""Weight selection for soups (Ratatouille / model soups, ALGORITHMS.md 4.1 Stage 3).

Kept free of models and data: a soup is a list of run ids, scored by a callback, so that the
selection rule can be tested on hand-made scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence


@dataclass
class SoupResult:
    """The runs kept in a soup (in the order they were added) and its validation accuracy."""

    members: list[str]
    val_acc: float
    trace: list[dict] = field(default_factory=list)   # one entry per candidate: id, score, accepted


def rank_runs(val_acc: Mapping[str, float]) -> list[str]:
    """Run ids by validation accuracy, best first; ties broken by id so the order is reproducible."""
    return sorted(val_acc, key=lambda r: (-val_acc[r], r))


def uniform_soup(val_acc: Mapping[str, float], score: Callable[[Sequence[str]], float] | None = None) -> SoupResult:
    """Every run, in rank order; ``score`` (if given) gives the soup's validation accuracy."""
    members = rank_runs(val_acc)
    if not members:
        raise ValueError("a soup needs at least one run")
    return SoupResult(members, score(members) if score else math.nan)


def greedy_soup(val_acc: Mapping[str, float], score: Callable[[Sequence[str]], float]) -> SoupResult:
    """Greedy soup: add runs by decreasing validation accuracy; keep one only if the soup's validation
    accuracy does not drop (``>=`` the best so far, as the authors' ``inference.py``).

    The first (best) run is always kept and scored by its own validation accuracy.
    """
    order = rank_runs(val_acc)
    if not order:
        raise ValueError("a soup needs at least one run")
    members: list[str] = []
    best = -math.inf
    trace = []
    for run in order:
        s = val_acc[run] if not members else score(members + [run])
        accepted = s >= best
        if accepted:
            members.append(run)
            best = s
        trace.append({"run": run, "score": s, "accepted": accepted})
    return SoupResult(members, best, trace)
