"""The registry of data-free merge methods: what each declares, and the checks of a recipe's parameters.

Each method declares its parameters (type, default, range, whether it may be set per model) so that a
recipe is validated before any tensor is read, and a per-tensor function built from
``mergelab.kernels``. Two semantics are available: ``paper`` (default: what the method's authors'
code does) and ``mergekit`` (what mergekit 0.1.5 does, for users switching from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mergelab._lazy import lazy_module
from mergelab.errors import MergelabError

torch = lazy_module("torch")

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
    # set when the engine left the NaN/Inf check of the inputs to the kernel (``Method.checks_inputs``):
    # runs it (raising, naming the input); the kernel calls it when a sum over its inputs is not finite
    check_inputs: Callable[[], None] | None = None
    # per selection value of a whole tensor: (magnitudes below it, magnitudes at most it), or None:
    # whether ties straddle a trim cut, known without another pass
    selection_counts: list[list[tuple[int, int] | None]] | None = None
    # ``kernels.mergekit_stream.MergekitMaskStream`` when the merge reproduces mergekit's masks
    # (``--random-seed``), keyed by (tensor name, model index); None: masks from ``generator``
    mask_stream: Any = None

    def deltas(self) -> list[torch.Tensor]:
        return [m - self.base for m in self.models]

    def weights(self) -> list[float]:
        return [p.get("weight", 1.0) for p in self.model_params]

    def _mask_offset(self, count: int) -> int:
        """Where this job's rows start in the whole tensor's mask (``count`` entries in the rows)."""
        if self.rows is None or self.rows[1] <= self.rows[0]:
            return 0
        return self.rows[0] * (count // (self.rows[1] - self.rows[0]))

    def replays_mergekit(self, index: int) -> bool:
        """Does this merge draw mergekit's own mask of model ``index`` here (``--random-seed``)?"""
        return self.mask_stream is not None and (self.name, index) in self.mask_stream

    def mergekit_mask(self, index: int, probabilities: torch.Tensor) -> torch.Tensor:
        """mergekit's mask of model ``index`` over this job's rows (``probabilities`` shaped as them, in mergekit's
        work dtype), on their device (``replays_mergekit(index)`` must hold)."""
        offset = self._mask_offset(probabilities.numel())
        return self.mask_stream.bernoulli((self.name, index), offset, probabilities).to(probabilities.device)

    def mergekit_keep(self, index: int, like: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The same for one probability ``p`` (DARE's ``torch.full``): float32 0/1 shaped as ``like``, on its device."""
        offset = self._mask_offset(like.numel())
        return self.mask_stream.keep((self.name, index), offset, tuple(like.shape), p).to(like.device)

    def generator(self, index: int) -> torch.Generator:
        """Per (seed, tensor, model) generator: DARE masks do not depend on thread order."""
        from mergelab.kernels.numpy_dare import mask_seed
        seed = mask_seed(int(self.params.get("seed", 0)), self.name, index, self.rows[0] if self.rows else 0)
        return torch.Generator().manual_seed(seed)


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
    # (base coefficient or None, model coefficients) when every merged tensor is this fixed linear
    # combination of the inputs (average, task arithmetic), else None: the engine then computes it in
    # one fused pass over the raw inputs (no task vectors, no copies) instead of calling ``merge_tensor``
    linear_combination: Callable[[dict, list[dict], str], tuple[float | None, list[float]] | None] | None = None
    # True when ``merge_tensor`` reads only ``job.base`` and ``job.stacked`` (never ``job.models``): the
    # engine then builds the task vectors one model at a time and hands over no model inputs (memory)
    task_vectors_only: bool = False
    # True when, for these (params, model_params, compat), ``merge_tensor`` computes from ``job.base`` and
    # ``job.models`` in one pass (no task vectors): the engine then hands over the inputs as read (views of
    # the mapped files) even for a ``task_vectors_only`` method
    reads_inputs: Callable[[dict, list[dict], str], bool] = lambda params, model_params, compat: False
    # (params, compat) -> True when the kernel sees every input in a sum it checks for NaN/Inf, calling
    # ``TensorJob.check_inputs`` when one is not finite: the L1 norm of each task vector (DARE), or the
    # result itself where every input reaches it (task arithmetic, ``common.check_inputs_through``). The
    # engine then skips its own NaN/Inf pass over each input
    checks_inputs: Callable[[dict, str], bool] | None = None
    formula: str = ""           # one line for ``mergelab methods``
    # mergekit's base policy IGNORED: a configured base_model is one more input (averaged, passed through)
    base_is_input: bool = False
    # mergekit's base policy OPTIONAL: the base is read and used when the recipe names one
    optional_base: bool = False
    max_models: int | None = None    # most models besides the base
    # mergekit computes this method in float32 whatever the recipe dtype (its "batched" kernels)
    float32_kernel: bool = False
    # mergekit returns (and writes) this method's results in float32 whatever the inputs (arcee_fusion)
    float32_result: bool = False
    # mergekit draws one ``torch.bernoulli`` over a model's whole task vector of a tensor when this is true of
    # that model's resolved parameters (DARE, DELLA): the draws ``--random-seed`` replays in mergekit's order
    mergekit_draws: Callable[[dict], bool] | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name or name in p.aliases:
                return p
        return None

    def params_for(self, compat: str) -> list[Param]:
        return [p for p in self.params if compat in p.modes]


REGISTRY: dict[str, Method] = {}
# methods whose mergekit base policy is IGNORED, registered before ``Method.base_is_input`` existed
_BASE_IS_INPUT = {"average"}
_FLOAT32_KERNEL = {"average"}


def float32_kernel(method: Method) -> bool:
    """Does mergekit compute this method in float32 (slerp, linear) rather than in the recipe's dtype?"""
    return method.float32_kernel or method.name in _FLOAT32_KERNEL


def base_is_input(method: Method, compat: str) -> bool:
    """Under mergekit semantics, is a configured base_model just one more input of this method?"""
    return compat == "mergekit" and (method.base_is_input or method.name in _BASE_IS_INPUT)


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
                extra = ""
                if p is not None:   # the parameter exists, in the other semantics only
                    extra = (f" with --compat {compat} (it exists only with --compat "
                             f"{', '.join(m for m in p.modes if m != compat)})")
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
    if method.max_models is not None and n > method.max_models:
        raise MergelabError(f"{where}: method {method.name!r} takes at most {method.max_models} model(s) "
                            f"besides the base, got {n}")
    if method.prepare is not None:
        method.prepare(resolved_global, resolved_models, compat)
    return resolved_global, resolved_models
