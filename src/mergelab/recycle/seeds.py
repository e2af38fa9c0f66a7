"""Ratatouille over several data seeds: paired differences per seed and their aggregation.

Kept free of models: the inputs are the per-example outcomes (``'1'`` correct, ``'0'`` wrong) that
``results.json`` stores under ``outcomes`` for every method and test split, so the arithmetic can be
tested on hand-made numbers.

Two intervals for the mean over seeds of a paired difference A - B are given:

* ``t``: a t-interval over the per-seed differences (df = seeds - 1).  It covers both sources of
  variation (the training runs and the test examples drawn for each seed), and is wide with 3 seeds.
* ``bootstrap``: a paired bootstrap pooling the seeds: each replicate resamples the test examples
  within every seed (the same indices for A and B) and averages the per-seed differences; the
  percentile interval.  It covers the test-example noise only, conditional on the trained runs.
"""
from __future__ import annotations

import math
import random
from typing import Mapping, Sequence


def bits(x: str | Sequence[bool]) -> list[int]:
    """Outcomes as 0/1 integers (from a ``'0110'`` string or a list of booleans)."""
    return [1 if c in ("1", True, 1) else 0 for c in x]


def _se(d: Sequence[float]) -> float:
    n = len(d)
    mu = sum(d) / n
    return math.sqrt(sum((x - mu) ** 2 for x in d) / max(1, n - 1) / n)


def paired_diff(a: Sequence[int], b: Sequence[int]) -> tuple[float, float]:
    """Mean of a - b over the same examples (0/1 or booleans) and the standard error of that mean
    (also the pipeline's per-run comparisons)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired outcomes must be non-empty and of equal length")
    d = [x - y for x, y in zip(a, b)]
    return sum(d) / len(d), _se(d)


def t_quantile(p: float, df: int) -> float:
    from scipy.stats import t
    return float(t.ppf(p, df))


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, SD, standard error and t-interval of a few values (one per seed)."""
    n = len(values)
    mu = sum(values) / n
    if n < 2:
        return {"mean": mu, "sd": math.nan, "se": math.nan, "lo": math.nan, "hi": math.nan, "n": n}
    sd = math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return {"mean": mu, "sd": sd, "se": se, "lo": mu - half, "hi": mu + half, "n": n}


def pooled_bootstrap(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Paired bootstrap of the mean over seeds of mean(a - b), resampling examples within each seed."""
    diffs = []
    for a, b in pairs:
        if len(a) != len(b) or not a:
            raise ValueError("paired outcomes must be non-empty and of equal length")
        diffs.append([x - y for x, y in zip(a, b)])
    point = sum(sum(d) / len(d) for d in diffs) / len(diffs)
    rng = random.Random(seed)
    reps = []
    for _ in range(n_boot):
        tot = 0.0
        for d in diffs:
            n = len(d)
            tot += sum(d[rng.randrange(n)] for _ in range(n)) / n
        reps.append(tot / len(diffs))
    reps.sort()
    lo_i = int(math.floor((1 - level) / 2 * n_boot))
    hi_i = min(n_boot - 1, int(math.ceil((1 + level) / 2 * n_boot)) - 1)
    # the analytic counterpart: SE of the mean over seeds of independent per-seed means
    se = math.sqrt(sum(_se(d) ** 2 for d in diffs)) / len(diffs)
    return {"mean": point, "lo": reps[lo_i], "hi": reps[hi_i], "se": se, "n_boot": n_boot}


def compare_over_seeds(outcomes: Sequence[Mapping[str, Mapping[str, str]]], a: str, b: str, split: str,
                       n_boot: int = 2000, seed: int = 0) -> dict:
    """A - B on ``split`` for every seed (diff, paired SE) and over seeds (t-interval and pooled bootstrap).

    ``outcomes[s][method][split]`` is seed s's outcome string (``results.json``'s ``outcomes``).
    """
    per_seed = []
    pairs = []
    for o in outcomes:
        x, y = bits(o[a][split]), bits(o[b][split])
        d, se = paired_diff(x, y)
        per_seed.append({"diff": d, "se": se, "n": len(x)})
        pairs.append((x, y))
    return {"a": a, "b": b, "split": split, "per_seed": per_seed,
            "t": t_interval([p["diff"] for p in per_seed]),
            "bootstrap": pooled_bootstrap(pairs, n_boot=n_boot, seed=seed)}
