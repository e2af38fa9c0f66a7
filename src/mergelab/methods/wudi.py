"""WUDI-Merging (Cheng et al., ICML 2025, arXiv 2503.08099; FusionBench ``method/wudi/wudi.py``).

Data-free: per 2-D weight, the merged task vector tau_m starts at sum_t tau_t and is moved by Adam
(lr 1e-5, ``iter_num`` steps, FusionBench config 400) to minimise

    loss(tau_m) = sum_t || (tau_m - tau_t) tau_t^T ||_F^2 / ||tau_t||_F^2

(the interference tau_m causes on the inputs each task vector responds to). Other tensors (biases,
norms, embeddings with a non-2-D shape, names matching ``exclude``) get the mean of the task vectors.
theta = theta0 + tau_m, no extra scale (ALGORITHMS-2.md 15.4). Runs on the engine's device (``--device
cuda``) in float32. ``||X Y^T||_F^2`` is evaluated as ``<X^T X, Y^T Y>`` when the matrix has fewer
columns than rows: the same loss and gradient, with the smaller of the two Gram products.
"""

from __future__ import annotations

import re

from mergelab._lazy import lazy_module
from mergelab.errors import MergelabError
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")


def _check(params: dict, model_params: list[dict], compat: str) -> None:
    try:
        re.compile(params["exclude"])
    except re.error as e:
        raise MergelabError(f"parameter 'exclude': invalid regular expression {params['exclude']!r} ({e})") from None


def wudi_tensor(tvs: "torch.Tensor", iter_num: int = 400, lr: float = 1e-5,
                history: list | None = None) -> "torch.Tensor":
    """WUDI's merged task vector of one 2-D tensor from stacked task vectors ``[T, out, in]``."""
    tvs = tvs.detach().float()
    norms = tvs.reshape(tvs.shape[0], -1).pow(2).sum(-1)
    live = norms > 0                         # a zero task vector contributes 0/0 in the authors' code
    tvs_l, norms_l = tvs[live], norms[live]
    with torch.enable_grad():
        merged = torch.nn.Parameter(tvs.sum(dim=0).clone())
        if tvs_l.shape[0] == 0:
            return merged.detach()
        opt = torch.optim.Adam([merged], lr=lr, weight_decay=0)
        rows_first = tvs.shape[1] <= tvs.shape[2]
        gram_v = None if rows_first else tvs_l.transpose(1, 2) @ tvs_l        # [T, in, in], fixed
        for _ in range(iter_num):
            d = merged.unsqueeze(0) - tvs_l
            if rows_first:
                sq = (d @ tvs_l.transpose(1, 2)).pow(2).sum(dim=(1, 2))
            else:
                sq = ((d.transpose(1, 2) @ d) * gram_v).sum(dim=(1, 2))
            loss = (sq / norms_l).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if history is not None:
                history.append(float(loss.detach()))
    return merged.detach()


def _merge(job: TensorJob) -> "torch.Tensor":
    tvs = job.stacked if job.stacked is not None else torch.stack(job.deltas())
    pattern = job.params["exclude"]
    if tvs.dim() == 3 and not (pattern and re.search(pattern, job.name)):
        tau = wudi_tensor(tvs, job.params["iter_num"], job.params["lr"])
    else:
        tau = tvs.mean(dim=0)
    return job.base + tau


register(Method(
    name="wudi", aliases=("wudi_merging",),
    summary="per 2-D weight, Adam on the merged task vector against each task vector's interference",
    reference="Cheng et al. ICML 2025, arXiv 2503.08099",
    params=(Param("iter_num", int, 400, "Adam steps per 2-D tensor (FusionBench config 400)", low=0, high=100000),
            Param("lr", float, 1e-5, "Adam learning rate", low=0.0),
            Param("exclude", str, "", "regular expression: matching 2-D tensors are averaged instead (empty: none)")),
    merge_tensor=_merge, prepare=_check, chunkable=lambda params, compat: False,
))
