"""What several methods share: common parameters and the two merge skeletons (sum, sign consensus)."""

from __future__ import annotations

from typing import Callable

from mergelab._lazy import lazy_module
from mergelab.methods.registry import Param, TensorJob

torch = lazy_module("torch")
K = lazy_module("mergelab.kernels")


def weight_param():
    return Param("weight", float, 1.0, "scale of this model's task vector (or its share in the average)",
                 per_model=True)


def lambda_param(default: float, mergekit_default: float = 1.0):
    return Param("lambda", float, default, "scale of the merged task vector", mergekit_default=mergekit_default)


def normalize_param(default: bool):
    return Param("normalize", bool, default, "divide by the sum of weights (mergekit)", modes=("mergekit",))


DENSITY_HELP = "fraction of each task vector kept"
MERGE_MODE = Param("merge", str, "mean", "disjoint merge: mean (TIES paper), sum (FusionBench), max",
                    choices=("mean", "sum", "max"), modes=("paper",))


def _stacked_deltas(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor],
                    weighted: bool = True) -> torch.Tensor:
    """``[T, *shape]`` of ``weight * sparsify(delta)`` (weights applied first: what the paper's trim sees)."""
    out = job.stacked if job.stacked is not None else K.task_vectors(job.base, job.models)
    for i, p in enumerate(job.model_params):
        row = out[i]
        w = p.get("weight", 1.0)
        if weighted and w != 1.0:
            row.mul_(w)
        result = sparsify(row, p, i)
        if result is not row:
            row.copy_(result)
    return out


def _stack_weighted(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor]) -> torch.Tensor:
    return _stacked_deltas(job, sparsify, weighted=True)


def _mergekit_mix(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor],
                  consensus: bool) -> torch.Tensor:
    """mergekit 0.1.5 ``GeneralizedTaskArithmeticMerge.merge_group`` on float32 tensors.

    Sparsify each delta, multiply by its weight, then (with consensus) keep entries whose sign equals
    the sign of the weighted sum (0 -> +1); mix = sum, divided by the sum of the kept weights if
    ``normalize``; times ``lambda``.
    """
    deltas = _stacked_deltas(job, sparsify, weighted=False)
    weights = torch.tensor(job.weights(), dtype=deltas.dtype, device=deltas.device)
    if bool((weights != 1).any()):
        deltas.mul_(weights.reshape(-1, *([1] * (deltas.dim() - 1))))
    if consensus:
        sign = K.elect_sign(deltas, zero="positive")
        agreeing = deltas.mul_(sign).clamp_(min=0)          # |w delta| where signs agree, else 0
        mixed = agreeing.sum(dim=0).mul_(sign)
        mask = agreeing.sign_()                              # 1 where kept, 0 elsewhere
        divisor = torch.tensordot(weights, mask, dims=1)
        if bool((weights > 0).all()):
            # the divisor is 0 exactly where nothing is kept: make it 1 there without a boolean mask
            divisor.add_(mask.amax(dim=0).sub_(1), alpha=-1.0)
        else:
            divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if job.params["normalize"]:
        mixed = mixed / divisor
    if job.params["lambda"] != 1:
        mixed = mixed * job.params["lambda"]
    return job.base + mixed


def sum_merge(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor]) -> torch.Tensor:
    """Sparsified task vectors added up (breadcrumbs, DARE): base + lambda * sum."""
    if job.compat == "mergekit":
        return _mergekit_mix(job, sparsify, consensus=False)
    return job.base + job.params["lambda"] * _stack_weighted(job, sparsify).sum(dim=0)


def consensus_merge(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor]) -> torch.Tensor:
    """Sparsified task vectors, TIES sign election by mass and disjoint merge (TIES, *_ties)."""
    if job.compat == "mergekit":
        return _mergekit_mix(job, sparsify, consensus=True)
    stacked = _stack_weighted(job, sparsify)
    merged = K.disjoint_merge(stacked, K.elect_sign(stacked), job.params["merge"])
    return job.base + job.params["lambda"] * merged
