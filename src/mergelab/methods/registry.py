"""Registry of data-free merge methods.

Each method declares its parameters (type, default, range, whether it may be set per model) so that a
recipe is validated before any tensor is read, and a per-tensor function built from
``mergelab.kernels``. Two semantics are available: ``paper`` (default: what the method's authors'
code does) and ``mergekit`` (what mergekit 0.1.5 does, for users switching from it).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mergelab import kernels as K
from mergelab.errors import MergelabError

COMPAT_MODES = ("paper", "mergekit")
_SAME = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    default: Any
    help: str
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    mergekit_default: Any = _SAME
    aliases: tuple[str, ...] = ()
    modes: tuple[str, ...] = COMPAT_MODES

    def default_for(self, compat: str) -> Any:
        return self.default if self.mergekit_default is _SAME or compat != "mergekit" else self.mergekit_default

    def check(self, value: Any, where: str) -> Any:
        """Coerce and range-check one value; the error names the recipe location."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergelabError(f"{where}: '{self.name}' must be true or false, got {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MergelabError(f"{where}: '{self.name}' must be a number, got {value!r}")
            if self.kind is int and float(value) != int(value):
                raise MergelabError(f"{where}: '{self.name}' must be an integer, got {value!r}")
            value = self.kind(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise MergelabError(f"{where}: '{self.name}' must be finite, got {value!r}")
            if self.low is not None and value < self.low or self.high is not None and value > self.high:
                raise MergelabError(f"{where}: '{self.name}' must be in [{self.low}, {self.high}], got {value!r}")
            return value
        value = str(value)
        if self.choices and value not in self.choices:
            raise MergelabError(f"{where}: '{self.name}' must be one of {', '.join(self.choices)}, got {value!r}")
        return value


@dataclass
class TensorJob:
    """Everything one per-tensor merge needs: float32 inputs and resolved parameters."""
    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    params: dict[str, Any]                 # global parameters
    model_params: list[dict[str, Any]]     # per model, with global values and defaults filled in
    compat: str = "paper"
    thresholds: list[float | None] | None = None   # whole-model trim thresholds per model (ties global)
    # per-tensor magnitude thresholds per model, computed by the engine from ``Method.select`` over the
    # WHOLE tensor, so that a block of rows can be merged on its own
    selections: list[list[float | None]] | None = None
    rows: tuple[int, int] | None = None            # the block of rows of the tensor this job holds
    numel: int = 0                                 # elements of the whole tensor
    stats: torch.Tensor | None = None              # ``Method.stats`` summed over the whole tensor
    # ``[T, *shape]`` task vectors ``models[i] - base`` already computed by the engine (owned by the job:
    # kernels may overwrite them), or None
    stacked: torch.Tensor | None = None

    def deltas(self) -> list[torch.Tensor]:
        return [m - self.base for m in self.models]

    def weights(self) -> list[float]:
        return [p.get("weight", 1.0) for p in self.model_params]

    def generator(self, index: int) -> torch.Generator:
        """Per (seed, tensor, model) generator: DARE masks do not depend on thread order."""
        seed = int(self.params.get("seed", 0))
        block = self.rows[0] if self.rows else 0
        mixed = (seed * 1_000_003 + zlib.crc32(self.name.encode()) * 31 + index + block * 7919) % (2**63)
        return torch.Generator().manual_seed(mixed)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    reference: str
    params: tuple[Param, ...]
    merge_tensor: Callable[[TensorJob], torch.Tensor]
    needs_base: bool = True
    min_models: int = 1
    aliases: tuple[str, ...] = ()
    # densities per model for a whole-model trim, or None when no global pre-pass is needed
    global_trim: Callable[[dict, list[dict], str], list[float] | None] | None = None
    prepare: Callable[[dict, list[dict], str], None] | None = None
    # per-tensor selections: for a tensor of n elements, the ranks k (1-based, k-th smallest magnitude
    # of each model's delta; None = not needed) whose values the kernel needs as thresholds
    select: Callable[[dict, list[dict], str, int], list[list[int | None]] | None] | None = None
    # rank |weight * delta| (the paper semantics, which weight task vectors first) or |delta| (mergekit)
    select_weighted: Callable[[str], bool] = lambda compat: compat != "mergekit"
    # False when a kernel needs whole-tensor statistics the engine does not provide (merged unsplit)
    chunkable: Callable[[dict, str], bool] = lambda params, compat: True
    # whole-tensor sums a kernel needs (norms, dot products): partial sums of one block of rows as a
    # float64 vector, or None when these parameters need none; for a tensor merged in blocks the engine
    # adds them over all blocks in a first pass and hands the total to the merge pass as
    # ``TensorJob.stats`` (a tensor merged whole gets None: its kernel computes them itself)
    stats: Callable[[TensorJob], torch.Tensor | None] | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name or name in p.aliases:
                return p
        return None

    def params_for(self, compat: str) -> list[Param]:
        return [p for p in self.params if compat in p.modes]


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    for key in (method.name, *method.aliases):
        REGISTRY[key] = method
    return method


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted({m.name for m in REGISTRY.values()}))
        raise MergelabError(f"unknown merge method {name!r}; available: {known}") from None


def list_methods() -> list[Method]:
    seen: dict[str, Method] = {}
    for m in REGISTRY.values():
        seen.setdefault(m.name, m)
    return list(seen.values())


def resolve_params(method: Method, params: dict | None, model_params: list[dict | None], compat: str,
                   where: str = "recipe") -> tuple[dict, list[dict]]:
    """Validate global and per-model parameters against the registry and fill in defaults."""
    if compat not in COMPAT_MODES:
        raise MergelabError(f"{where}: compat must be one of {', '.join(COMPAT_MODES)}, got {compat!r}")
    allowed = method.params_for(compat)
    n = len(model_params)
    if n < method.min_models:
        raise MergelabError(f"{where}: method {method.name!r} needs at least {method.min_models} models "
                            f"besides the base, got {n}")

    def canon(raw: dict | None, scope: str, per_model: bool) -> dict:
        out = {}
        for key, value in (raw or {}).items():
            p = method.param(key)
            if p is None or p not in allowed:
                names = ", ".join(p.name for p in allowed) or "none"
                extra = " with --compat mergekit" if p is not None else ""
                raise MergelabError(f"{scope}: unknown parameter {key!r} for method {method.name!r}{extra} "
                                    f"(parameters: {names})")
            if per_model and not p.per_model:
                raise MergelabError(f"{scope}: parameter {p.name!r} of {method.name!r} is global, "
                                    "set it under the top-level 'parameters'")
            if p.name in out:
                raise MergelabError(f"{scope}: parameter {p.name!r} given twice (as {key!r})")
            out[p.name] = p.check(value, scope)
        return out

    glob = canon(params, f"{where}: parameters", per_model=False)
    per = [canon(mp, f"{where}: models[{i}].parameters", per_model=True) for i, mp in enumerate(model_params)]
    resolved_global = {p.name: glob.get(p.name, p.default_for(compat)) for p in allowed}
    resolved_models = []
    for mp in per:
        resolved_models.append({p.name: mp.get(p.name, resolved_global[p.name])
                                for p in allowed if p.per_model})
    if method.prepare is not None:
        method.prepare(resolved_global, resolved_models, compat)
    return resolved_global, resolved_models


# ---------------------------------------------------------------- shared parameters and helpers

def _weight():
    return Param("weight", float, 1.0, "scale of this model's task vector (or its share in the average)",
                 per_model=True)


def _lambda(default: float, mergekit_default: float = 1.0):
    return Param("lambda", float, default, "scale of the merged task vector", mergekit_default=mergekit_default)


def _normalize(default: bool):
    return Param("normalize", bool, default, "divide by the sum of weights (mergekit)", modes=("mergekit",))


_DENSITY_HELP = "fraction of each task vector kept"


def _stacked_deltas(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor],
                    weighted: bool = True) -> torch.Tensor:
    """``[T, *shape]`` of ``weight * sparsify(delta)`` (weights applied first: what the paper's trim sees)."""
    out = job.stacked if job.stacked is not None else K.task_vectors(job.base, job.models)
    for i, p in enumerate(job.model_params):
        row = out[i]
        w = p.get("weight", 1.0)
        if weighted and w != 1.0:
            row.mul_(w)
        result = sparsify(row, p, i)
        if result is not row:
            row.copy_(result)
    return out


def _stack_weighted(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor]) -> torch.Tensor:
    return _stacked_deltas(job, sparsify, weighted=True)


def _mergekit_mix(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor],
                  consensus: bool) -> torch.Tensor:
    """mergekit 0.1.5 ``GeneralizedTaskArithmeticMerge.merge_group`` on float32 tensors.

    Sparsify each delta, multiply by its weight, then (with consensus) keep entries whose sign equals
    the sign of the weighted sum (0 -> +1); mix = sum, divided by the sum of the kept weights if
    ``normalize``; times ``lambda``.
    """
    deltas = _stacked_deltas(job, sparsify, weighted=False)
    weights = torch.tensor(job.weights(), dtype=deltas.dtype, device=deltas.device)
    if bool((weights != 1).any()):
        deltas.mul_(weights.reshape(-1, *([1] * (deltas.dim() - 1))))
    if consensus:
        sign = K.elect_sign(deltas, zero="positive")
        agreeing = deltas.mul_(sign).clamp_(min=0)          # |w delta| where signs agree, else 0
        mixed = agreeing.sum(dim=0).mul_(sign)
        mask = agreeing.sign_()                              # 1 where kept, 0 elsewhere
        divisor = torch.tensordot(weights, mask, dims=1)
        if bool((weights > 0).all()):
            # the divisor is 0 exactly where nothing is kept: make it 1 there without a boolean mask
            divisor.add_(mask.amax(dim=0).sub_(1), alpha=-1.0)
        else:
            divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if job.params["normalize"]:
        mixed = mixed / divisor
    if job.params["lambda"] != 1:
        mixed = mixed * job.params["lambda"]
    return job.base + mixed


def _sum_merge(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor]) -> torch.Tensor:
    """Sparsified task vectors added up (breadcrumbs, DARE): base + lambda * sum."""
    if job.compat == "mergekit":
        return _mergekit_mix(job, sparsify, consensus=False)
    return job.base + job.params["lambda"] * _stack_weighted(job, sparsify).sum(dim=0)


def _consensus_merge(job: TensorJob, sparsify: Callable[[torch.Tensor, dict, int], torch.Tensor]) -> torch.Tensor:
    """Sparsified task vectors, TIES sign election by mass and disjoint merge (TIES, *_ties)."""
    if job.compat == "mergekit":
        return _mergekit_mix(job, sparsify, consensus=True)
    stacked = _stack_weighted(job, sparsify)
    merged = K.disjoint_merge(stacked, K.elect_sign(stacked), job.params["merge"])
    return job.base + job.params["lambda"] * merged


# ---------------------------------------------------------------- average / linear

def _average(job: TensorJob) -> torch.Tensor:
    weights = job.weights()
    total = torch.zeros_like(job.models[0])
    for w, m in zip(weights, job.models):
        total.add_(m, alpha=w)
    normalize = job.params.get("normalize", True)
    if normalize:
        s = sum(weights)
        if abs(s) < 1e-12:
            raise MergelabError(f"{job.name}: the model weights sum to zero; cannot average")
        total.div_(s)
    return total


register(Method(
    name="average", aliases=("linear",),
    summary="weighted average of the models' weights (model soup)",
    reference="Wortsman et al. 2022, arXiv 2203.05482",
    params=(_weight(), Param("normalize", bool, True, "divide by the sum of weights")),
    merge_tensor=_average, needs_base=False,
))


# ---------------------------------------------------------------- task arithmetic

def _task_arithmetic(job: TensorJob) -> torch.Tensor:
    return _sum_merge(job, lambda delta, p, i: delta)


register(Method(
    name="task_arithmetic",
    summary="base + lambda * sum of task vectors",
    reference="Ilharco et al. ICLR 2023, arXiv 2212.04089",
    params=(_weight(), _lambda(0.3), _normalize(False)),
    merge_tensor=_task_arithmetic,
))


# ---------------------------------------------------------------- TIES

def _ties_trimmer(job: TensorJob) -> Callable[[torch.Tensor, dict, int], torch.Tensor]:
    """TIES trim of one (weighted) delta with the threshold of its scope (model, tensor or row)."""
    scope = "per_tensor" if job.compat == "mergekit" else job.params.get("trim_scope", "global")

    def trim(delta: torch.Tensor, p: dict, i: int) -> torch.Tensor:
        density = p["density"]
        if scope == "per_row":
            return K.ties_trim_rows(delta, density)
        if density >= 1 or delta.numel() == 0:
            return delta
        if density <= 0:
            return torch.zeros_like(delta)
        threshold = job.thresholds[i] if scope == "global" else job.selections[i][0]
        return K.zero_below(delta, threshold)   # in place: delta is the job's own row
    return trim


def _ties(job: TensorJob) -> torch.Tensor:
    return _consensus_merge(job, _ties_trimmer(job))


def _ties_global_trim(params: dict, model_params: list[dict], compat: str) -> list[float] | None:
    if compat == "mergekit" or params.get("trim_scope") != "global":
        return None
    return [p["density"] for p in model_params]


def _ties_select(params: dict, model_params: list[dict], compat: str, n: int) -> list[list[int | None]] | None:
    """Per-tensor trim ranks: TIES code (kthvalue of n - int(n*d)) or mergekit (exactly max(1, int(d*n)) kept)."""
    if compat != "mergekit" and params.get("trim_scope") != "per_tensor":
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


_MERGE_MODE = Param("merge", str, "mean", "disjoint merge: mean (TIES paper), sum (FusionBench), max",
                    choices=("mean", "sum", "max"), modes=("paper",))

register(Method(
    name="ties",
    summary="trim to top-k magnitudes, elect sign by mass, disjoint merge",
    reference="Yadav et al. NeurIPS 2023, arXiv 2306.01708",
    params=(
        _weight(),
        Param("density", float, 0.2, _DENSITY_HELP + " (the paper's k)", per_model=True, low=0.0, high=1.0,
              mergekit_default=1.0, aliases=("k",)),
        _lambda(1.0),
        _MERGE_MODE,
        Param("trim_scope", str, "global", "top-k over the whole model (paper), per tensor (mergekit) or per row",
              choices=("global", "per_tensor", "per_row"), modes=("paper",)),
        _normalize(True),
    ),
    merge_tensor=_ties, global_trim=_ties_global_trim, select=_ties_select,
))


# ---------------------------------------------------------------- Breadcrumbs

def _breadcrumbs_sparsify(job: TensorJob) -> Callable[[torch.Tensor, dict, int], torch.Tensor]:
    if job.compat == "mergekit":
        def band(delta: torch.Tensor, p: dict, i: int) -> torch.Tensor:
            """mergekit's magnitude_outliers with the tensor's band limits from the engine."""
            if p["keep"] >= 1:
                return delta
            if int(p["keep"] * job.numel) <= 0:
                return torch.zeros_like(delta)
            low, high = job.selections[i]
            return K.keep_band(delta, low, high)    # in place: delta is the job's own row
        return band
    return lambda d, p, i: K.breadcrumbs_rows(d, p["keep"], p["top_remove"])


def _breadcrumbs(job: TensorJob) -> torch.Tensor:
    return _sum_merge(job, _breadcrumbs_sparsify(job))


def _breadcrumbs_ties(job: TensorJob) -> torch.Tensor:
    return _consensus_merge(job, _breadcrumbs_sparsify(job))


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
        _weight(),
        Param("keep", float, 0.1, "fraction kept per row after removing the outliers (paper beta)",
              per_model=True, low=0.0, high=1.0, mergekit_default=1.0, aliases=("density",)),
        Param("top_remove", float, 0.01, "fraction of largest magnitudes removed per row (paper gamma)",
              per_model=True, low=0.0, high=1.0, aliases=("gamma",)),
        _lambda(1.0),
        _normalize(False),
    )
    return params + ((_MERGE_MODE,) if merge_mode else ())


register(Method(
    name="breadcrumbs",
    summary="per row, drop the largest outliers and the small deltas, add the rest",
    reference="Davari & Belilovsky ECCV 2024, arXiv 2312.06795",
    params=_breadcrumbs_params(False), merge_tensor=_breadcrumbs, prepare=_check_band, select=_breadcrumbs_select,
))
register(Method(
    name="breadcrumbs_ties",
    summary="breadcrumbs masks, then TIES sign election and disjoint merge",
    reference="mergekit; Davari & Belilovsky 2024 + Yadav et al. 2023",
    params=_breadcrumbs_params(True), merge_tensor=_breadcrumbs_ties, prepare=_check_band,
    select=_breadcrumbs_select,
))


# ---------------------------------------------------------------- DARE

def _dare_sparsify(job: TensorJob) -> Callable[[torch.Tensor, dict, int], torch.Tensor]:
    l1 = job.compat == "mergekit" and job.params["rescale"]

    def drop(delta: torch.Tensor, p: dict, i: int) -> torch.Tensor:
        if l1:   # mergekit: match the L1 norm of the whole tensor's delta (blocks: sums from the stats pass)
            kept = K.dare(delta.cpu(), 1.0 - p["density"], job.generator(i), rescale="none")
            if job.stats is not None:
                before, after = float(job.stats[2 * i]), float(job.stats[2 * i + 1])
            else:
                before = float(delta.abs().sum(dtype=torch.float64))
                after = float(kept.abs().sum(dtype=torch.float64))
            if 0 < p["density"] < 1 and before >= 1e-7 and after >= 1e-7:
                kept.mul_(before / after)
        else:
            kept = K.dare(delta.cpu(), 1.0 - p["density"], job.generator(i), rescale="inverse")
        return kept.to(delta.device)
    return drop


def _dare_stats(job: TensorJob) -> torch.Tensor | None:
    """L1 norms of each delta before and after the drop (same seeded masks as the merge pass)."""
    if job.compat != "mergekit" or not job.params["rescale"]:
        return None
    sums = []
    for i, (delta, p) in enumerate(zip(job.deltas(), job.model_params)):
        kept = K.dare(delta.cpu(), 1.0 - p["density"], job.generator(i), rescale="none")
        sums += [delta.abs().sum(dtype=torch.float64).cpu(), kept.abs().sum(dtype=torch.float64)]
    return torch.stack(sums)


def _dare_linear(job: TensorJob) -> torch.Tensor:
    return _sum_merge(job, _dare_sparsify(job))


def _dare_ties(job: TensorJob) -> torch.Tensor:
    return _consensus_merge(job, _dare_sparsify(job))


def _dare_params(merge_mode: bool) -> tuple[Param, ...]:
    params = (
        _weight(),
        Param("density", float, 0.9, "fraction kept = 1 - drop rate p", per_model=True, low=0.0, high=1.0,
              mergekit_default=1.0),
        _lambda(1.0),
        Param("seed", int, 0, "seed of the random drop masks (fixed per tensor and model)"),
        Param("rescale", bool, True, "rescale kept entries to the L1 norm (mergekit)", modes=("mergekit",)),
        _normalize(False),
    )
    return params + ((_MERGE_MODE,) if merge_mode else ())


register(Method(
    name="dare_linear", aliases=("dare",),
    summary="drop delta entries with probability p, rescale by 1/(1-p), task arithmetic",
    reference="Yu et al. ICML 2024, arXiv 2311.03099",
    params=_dare_params(False), merge_tensor=_dare_linear, stats=_dare_stats,
))
register(Method(
    name="dare_ties",
    summary="DARE drop and rescale, then TIES sign election and disjoint merge",
    reference="Yu et al. ICML 2024 + Yadav et al. NeurIPS 2023",
    params=_dare_params(True), merge_tensor=_dare_ties, stats=_dare_stats,
))


# ---------------------------------------------------------------- Model Stock

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
