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


def exact_ties_param():
    return Param("exact_ties", bool, True,
                 "magnitudes tied at a trim cut: keep the ones mergekit's argsort keeps (bit-identical; its sort "
                 "replayed on each such tensor) or, if false, keep them all (a few entries more)", modes=("mergekit",))


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
    w = job.weights()
    if consensus and 0 < len(w) <= K.SEQUENTIAL_ROWS and deltas.dtype in (torch.float32, torch.float64) \
            and deltas.is_contiguous():
        return K.fused_consensus_mix(job.base, deltas, w, job.params["normalize"], job.params["lambda"])
    weights = torch.tensor(w, dtype=deltas.dtype, device=deltas.device)
    if any(x != 1 for x in w):
        deltas.mul_(weights.reshape(-1, *([1] * (deltas.dim() - 1))))
    normalize = job.params["normalize"]
    if consensus:
        sign = K.elect_sign(deltas, zero="positive")
        agreeing = deltas.mul_(sign).clamp_(min=0)          # |w delta| where signs agree, else 0
        mixed = K.stack_sum(agreeing).mul_(sign)
        del sign
        divisor = _kept_weights(weights, agreeing.sign_()) if normalize else None   # mask: 1 where kept
    else:
        mixed = K.stack_sum(deltas)
        divisor = mergekit_weight_sum(weights)
    del deltas
    if normalize:
        mixed.div_(divisor)
    if job.params["lambda"] != 1:
        mixed.mul_(job.params["lambda"])
    return mixed.add_(job.base)          # base + mixed (the same sum), in the buffer of the mix


def _kept_weights(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the weights of the kept entries (``mask`` 0/1), 1 where nothing is kept (mergekit)."""
    return K.one_where_nothing_kept_(torch.tensordot(weights, mask, dims=1),
                                     float(weights.min()) if weights.numel() else 0.0)


def mergekit_weight_sum(weights: torch.Tensor) -> torch.Tensor:
    """mergekit's divisor of a plain (normalised) sum: the weights' sum, 1 where it is below 1e-8 in size."""
    divisor = weights.sum()
    return torch.ones_like(divisor) if divisor.abs() < 1e-8 else divisor


def check_inputs_through(job: TensorJob, result: torch.Tensor) -> torch.Tensor:
    """The inputs' NaN/Inf check, left to a kernel whose result every input reaches (``checks_inputs``):
    NaN and Inf survive any weight, lambda or normalisation (NaN * 0 and Inf * 0 are NaN), so one look
    at the result replaces a pass over every input. Names the input when the result is not finite; an
    overflow of finite inputs passes, as mergekit writes it."""
    if job.check_inputs is not None and result.numel():
        low, high = torch.aminmax(result)
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            job.check_inputs()
    return result


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
