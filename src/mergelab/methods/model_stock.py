"""Model Stock: interpolate base and average of same-task fine-tunes by their angle."""

from __future__ import annotations

from mergelab._lazy import lazy_module
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")
K = lazy_module("mergelab.kernels")


def _model_stock(job: TensorJob) -> torch.Tensor:
    cos = None
    if job.stats is not None:        # whole-tensor angle from the stats pass
        n = len(job.models)
        dots, squares = job.stats[: n * (n - 1) // 2], job.stats[n * (n - 1) // 2:]
        norms = squares.sqrt()
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        cos = torch.stack([(dots[k] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
                           for k, (i, j) in enumerate(pairs)]).mean().to(job.base.dtype)
    return K.model_stock(job.base, job.models, filter_wise=job.params["filter_wise"], cos=cos)


def _model_stock_stats(job: TensorJob) -> torch.Tensor | None:
    """Pairwise dot products and squared norms of the deltas, for the per-tensor angle."""
    if job.params["filter_wise"]:
        return None
    deltas = [d.reshape(-1).double() for d in job.deltas()]
    dots = [torch.dot(a, b) for i, a in enumerate(deltas) for b in deltas[i + 1:]]
    return torch.stack(dots + [torch.dot(d, d) for d in deltas]).cpu()


register(Method(
    name="model_stock",
    summary="interpolate base and average by the fine-tunings' angle (same-task fine-tunes)",
    reference="Jang, Yun & Han ECCV 2024, arXiv 2403.19522",
    params=(Param("filter_wise", bool, False, "one interpolation ratio per row instead of per tensor"),),
    merge_tensor=_model_stock, min_models=2, stats=_model_stock_stats,
))
