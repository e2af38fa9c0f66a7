"""DELLA: drop delta entries at random with a keep probability that grows with their rank in the row (MagPrune),
rescale to the tensor's L1 norm, then TIES sign consensus (``della``) or a plain sum (``della_linear``).

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
arXiv 2406.11617; formulas as mergekit 0.1.5 ``sparsify.py::della_magprune`` and
``generalized_task_arithmetic.py`` (ALGORITHMS-2 §13.5; the paper itself not re-read, so both semantics
use these formulas).
```
delta_i = theta_i - base ; per row (1-D tensors: one row) r = rank of |delta| (1 = smallest)
rn = (r - min r) / (max r - min r) ; p = (density - epsilon) + 2 epsilon rn     # largest kept w.p. d + eps
M ~ Bernoulli(p) ; delta_i = delta_i * M * (||delta_i||_1 / ||delta_i * M||_1)  (if rescale; whole tensor)
delta_i *= weight_i ; della: keep entries whose sign is the sign of sum_i delta_i (0 -> +), divide by the
sum of the kept weights (normalize) ; della_linear: sum, divide by sum of weights if normalize
theta = base + lambda * mixed
```
Defaults (mergekit): density 1.0 (nothing dropped), epsilon 0.15, lambda 1, rescale true, normalize true
for ``della`` and false for ``della_linear``; 0 < density - epsilon and density + epsilon < 1 is required
when density < 1. Masks come from mergelab's seeded generator per (seed, tensor, model, block), so a run is
reproducible: 31-bit integer bits (DARE's, ``kernels.keep_with_probabilities_``) compared with each entry's
probability scaled to 2^31, no float uniforms (since 2026-12: other masks than the earlier
``torch.bernoulli`` ones for the same seed); mergekit draws from torch's global generator (seeded by its
``--random-seed``): outputs agree in distribution (kept fraction, norms), not entry by entry, unless the merge
gets mergekit's seed too (``random_seed``): then the masks are mergekit's own (``kernels.mergekit_stream``),
probabilities computed in its work dtype (bfloat16 ranks round). A row of one element (mergekit raises) keeps it with
probability ``density``.
"""

from __future__ import annotations

from typing import Callable

from mergelab._lazy import lazy_module
from mergelab.errors import MergelabError
from mergelab.methods.common import _mergekit_mix, lambda_param, weight_param
from mergelab.methods.dare import l1_rescale_factor
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")
K = lazy_module("mergelab.kernels")


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Keep probabilities of mergekit's ``della_magprune`` (ranks along dim 1; 1-D tensors as one row), computed
    in ``dtype`` (default float32) as mergekit computes them in its work dtype.

    Ranks are the inverse of one ``argsort`` (a scatter, not mergekit's second argsort: the same ranks);
    they are a permutation of 1..n in every row, so min and max are 1 and n (n rounded to ``dtype``)."""
    dtype = dtype or torch.float32
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(x.abs(), dim=1, descending=False)
    positions = torch.arange(x.shape[1], device=x.device).reshape(1, -1, *([1] * (x.dim() - 2)))
    ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order)).to(dtype) + 1
    n = x.shape[1]
    span = torch.tensor(float(n), dtype=dtype, device=x.device) - 1 if n > 1 else 1
    rn = ((ranks - 1) / span).clamp(0, 1)
    return ((density - epsilon) + rn * 2 * epsilon).reshape(delta.shape)


def _masked_(job: TensorJob, delta: torch.Tensor, p: dict, i: int) -> torch.Tensor:
    """In place: MagPrune's drop: mergekit's own mask where the merge replays its stream (``--random-seed``;
    probabilities in its work dtype), else integer bits against each entry's probability (``kernels``)."""
    if job.replays_mergekit(i):
        work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
        return delta.mul_(job.mergekit_mask(i, magprune_probabilities(delta, p["density"], p["epsilon"], work)))
    return K.keep_with_probabilities_(delta, magprune_probabilities(delta, p["density"], p["epsilon"]),
                                      job.generator(i))


def _sparsify(job: TensorJob) -> Callable[[torch.Tensor, dict, int], torch.Tensor]:
    def drop(delta: torch.Tensor, p: dict, i: int) -> torch.Tensor:
        """``delta`` is a row of the job's own stacked task vectors: dropped and rescaled in place."""
        if p["density"] >= 1:
            return delta
        if p["density"] <= 0:
            return delta.zero_()
        rescale = job.params["rescale"]
        if rescale and job.stats is not None:
            before, after = float(job.stats[2 * i]), float(job.stats[2 * i + 1])
        elif rescale:
            before = float(K.l1_norm(delta))
        kept = _masked_(job, delta, p, i)
        if not rescale:
            return kept
        if job.stats is None:
            after = float(K.l1_norm(kept))
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept.mul_(l1_rescale_factor(before, after, kept.dtype))
    return drop


def _stats(job: TensorJob) -> torch.Tensor | None:
    """L1 norms of each delta before and after the drop, over the whole tensor (same seeded masks)."""
    if not job.params["rescale"]:
        return None
    sums = []
    for i, (model, p) in enumerate(zip(job.models, job.model_params)):
        delta = model - job.base               # one task vector at a time
        sums.append(delta.abs().sum(dtype=torch.float64).cpu())
        kept = _masked_(job, delta, p, i) if 0 < p["density"] < 1 else delta
        sums.append(kept.abs().sum(dtype=torch.float64).cpu())
        del delta, kept
    return torch.stack(sums)


def _check(params: dict, model_params: list[dict], compat: str) -> None:
    for i, p in enumerate(model_params):
        d, e = p["density"], p["epsilon"]
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise MergelabError(f"della: model {i}: density ({d}) +/- epsilon ({e}) must lie in (0, 1)")


def _mergekit_draws(p: dict) -> bool:
    """mergekit's ``della_magprune`` returns early (no draw) at density 0 and 1."""
    return 0 < p["density"] < 1


def _della(job: TensorJob) -> torch.Tensor:
    return _mergekit_mix(job, _sparsify(job), consensus=True)


def _della_linear(job: TensorJob) -> torch.Tensor:
    return _mergekit_mix(job, _sparsify(job), consensus=False)


def _params(normalize: bool) -> tuple[Param, ...]:
    return (
        weight_param(),
        Param("density", float, 1.0, "mean fraction of each task vector kept", per_model=True, low=0.0, high=1.0),
        Param("epsilon", float, 0.15, "keep probabilities span density +/- epsilon by magnitude rank",
              per_model=True, low=0.0, high=1.0),
        lambda_param(1.0),
        Param("rescale", bool, True, "rescale kept entries to the tensor's L1 norm"),
        Param("normalize", bool, normalize, "divide by the sum of (kept) weights"),
        Param("seed", int, 0, "seed of the random drop masks (fixed per tensor and model)"),
    )


register(Method(
    name="della",
    summary="MagPrune random drop (keep probability by magnitude rank), L1 rescale, TIES sign consensus",
    reference="Deep et al. 2024, arXiv 2406.11617; mergekit 0.1.5 della",
    formula="p = d - eps + 2 eps rank/(n-1) per row; delta *= Bernoulli(p), L1-rescaled; sign-consensus mean",
    params=_params(True), task_vectors_only=True, merge_tensor=_della, stats=_stats, prepare=_check,
    mergekit_draws=_mergekit_draws,
))
register(Method(
    name="della_linear",
    summary="MagPrune random drop and L1 rescale, then a weighted sum (no sign consensus)",
    reference="Deep et al. 2024, arXiv 2406.11617; mergekit 0.1.5 della_linear",
    formula="p = d - eps + 2 eps rank/(n-1) per row; delta *= Bernoulli(p), L1-rescaled; base + lambda sum w delta",
    params=_params(False), task_vectors_only=True, merge_tensor=_della_linear, stats=_stats, prepare=_check,
    mergekit_draws=_mergekit_draws,
))
