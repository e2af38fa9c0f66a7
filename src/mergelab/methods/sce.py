"""SCE (Select, Calculate, Erase): keep the entries where the models disagree most, weight each task vector by
its energy, keep sign-agreeing entries.

Wan et al., FuseChat, arXiv 2408.07990; formulas as mergekit 0.1.5 ``merge_methods/sce.py`` (ALGORITHMS-2
§13.6; the paper not re-read, so both semantics use these). No per-model weight.
```
tau_i = theta_i - base ; select_topk < 1: var = Var_i(tau_i) per entry (biased) ; k = int(nnz(var) * select_topk)
    keep the top-k |var| entries in every tau_i (k = 0: none)
E_i = (sign tau_i == sign sum_j tau_j), 0 -> + ; w_i = mean(tau_i^2) / sum_j mean(tau_j^2) (uniform if < 1e-6)
theta = base + sum_i w_i E_i tau_i / max(sum_i w_i E_i, 1e-6)
```
Each tensor is merged whole (the top-k and the energies are over the whole tensor).
"""

from __future__ import annotations

from mergelab._lazy import lazy_module
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")


def sce_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    if density <= 0:
        return torch.zeros_like(tvs[0])
    if density >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[idx] = 1
    return mask


def sce_weight(tvs: torch.Tensor) -> torch.Tensor:
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    if abs(total) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / total


def _sce(job: TensorJob) -> torch.Tensor:
    tvs = torch.stack([m - job.base for m in job.models], dim=0)
    topk = job.params["select_topk"]
    if topk < 1:
        tvs = tvs * sce_mask(tvs, topk).unsqueeze(0)
    sign = tvs.sign()
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = sign == majority
    w = sce_weight(tvs)
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    return job.base + (tvs * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)


register(Method(
    name="sce",
    summary="select high-variance entries, weight task vectors by energy, erase sign conflicts",
    reference="Wan et al. 2024 (FuseChat), arXiv 2408.07990; mergekit 0.1.5 sce",
    formula="tau *= topk(|Var_i tau_i|); w_i ~ mean tau_i^2; base + sum w_i E_i tau_i / sum w_i E_i",
    params=(Param("select_topk", float, 1.0, "fraction of entries (by variance across models) kept",
                  low=0.0, high=1.0),),
    merge_tensor=_sce, chunkable=lambda params, compat: False,
))
