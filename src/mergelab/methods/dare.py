"""DARE: drop delta entries at random and rescale the rest (linear and TIES variants)."""

from __future__ import annotations

import math
from typing import Callable

from mergelab._lazy import lazy_module
from mergelab.methods.common import MERGE_MODE, consensus_merge, lambda_param, normalize_param, sum_merge, weight_param
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")
K = lazy_module("mergelab.kernels")


def _dare_sparsify(job: TensorJob) -> Callable[[torch.Tensor, dict, int], torch.Tensor]:
    """Drop in place: ``delta`` is a row of the job's own stacked task vectors (masks from CPU bits, applied
    on the delta's device, so that a GPU merge gives the CPU's result)."""
    l1 = job.compat == "mergekit" and job.params["rescale"]
    # L1 norms: float32 sums (torch's cascade summation, ~1e-7 relative; 10x cheaper than float64 ones),
    # added over the blocks of a tensor in float64

    scratch: list[torch.Tensor] = []     # |delta| of one model at a time, reused over the job's models

    def norm(x: torch.Tensor) -> float:
        if not scratch or scratch[0].shape != x.shape:
            scratch[:] = [torch.empty_like(x)]
        return float(K.l1_norm(x, scratch[0]))

    def drop(delta: torch.Tensor, p: dict, i: int) -> torch.Tensor:
        if l1:   # mergekit: match the L1 norm of the whole tensor's delta (blocks: sums from the stats pass)
            if job.stats is not None:
                before, after = float(job.stats[2 * i]), float(job.stats[2 * i + 1])
                _check_norm(job, before)
                kept = dare_mask_(job, delta, p["density"], i)
            else:
                before = norm(delta)
                _check_norm(job, before)
                kept = dare_mask_(job, delta, p["density"], i)
                after = norm(kept)
            if 0 < p["density"] < 1 and before >= 1e-7 and after >= 1e-7:
                kept.mul_(l1_rescale_factor(before, after, kept.dtype))
            return kept
        if job.compat == "mergekit":       # rescale: false: mergekit keeps the surviving entries as they are
            return dare_mask_(job, delta, p["density"], i)
        return K.dare(delta, 1.0 - p["density"], job.generator(i), rescale="inverse", inplace=True)
    return drop


def l1_rescale_factor(before: float, after: float, dtype: torch.dtype) -> float | torch.Tensor:
    """mergekit's ``before / after``: in bfloat16 its two sums are bfloat16 tensors and so is their quotient (the
    product with it then rounds as mergekit's does); in float32 the quotient of the two float32 sums."""
    if dtype == torch.bfloat16:
        return torch.tensor(before, dtype=dtype) / torch.tensor(after, dtype=dtype)
    return before / after


def dare_mask_(job: TensorJob, delta: torch.Tensor, density: float, i: int) -> torch.Tensor:
    """In place, no rescale: mergekit's own mask where the merge replays its stream (``--random-seed``; the
    density in mergekit's work dtype, applied as its product), else mergelab's seeded one."""
    if density < 1 and job.replays_mergekit(i):
        work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
        return delta.mul_(job.mergekit_keep(i, delta, torch.tensor(density, dtype=work)))
    return K.dare(delta, 1.0 - density, job.generator(i), rescale="none", inplace=True)


def _check_norm(job: TensorJob, norm: float) -> None:
    """The inputs' NaN/Inf check, left to this kernel by the engine: ||model_i - base||_1 is finite unless
    an input is (or the sum overflowed: then the inputs pass the check and the merge goes on)."""
    if not math.isfinite(norm) and job.check_inputs is not None:
        job.check_inputs()


def _dare_checks_inputs(params: dict, compat: str) -> bool:
    return compat == "mergekit" and bool(params.get("rescale", True))


def _dare_stats(job: TensorJob) -> torch.Tensor | None:
    """L1 norms of each delta before and after the drop (same seeded masks as the merge pass)."""
    if job.compat != "mergekit" or not job.params["rescale"]:
        return None
    sums = []
    for i, (model, p) in enumerate(zip(job.models, job.model_params)):
        delta = model - job.base               # one task vector at a time
        scratch = torch.empty_like(delta)
        before = K.l1_norm(delta, scratch).double()
        kept = dare_mask_(job, delta, p["density"], i)
        sums += [before.cpu(), K.l1_norm(kept, scratch).double().cpu()]
        del delta, kept, scratch
    return torch.stack(sums)


def _mergekit_draws(p: dict) -> bool:
    """mergekit's ``bernoulli`` returns the task vector untouched at density 1, else draws (density 0 too)."""
    return p["density"] < 1


def _dare_linear(job: TensorJob) -> torch.Tensor:
    return sum_merge(job, _dare_sparsify(job))


def _dare_ties(job: TensorJob) -> torch.Tensor:
    return consensus_merge(job, _dare_sparsify(job))


def _dare_params(merge_mode: bool) -> tuple[Param, ...]:
    params = (
        weight_param(),
        Param("density", float, 0.9, "fraction kept = 1 - drop rate p", per_model=True, low=0.0, high=1.0,
              mergekit_default=1.0),
        lambda_param(1.0),
        Param("seed", int, 0, "seed of the random drop masks (fixed per tensor and model)"),
        Param("rescale", bool, True, "rescale kept entries to the L1 norm (mergekit)", modes=("mergekit",)),
        normalize_param(False),
    )
    return params + ((MERGE_MODE,) if merge_mode else ())


register(Method(
    name="dare_linear", aliases=("dare",),
    summary="drop delta entries with probability p, rescale by 1/(1-p), task arithmetic",
    reference="Yu et al. ICML 2024, arXiv 2311.03099",
    params=_dare_params(False), merge_tensor=_dare_linear, stats=_dare_stats,
    task_vectors_only=True, checks_inputs=_dare_checks_inputs, mergekit_draws=_mergekit_draws,
))
register(Method(
    name="dare_ties",
    summary="DARE drop and rescale, then TIES sign election and disjoint merge",
    reference="Yu et al. ICML 2024 + Yadav et al. NeurIPS 2023",
    params=_dare_params(True), merge_tensor=_dare_ties, stats=_dare_stats,
    task_vectors_only=True, checks_inputs=_dare_checks_inputs, mergekit_draws=_mergekit_draws,
))
