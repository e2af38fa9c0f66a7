"""Weighted average (model soup) and task arithmetic."""

from __future__ import annotations

from mergelab._lazy import lazy_module
from mergelab.errors import MergelabError
from mergelab.methods.common import (check_inputs_through, lambda_param, mergekit_weight_sum, normalize_param,
                                     sum_merge, weight_param)
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")
K = lazy_module("mergelab.kernels")


def _average(job: TensorJob) -> torch.Tensor:
    weights = job.weights()
    total = torch.zeros_like(job.models[0])
    for w, m in zip(weights, job.models):
        total.add_(m, alpha=w)
    normalize = job.params.get("normalize", True)
    if normalize:
        s = sum(weights)
        if abs(s) < 1e-12:
            raise MergelabError(f"{job.name}: the model weights sum to zero; cannot average")
        total.div_(s)
    return total


def _average_coefficients(params: dict, model_params: list[dict], compat: str) -> tuple[None, list[float]] | None:
    weights = [p.get("weight", 1.0) for p in model_params]
    if not params.get("normalize", True):
        return None, weights
    s = sum(weights)
    if abs(s) < 1e-12:
        return None          # the per-tensor path reports it, naming the tensor
    return None, [w / s for w in weights]


register(Method(
    name="average", aliases=("linear",),
    summary="weighted average of the models' weights (model soup)",
    reference="Wortsman et al. 2022, arXiv 2203.05482",
    params=(weight_param(), Param("normalize", bool, True, "divide by the sum of weights")),
    merge_tensor=_average, needs_base=False, linear_combination=_average_coefficients,
))


def _task_arithmetic(job: TensorJob) -> torch.Tensor:
    if job.stacked is None and _one_pass(job.params, job.model_params, job.compat) and job.base is not None \
            and all(m.dtype == job.base.dtype and m.shape == job.base.shape for m in job.models) \
            and job.base.dtype in (torch.float32, torch.float64):
        w = job.weights()
        weights = torch.tensor(w, dtype=job.base.dtype, device=job.base.device)     # as mergekit's: inputs' dtype
        divisor = mergekit_weight_sum(weights) if job.params["normalize"] else None
        merged, finite = K.fused_task_arithmetic(job.base, job.models, weights if any(x != 1 for x in w) else None,
                                                 job.params["lambda"], divisor)
        if not finite and job.check_inputs is not None:
            job.check_inputs()
        return merged
    return check_inputs_through(job, sum_merge(job, lambda delta, p, i: delta))


def _one_pass(params: dict, model_params: list[dict], compat: str) -> bool:
    """mergekit's task arithmetic in one pass over the inputs (its sum of up to 4 task vectors is added in
    model order, which the chunked kernel keeps; more are summed by torch's regrouping reduction)."""
    return compat == "mergekit" and 1 <= len(model_params) <= K.SEQUENTIAL_ROWS


def _task_arithmetic_coefficients(params: dict, model_params: list[dict], compat: str) -> tuple[float, list[float]]:
    """base + lambda * sum_i w_i (m_i - base) [/ sum_i w_i with mergekit's normalize] = c0 base + sum_i c_i m_i."""
    weights = [p.get("weight", 1.0) for p in model_params]
    scale = params["lambda"]
    if compat == "mergekit" and params.get("normalize"):
        total = sum(weights)
        scale /= total if abs(total) >= 1e-8 else 1.0
    coefficients = [scale * w for w in weights]
    return 1.0 - sum(coefficients), coefficients


register(Method(
    name="task_arithmetic",
    summary="base + lambda * sum of task vectors",
    reference="Ilharco et al. ICLR 2023, arXiv 2212.04089",
    params=(weight_param(), lambda_param(0.3), normalize_param(False)),
    merge_tensor=_task_arithmetic, linear_combination=_task_arithmetic_coefficients,
    task_vectors_only=True, checks_inputs=lambda params, compat: True, reads_inputs=_one_pass,
))
