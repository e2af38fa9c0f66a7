"""SLERP: spherical interpolation between the base and one other model, each tensor one vector.

mergekit 0.1.5 ``merge_methods/slerp.py`` (ALGORITHMS-2 §13.1); Shoemake, "Animating rotation with
quaternion curves", SIGGRAPH 1985. Both semantics are the same (no paper defines it for models).
```
v0 = base, v1 = the other model (t = 0 -> base, t = 1 -> other); a, b = flatten(v0), flatten(v1) in float32
na = ||a|| (norm of the norms of chunks of 2^20 elements), nb likewise; a norm <= 1e-8 counts as 1
dot = clamp(sum((a / na) * (b / nb)), -1, 1)
|dot| > 0.9995 (near parallel or antipodal):  out = (1 - t) a + t b
else: theta = acos(dot); out = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b
```
No renormalisation; a zero tensor is not lerped (its unit vector is 0: theta = pi/2). ``t`` is required in
mergekit; it is usually a gradient over layers and filtered by ``self_attn`` / ``mlp``.
Tensors larger than a block are merged in blocks of rows from float64 sums over the whole tensor (equal
to mergekit's chunked float32 sums to rounding); smaller ones repeat mergekit's operations exactly.
"""

from __future__ import annotations

import math

from mergelab._lazy import lazy_module
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")

CHUNK = 1 << 20
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor,
                       stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's two coefficients for flat ``a`` (base) and ``b``, as 1-element tensors of the work dtype.

    ``stats`` = float64 [sum a^2, sum b^2, sum a b] of the whole tensor (blocks); else computed from a, b
    with mergekit's chunked float32 operations."""
    dtype = _work_dtype(a)
    tt = torch.tensor([[t]], dtype=dtype)
    if stats is not None:
        na, nb = math.sqrt(float(stats[0])), math.sqrt(float(stats[1]))
        na_, nb_ = (na if na > EPS else 1.0), (nb if nb > EPS else 1.0)
        dot = torch.tensor([[float(stats[2]) / (na_ * nb_)]], dtype=dtype).clamp(-1, 1)
    else:
        a2, b2 = a.reshape(1, -1), b.reshape(1, -1)
        n = a2.shape[1]
        starts = range(0, n, CHUNK)
        parts_a = [torch.linalg.vector_norm(a2[:, s:s + CHUNK].to(dtype), dim=1, keepdim=True) for s in starts]
        parts_b = [torch.linalg.vector_norm(b2[:, s:s + CHUNK].to(dtype), dim=1, keepdim=True) for s in starts]
        na = torch.linalg.vector_norm(torch.stack(parts_a), dim=0)
        nb = torch.linalg.vector_norm(torch.stack(parts_b), dim=0)
        na = torch.where(na > EPS, na, 1)
        nb = torch.where(nb > EPS, nb, 1)
        dots = [((a2[:, s:s + CHUNK].to(dtype) / na) * (b2[:, s:s + CHUNK].to(dtype) / nb)).sum(dim=1, keepdim=True)
                for s in range(0, n, CHUNK)]
        dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
    if v0.numel() == 0:
        return v0.clone()
    coef_a, coef_b = slerp_coefficients(t, v0, v1, stats)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    dtype = _work_dtype(v0)
    out = torch.empty_like(a)
    for s in range(0, a.shape[1], CHUNK):
        out[:, s:s + CHUNK] = coef_a * a[:, s:s + CHUNK].to(dtype) + coef_b * b[:, s:s + CHUNK].to(dtype)
    return out.reshape(v0.shape)


def flat_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 [sum a^2, sum b^2, sum a b] of one block (added over blocks by the engine)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return torch.stack([torch.dot(a, a), torch.dot(b, b), torch.dot(a, b)]).cpu()


def _slerp(job: TensorJob) -> torch.Tensor:
    return slerp_tensors(job.params["t"], job.base, job.models[0], job.stats)


def _slerp_stats(job: TensorJob) -> torch.Tensor:
    return flat_stats(job.base, job.models[0])


register(Method(
    name="slerp",
    summary="spherical interpolation of base and one model, each tensor as one vector (t=0 base, t=1 model)",
    reference="Shoemake SIGGRAPH 1985; mergekit 0.1.5 slerp",
    formula="theta = angle(base, m); out = sin((1-t) theta)/sin theta * base + sin(t theta)/sin theta * m; "
            "lerp if |cos theta| > 0.9995",
    params=(Param("t", float, 0.5, "interpolation factor: 0 = base, 1 = the other model (mergekit: required)",
                  low=0.0, high=1.0),),
    merge_tensor=_slerp, stats=_slerp_stats, max_models=1, float32_kernel=True,
))
