"""TIES-Merging: trim each task vector to its top-k magnitudes, elect signs by mass, disjoint merge."""

from __future__ import annotations

from typing import Callable

from mergelab._lazy import lazy_module
from mergelab.methods.common import (DENSITY_HELP, MERGE_MODE, check_inputs_through, consensus_merge, exact_ties_param,
                                     lambda_param, normalize_param, weight_param)
from mergelab.methods.registry import Method, Param, TensorJob, register

torch = lazy_module("torch")
K = lazy_module("mergelab.kernels")
MS = lazy_module("mergelab.methods.mergekit_sparsify")


def _ties_trimmer(job: TensorJob) -> Callable[[torch.Tensor, dict, int], torch.Tensor]:
    """TIES trim of one (weighted) delta with the threshold of its scope (model, tensor or row)."""
    scope = job.params.get("trim_scope", "per_tensor" if job.compat == "mergekit" else "global")
    exact = job.compat == "mergekit" and job.params.get("exact_ties", True)

    def trim(delta: torch.Tensor, p: dict, i: int) -> torch.Tensor:
        density = p["density"]
        if scope == "per_row":
            return K.ties_trim_rows(delta, density)
        if density >= 1 or delta.numel() == 0:
            return delta
        if density <= 0:
            return torch.zeros_like(delta)
        threshold = job.thresholds[i] if scope == "global" else job.selections[i][0]
        counts = job.selection_counts[i] if job.selection_counts and scope == "per_tensor" else None
        if exact and scope == "per_tensor" and job.rows is None and threshold and \
                MS.straddles(delta, threshold, None, max(1, int(density * delta.numel())), counts):
            return MS.magnitude(delta, density)     # ties at the cut: mergekit's own choice among them
        return K.zero_below(delta, threshold)   # in place: delta is the job's own row
    return trim


def _ties(job: TensorJob) -> torch.Tensor:
    if job.check_inputs is not None and any(p["density"] <= 0 for p in job.model_params):
        job.check_inputs()          # a task vector trimmed to nothing does not reach the result
    return check_inputs_through(job, consensus_merge(job, _ties_trimmer(job)))


def _ties_checks_inputs(params: dict, compat: str) -> bool:
    """mergekit's per-tensor trim keeps NaN (``|NaN| < t`` is false; its sort puts NaN first) and Inf (the
    largest magnitude), so a non-finite input reaches the result unless its density is 0 (checked)."""
    return compat == "mergekit" and params.get("trim_scope", "per_tensor") == "per_tensor"


def _ties_global_trim(params: dict, model_params: list[dict], compat: str) -> list[float] | None:
    if params.get("trim_scope") != "global":
        return None
    return [p["density"] for p in model_params]


def _ties_select(params: dict, model_params: list[dict], compat: str, n: int) -> list[list[int | None]] | None:
    """Per-tensor trim ranks: TIES code (kthvalue of n - int(n*d)) or mergekit (exactly max(1, int(d*n)) kept)."""
    if params.get("trim_scope", "per_tensor" if compat == "mergekit" else "global") != "per_tensor":
        return None
    ranks = []
    for p in model_params:
        d = p["density"]
        if n == 0 or d >= 1 or d <= 0:
            ranks.append([None])
        elif compat == "mergekit":
            ranks.append([n - max(1, int(d * n)) + 1])
        else:
            ranks.append([K.keep_count(n, d)])
    return ranks


register(Method(
    name="ties",
    summary="trim to top-k magnitudes, elect sign by mass, disjoint merge",
    reference="Yadav et al. NeurIPS 2023, arXiv 2306.01708",
    params=(
        weight_param(),
        Param("density", float, 0.2, DENSITY_HELP + " (the paper's k)", per_model=True, low=0.0, high=1.0,
              mergekit_default=1.0, aliases=("k",)),
        lambda_param(1.0),
        MERGE_MODE,
        Param("trim_scope", str, "global", "top-k over the whole model (paper), per tensor (mergekit) or per row",
              choices=("global", "per_tensor", "per_row"), mergekit_default="per_tensor"),
        normalize_param(True),
        exact_ties_param(),
    ),
    task_vectors_only=True, merge_tensor=_ties, global_trim=_ties_global_trim, select=_ties_select,
    checks_inputs=_ties_checks_inputs,
))
