"""Registry entries for the SVD-based data-free merges: ``tsv``, ``iso_c``, ``iso_cts``.

As in the authors' code, the SVD recipe applies to 2-D weight matrices only; every other tensor (biases,
LayerNorm, and any name matching ``exclude``, by default CLIP's ``text_projection``) gets the mean of
the task vectors. The result is ``base + alpha * tau_merged``. Each tensor is an independent job, so
the engine streams these merges layer by layer like every other method.
"""

from __future__ import annotations

import re
from typing import Callable

from mergelab._lazy import lazy_module
from mergelab.errors import MergelabError
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")
SK = lazy_module("mergelab.kernels.svd")

_ALPHA = Param("alpha", float, 1.0, "scale of the merged task vector (pick it on validation data)",
               aliases=("lambda", "scaling_factor"))
_SVD = Param("svd", str, "auto", "SVD backend: auto (randomized only where exact), full, randomized",
             choices=("auto", "full", "randomized"))   # kernels.svd.SVD_MODES, without importing torch
_EXCLUDE = Param("exclude", str, "text_projection",
                 "regular expression: matching 2-D tensors are averaged instead (empty: none)")


def _check_exclude(params: dict, model_params: list[dict], compat: str) -> None:
    try:
        re.compile(params["exclude"])
    except re.error as e:
        raise MergelabError(f"parameter 'exclude': invalid regular expression {params['exclude']!r} ({e})") from None


def _svd_tensor(kernel: Callable[[list[torch.Tensor], TensorJob], torch.Tensor]) -> Callable[[TensorJob], torch.Tensor]:
    def merge_tensor(job: TensorJob) -> torch.Tensor:
        deltas = job.deltas()
        if not any(bool(d.any()) for d in deltas):
            return job.base.clone()
        pattern = job.params["exclude"]
        if job.base.dim() == 2 and not (pattern and re.search(pattern, job.name)):
            tau = kernel(deltas, job)
        else:
            tau = torch.stack(deltas).mean(dim=0)
        return job.base + job.params["alpha"] * tau
    return merge_tensor


# one SVD per weight matrix: the engine must not split matrices into blocks of rows
_WHOLE_MATRICES = lambda params, compat: False  # noqa: E731


register(Method(
    name="tsv", aliases=("tsv_m", "task_singular_vectors"),
    summary="per task top-(r/T) singular vectors, Procrustes-orthogonalised across tasks, summed",
    reference="Gargiulo et al. CVPR 2025, arXiv 2412.00081",
    params=(_ALPHA, _SVD, _EXCLUDE),
    merge_tensor=_svd_tensor(lambda d, job: SK.tsv_merge(d, job.params["svd"], job.generator(0))),
    prepare=_check_exclude, chunkable=_WHOLE_MATRICES,
))

register(Method(
    name="iso_c", aliases=("isotropic",),
    summary="sum of task matrices with a flattened (isotropic) singular spectrum",
    reference="Marczak et al. ICML 2025, arXiv 2502.04959",
    params=(_ALPHA, _SVD, _EXCLUDE),
    merge_tensor=_svd_tensor(lambda d, job: SK.iso_c(d, job.params["svd"], job.generator(0))),
    prepare=_check_exclude, chunkable=_WHOLE_MATRICES,
))

register(Method(
    name="iso_cts",
    summary="Iso-C on a common subspace plus task-specific subspaces of each task's residual",
    reference="Marczak et al. ICML 2025, arXiv 2502.04959",
    params=(_ALPHA,
            Param("common_space_fraction", float, 0.8, "share of the rank given to the common subspace",
                  low=0.0, high=1.0),
            _SVD, _EXCLUDE),
    merge_tensor=_svd_tensor(lambda d, job: SK.iso_cts(d, job.params["common_space_fraction"],
                                                       job.params["svd"], job.generator(0))),
    prepare=_check_exclude, chunkable=_WHOLE_MATRICES,
))
