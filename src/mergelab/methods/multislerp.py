"""Multi-SLERP: a one-shot barycentre of several models (or task vectors) on the hypersphere.

mergekit 0.1.5 ``merge_methods/multislerp.py`` (ALGORITHMS-2 §13.3; goddard.blog "multislerp"); both
semantics are the same.
```
X_i = flatten(m_i [- base]) ; w = w / sum w (normalize_weights) ; n_i = ||X_i|| ; U_i = X_i / (n_i + eps)
m = sum w_i U_i ; ||m|| < eps: two models -> w_0 X_0 + w_1 X_1, else error
m /= ||m|| ; T = sum w_i (U_i - <U_i, m> m) ; tau = ||T|| + eps ; r = m cos tau + T sin(tau) / tau
out = r * sum w_i n_i (+ base)
```
Each tensor is merged whole (its norms and mean direction need every entry before any output).
"""

from __future__ import annotations

from mergelab._lazy import lazy_module
from mergelab.errors import MergelabError
from mergelab.methods.common import weight_param
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")


def _multislerp(job: TensorJob) -> torch.Tensor:
    eps = job.params["eps"]
    base = job.base
    if len(job.models) == 1:
        return job.models[0]
    tensors = torch.stack(job.models, dim=0)
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    weights = torch.tensor(job.weights(), dtype=tensors.dtype, device=tensors.device)
    if job.params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] == 2:
            res = (tensors[0] * weights[0] + tensors[1] * weights[1]).view(tensors.shape[1:])
            return res if base is None else res + base
        raise MergelabError(f"{job.name}: multislerp: the weighted mean of the unit vectors is zero "
                            "(antipodal inputs with balancing weights); change the weights")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    tnorm = torch.norm(tangent) + eps
    result = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(tensors.shape[1:])
    return result if base is None else result + base


register(Method(
    name="multislerp",
    summary="spherical barycentre of several models (task vectors if a base is given), one tangent step",
    reference="mergekit 0.1.5 multislerp (goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
    formula="m = normalise(sum w_i u_i); r = exp_m(sum w_i (u_i - <u_i,m> m)); out = r * sum w_i ||x_i|| (+ base)",
    params=(
        weight_param(),
        Param("normalize_weights", bool, True, "divide the weights by their sum"),
        Param("eps", float, 1e-8, "added to norms before dividing", low=0.0),
    ),
    merge_tensor=_multislerp, needs_base=False, optional_base=True,
    chunkable=lambda params, compat: False,
))
