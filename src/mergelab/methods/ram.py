"""RAM (Reinforced Agent Merging) and RAM+ (tensor-local): add task-vector entries that one model changed,
average those that several changed.

mergekit 0.1.5 ``merge_methods/ram.py`` (ALGORITHMS-2 §13.9; reference_url arXiv 2601.13572, not read); both
semantics are the same.
```
tau_i = theta_i - base ; nz_i = |tau_i| > epsilon ; c = sum_i nz_i ; unique = (c == 1) ; overlap = (c > 1)
ram:        theta = base + sum_i tau_i nz_i (unique + overlap / max(c, 1))
ramplus_tl: rho_i = #(nz_i & overlap) / max(#(nz_i & unique), epsilon) ; lambda_i = 1 + r clamp(rho_i, 0, alpha)
            theta = base + sum_i tau_i nz_i (lambda_i unique + overlap / max(c, 1))
```
Defaults epsilon 1e-5; ramplus_tl r 0.1, alpha 0.2. ``ram`` is element-wise (merged in blocks of rows);
``ramplus_tl`` counts over the whole tensor (merged whole); its float32 ``lambda_i`` promotes the result, so
under mergekit semantics a half-precision merge without ``out_dtype`` is written in float32, as mergekit does.
"""

from __future__ import annotations

from mergelab._lazy import lazy_module
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")


def _prepare(job: TensorJob):
    tv = torch.stack([m - job.base for m in job.models], dim=0).view(len(job.models), -1)
    nz = tv.abs() > job.params["epsilon"]
    counts = nz.sum(dim=0, keepdim=True)
    return tv, nz, counts, counts > 1, counts == 1


def _ram(job: TensorJob) -> torch.Tensor:
    tv, nz, counts, overlap, unique = _prepare(job)
    z = tv * nz
    merged = ((z * unique) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return job.base + merged.reshape_as(job.base)


def _ramplus(job: TensorJob) -> torch.Tensor:
    tv, nz, counts, overlap, unique = _prepare(job)
    eps = job.params["epsilon"]
    rho = (nz & overlap).sum(dim=1) / (nz & unique).sum(dim=1).clamp(min=eps)
    lam = 1 + job.params["r"] * rho.clamp(min=0, max=job.params["alpha"])
    z = tv * nz
    merged = ((z * unique * lam.unsqueeze(-1)) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return job.base + merged.reshape_as(job.base)


EPSILON = Param("epsilon", float, 1e-5, "task-vector entries at most this large count as unchanged", low=0.0)
register(Method(
    name="ram",
    summary="sum task-vector entries changed by one model, average those changed by several",
    reference="mergekit 0.1.5 ram (arXiv 2601.13572)",
    formula="base + sum_i tau_i [|tau_i| > eps] (unique + overlap / count)",
    params=(EPSILON,), merge_tensor=_ram,
))
register(Method(
    name="ramplus_tl",
    summary="RAM with unique entries boosted by each model's overlap ratio (tensor-local)",
    reference="mergekit 0.1.5 ramplus_tl (arXiv 2601.13572)",
    formula="lambda_i = 1 + r clamp(shared_i/unique_i, 0, alpha); "
            "base + sum_i tau_i nz_i (lambda_i unique + overlap/c)",
    params=(Param("r", float, 0.1, "boost scale", low=0.0), Param("alpha", float, 0.2, "cap of the overlap ratio",
                                                                     low=0.0), EPSILON),
    merge_tensor=_ramplus, chunkable=lambda params, compat: False, float32_result=True,
))
