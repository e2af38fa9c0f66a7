"""Model Breadcrumbs: drop the outliers and the small deltas, keep the band between (and its TIES variant)."""

from __future__ import annotations

from typing import Callable

from mergelab._lazy import lazy_module
from mergelab.errors import MergelabError
from mergelab.methods.common import (MERGE_MODE, check_inputs_through, consensus_merge, exact_ties_param, lambda_param,
                                     normalize_param, sum_merge, weight_param)
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")
K = lazy_module("mergelab.kernels")
MS = lazy_module("mergelab.methods.mergekit_sparsify")


def _breadcrumbs_sparsify(job: TensorJob) -> Callable[[torch.Tensor, dict, int], torch.Tensor]:
    if job.compat == "mergekit":
        exact = job.params.get("exact_ties", True)

        def band(delta: torch.Tensor, p: dict, i: int) -> torch.Tensor:
            """mergekit's magnitude_outliers with the tensor's band limits from the engine."""
            if p["keep"] >= 1:
                return delta
            if int(p["keep"] * job.numel) <= 0:
                return torch.zeros_like(delta)
            low, high = job.selections[i]
            counts = job.selection_counts[i] if job.selection_counts else None
            if exact and job.rows is None and MS.straddles(delta, low, high, int(p["keep"] * delta.numel()), counts):
                return MS.magnitude_outliers(delta, p["keep"], p["top_remove"])   # ties at a cut: as mergekit
            return K.keep_band(delta, low, high)    # in place: delta is the job's own row
        return band
    return lambda d, p, i: K.breadcrumbs_rows(d, p["keep"], p["top_remove"])


def _breadcrumbs(job: TensorJob) -> torch.Tensor:
    _check_what_the_band_drops(job)
    return check_inputs_through(job, sum_merge(job, _breadcrumbs_sparsify(job)))


def _breadcrumbs_ties(job: TensorJob) -> torch.Tensor:
    _check_what_the_band_drops(job)
    return check_inputs_through(job, consensus_merge(job, _breadcrumbs_sparsify(job)))


def _breadcrumbs_checks_inputs(params: dict, compat: str) -> bool:
    """mergekit's band keeps NaN (neither below nor above a limit; its sort puts NaN in the dropped top,
    and ``delta * 0`` is NaN) and turns an Inf above the band into NaN (``Inf - Inf``): a non-finite input
    reaches the result unless the band keeps no entry of its tensor (checked)."""
    return compat == "mergekit"


def _check_what_the_band_drops(job: TensorJob) -> None:
    if job.check_inputs is not None and any(p["keep"] < 1 and int(p["keep"] * job.numel) <= 0
                                            for p in job.model_params):
        job.check_inputs()          # a task vector zeroed whole does not reach the result


def _breadcrumbs_select(params: dict, model_params: list[dict], compat: str,
                        n: int) -> list[list[int | None]] | None:
    """mergekit's band over the whole tensor: ranks of the smallest kept and largest kept magnitude."""
    if compat != "mergekit":
        return None
    ranks = []
    for p in model_params:
        target = int(p["keep"] * n)
        if p["keep"] >= 1 or target <= 0:
            ranks.append([None, None])
            continue
        n_bot = max(0, n - target - int(p["top_remove"] * n))
        ranks.append([n_bot + 1 if n_bot > 0 else None, n_bot + target if n_bot + target < n else None])
    return ranks


def _check_band(params: dict, model_params: list[dict], compat: str) -> None:
    """Paper semantics: the kept band must fit in a row (mergekit shrinks the outlier band instead)."""
    if compat == "mergekit":
        return
    for p in model_params:
        if p["keep"] + p["top_remove"] > 1 + 1e-9:
            raise MergelabError(f"breadcrumbs: keep ({p['keep']}) + top_remove ({p['top_remove']}) "
                                "must not exceed 1")


def _breadcrumbs_params(merge_mode: bool) -> tuple[Param, ...]:
    params = (
        weight_param(),
        Param("keep", float, 0.1, "fraction kept per row after removing the outliers (paper beta)",
              per_model=True, low=0.0, high=1.0, mergekit_default=1.0, aliases=("density",)),
        Param("top_remove", float, 0.01, "fraction of largest magnitudes removed per row (paper gamma)",
              per_model=True, low=0.0, high=1.0, aliases=("gamma",)),
        lambda_param(1.0),
        normalize_param(False),
        exact_ties_param(),
    )
    return params + ((MERGE_MODE,) if merge_mode else ())


register(Method(
    name="breadcrumbs",
    summary="per row, drop the largest outliers and the small deltas, add the rest",
    reference="Davari & Belilovsky ECCV 2024, arXiv 2312.06795",
    params=_breadcrumbs_params(False), task_vectors_only=True, merge_tensor=_breadcrumbs, prepare=_check_band,
    select=_breadcrumbs_select, checks_inputs=_breadcrumbs_checks_inputs,
))
register(Method(
    name="breadcrumbs_ties",
    summary="breadcrumbs masks, then TIES sign election and disjoint merge",
    reference="mergekit; Davari & Belilovsky 2024 + Yadav et al. 2023",
    params=_breadcrumbs_params(True), task_vectors_only=True, merge_tensor=_breadcrumbs_ties, prepare=_check_band,
    select=_breadcrumbs_select, checks_inputs=_breadcrumbs_checks_inputs,
))
