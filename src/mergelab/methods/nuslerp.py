"""NuSLERP: SLERP of two models (or of their task vectors from a base) with weights, flattened or row by row.

mergekit 0.1.5 ``merge_methods/nuslerp.py`` (ALGORITHMS-2 §13.2); both semantics are the same.
```
t = 0.5 if |w1 + w2| < 1e-6 else w2 / (w1 + w2)          # t = 0 -> the FIRST model
with a base: out = base + nuslerp(t, m1 - base, m2 - base) ; else out = nuslerp(t, m1, m2)
nuslerp(t, v0, v1): vectors = whole tensor (nuslerp_flatten, default), else rows W[i, :] (default) or,
  with nuslerp_row_wise, slices along dim 0 ; u = v / max(||v||, 1e-7) ; cos = clamp(<u0, u1>, -1, 1)
  colinear (1 - cos^2 <= 1e-16): lerp ; else (sin((1-t) theta) v0 + sin(t theta) v1) / sin theta
```
Computed in the input dtype (no float32 upcast, unlike slerp). Flattened tensors larger than a block are
merged in blocks from float64 sums over the whole tensor (equal to mergekit to rounding).
"""

from __future__ import annotations

import math

from mergelab._lazy import lazy_module
from mergelab.methods.common import weight_param
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")
EPS = 1e-8


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False,
            stats: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's ``nuslerp``; ``stats`` = float64 [|v0|^2, |v1|^2, <v0, v1>] of the whole (flattened) tensor."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    if stats is not None:
        n0, n1 = max(math.sqrt(float(stats[0])), 1e-7), max(math.sqrt(float(stats[1])), 1e-7)
        cos = torch.tensor([float(stats[2]) / (n0 * n1)], dtype=v0.dtype).clamp(-1, 1)
    else:
        u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
        u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
        cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def _t(job: TensorJob) -> float:
    w1, w2 = job.weights()
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


def _vectors(job: TensorJob):
    a, b = job.models
    return (a, b) if job.base is None else (a - job.base, b - job.base)


def _nuslerp(job: TensorJob) -> torch.Tensor:
    v0, v1 = _vectors(job)
    flatten = job.params["nuslerp_flatten"]
    out = nuslerp(_t(job), v0, v1, dim=0 if job.params["nuslerp_row_wise"] else -1, flatten=flatten,
                  stats=job.stats if flatten else None)
    return out if job.base is None else job.base + out


def _stats(job: TensorJob) -> torch.Tensor | None:
    if not job.params["nuslerp_flatten"]:
        return None
    v0, v1 = (x.reshape(-1).double() for x in _vectors(job))
    return torch.stack([torch.dot(v0, v0), torch.dot(v1, v1), torch.dot(v0, v1)]).cpu()


register(Method(
    name="nuslerp",
    summary="SLERP of two models (task vectors if a base is given) with weights; whole tensor or per row",
    reference="mergekit 0.1.5 nuslerp",
    formula="t = w2/(w1+w2); base + slerp(t, m1 - base, m2 - base) over the tensor (flatten) or its rows",
    params=(
        weight_param(),
        Param("nuslerp_flatten", bool, True, "treat each tensor as one vector (else rows or columns)"),
        Param("nuslerp_row_wise", bool, False, "without flatten: vectors along dim 0 (columns) instead of rows"),
    ),
    merge_tensor=_nuslerp, stats=_stats, needs_base=False, optional_base=True, min_models=2, max_models=2,
    chunkable=lambda params, compat: params["nuslerp_flatten"] or not params["nuslerp_row_wise"],
))
