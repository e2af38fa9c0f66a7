"""Karcher mean: the Riemannian (geodesic) mean of the models' directions on the unit sphere, times their mean
norm.

mergekit 0.1.5 ``merge_methods/karcher.py`` (ALGORITHMS-2 §13.4; reference_url arXiv 2603.04972, not read);
both semantics are the same. Every input, the base included (mergekit's base policy IGNORED), has weight 1/N.
```
n_i = ||x_i|| ; u_i = x_i / n_i (0 if n_i = 0) ; valid = {n_i > tol} ; mu = normalise(sum_valid a_i u_i)
repeat max_iter: T = sum_valid a_i theta_i / sin theta_i (u_i - cos theta_i mu)  (theta_i < tol skipped)
                 ||T|| < tol: stop ; mu = cos||T|| mu + sin||T|| T/||T|| ; mu /= ||mu||
out = (sum_i n_i / N) mu
```
Defaults max_iter 10, tol 1e-5. Each tensor is merged whole (iterations over whole vectors).
"""

from __future__ import annotations

from mergelab._lazy import lazy_module
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")


def karcher_mean(tensors: list, alphas: list[float], max_iter: int = 10, tol: float = 1e-5):
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in tensors:
        n = torch.linalg.vector_norm(x.to(dtype))
        norms.append(n)
        units.append(torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for alpha, u in zip(a, us):
        mean += alpha * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = us[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, u in zip(a, us):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (u - dot * mean)
        tnorm = torch.linalg.vector_norm(tangent.to(dtype))
        if tnorm.item() < tol:
            break
        mean = (torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * n for alpha, n in zip(alphas, norms))
    return scale * mean


def _karcher(job: TensorJob) -> torch.Tensor:
    n = len(job.models)
    return karcher_mean(list(job.models), [1.0 / n] * n, job.params["max_iter"], job.params["tol"])


register(Method(
    name="karcher",
    summary="Riemannian (Karcher) mean of the models' directions, scaled by their mean norm",
    reference="mergekit 0.1.5 karcher (arXiv 2603.04972)",
    formula="mu = argmin sum_i d_sphere(mu, x_i/|x_i|)^2 (fixed-point iterations); out = mean|x_i| * mu",
    params=(
        Param("max_iter", int, 10, "fixed-point iterations", low=1),
        Param("tol", float, 1e-5, "stop when the tangent step is shorter", low=0.0),
    ),
    merge_tensor=_karcher, needs_base=False, base_is_input=True, chunkable=lambda params, compat: False,
))
