"""mergekit's parameter values: scalars, gradients over layer depth, ``{filter, value}`` lists, precedence.

A recipe parameter ("setting") is one of (mergekit 0.1.5 ``config.py::evaluate_setting``, ALGORITHMS-2 §13.11):

* a scalar: that value everywhere;
* a list of scalars, a *gradient*: at relative depth ``t`` in [0, 1], ``s = t (n-1)``, ``i0 = int(s)``,
  ``i1 = min(n-1, i0+1)``, ``f = s - i0``, value ``(1-f) v[i0] + f v[i1]`` (piecewise linear, endpoints at
  t = 0 and t = 1); a list of booleans or strings takes ``v[int(t (n-1))]`` (floor);
* a ``{filter, value}`` mapping or a list of them: the FIRST entry whose ``filter`` is missing, ``"*"`` or a
  substring of the tensor name (plain ``in``, case-sensitive) gives the value (itself a scalar or a
  gradient); no match gives nothing, so the next level of the precedence decides.

Precedence (first level whose setting gives a value wins, else the method's default): the source's own
``parameters`` (a ``models:`` entry or a slice's ``sources:`` entry) > the slice's ``parameters`` > the
top-level ``parameters``. Per-model parameters see that input's tensor name (before layer renumbering),
shared ones the output tensor name.

Depth ``t``: layer ``j`` (0-based) of an output slice of ``L`` layers has ``t = j / (L-1)`` (``t = 1`` if
L == 1); a ``models:`` recipe is one slice over all layers; tensors outside the layers (embeddings, final
norm, head) have ``t = 0``.

This module imports no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from mergelab.errors import MergelabError
from mergelab.methods.registry import Method, Param, resolve_params

# tensors of decoder (and encoder) layers: Llama/Mistral/Qwen/Gemma/Phi "model.layers.N.", BERT
# "encoder.layer.N.", GPT-2 "transformer.h.N.", "blocks.N."
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")

# mergekit options that only change memory use or speed, never the merged values: accepted and ignored
NO_EFFECT_PARAMS = ("int8_mask",)


def layer_index(name: str) -> int | None:
    """The layer number of a tensor named ``...layers.N...`` (None outside the layers)."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, new_index: int) -> str:
    """``name`` with its layer number replaced (the first ``layers.N.`` match)."""
    m = LAYER_RE.search(name)
    if m is None:
        return name
    return name[:m.start(1)] + str(new_index) + name[m.end(1):]


def layer_count(names: Sequence[str]) -> int:
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def depth_t(j: int, length: int) -> float:
    """Relative depth of layer ``j`` of a slice of ``length`` layers (mergekit plan.py)."""
    return 1.0 if length <= 1 else j / (length - 1)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_static(setting: Any) -> bool:
    """A plain scalar (the same value for every tensor)."""
    return not isinstance(setting, (list, tuple, Mapping))


def check_setting(param: Param, setting: Any, where: str, ignored: list[str] | None = None) -> Any:
    """Validate a setting's form and every value in it; returns it with values coerced (tuples for lists).

    With ``ignored`` (mergekit semantics), keys of a ``{filter, value}`` entry other than those two are dropped
    and noted there, as mergekit does: ``{pattern: self_attn, value: ...}`` (an old spelling) has no filter, so
    it matches every tensor."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (list, tuple)):
        if not setting:
            raise MergelabError(f"{where}: '{param.name}' is an empty list")
        if all(isinstance(e, Mapping) for e in setting):
            out = []
            for i, e in enumerate(setting):
                unknown = set(e) - {"filter", "value"}
                if unknown and ignored is not None and "value" in e:
                    ignored.extend(f"{where}: '{param.name}'[{i}].{k} (no filter: the entry matches every tensor)"
                                   for k in sorted(unknown))
                    unknown = set()
                if unknown or "value" not in e:
                    raise MergelabError(f"{where}: '{param.name}'[{i}] must be {{filter: NAME_PART, value: V}}"
                                        + (f", got key {sorted(unknown)[0]!r}" if unknown else ""))
                flt = e.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise MergelabError(f"{where}: '{param.name}'[{i}].filter must be a string, got {flt!r}")
                value = e["value"]
                if isinstance(value, Mapping) or isinstance(value, (list, tuple)) and \
                        any(isinstance(v, (Mapping, list, tuple)) for v in value):
                    raise MergelabError(f"{where}: '{param.name}'[{i}].value must be a value or a list of values")
                out.append((flt, check_setting(param, value, f"{where}: '{param.name}'[{i}].value", ignored)))
            return ("filters", tuple(out))
        if any(isinstance(e, (Mapping, list, tuple)) for e in setting):
            raise MergelabError(f"{where}: '{param.name}' mixes filters and values; give a list of values "
                                "(a gradient) or a list of {filter, value}")
        return ("gradient", tuple(param.check(v, where) for v in setting))
    return param.check(setting, where)


def evaluate_setting(name: str, setting: Any, t: float) -> Any:
    """The value of a checked setting for tensor ``name`` at depth ``t`` (None: no filter matched)."""
    if not isinstance(setting, tuple):
        return setting
    kind, body = setting
    if kind == "filters":
        for flt, value in body:
            if flt is None or flt == "*" or flt in name:
                return evaluate_setting(name, value, t)
        return None
    n = len(body)
    if not all(_is_number(v) for v in body):
        return body[int(t * (n - 1))]
    s = t * (n - 1)
    i0 = int(s)
    i1 = min(n - 1, i0 + 1)
    f = s - i0
    return (1 - f) * body[i0] + f * body[i1]


@dataclass
class Level:
    """Settings of one precedence level, checked (``{param name: setting}``)."""
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]


# parameter names of mergekit 0.1.5's methods: a recipe may carry one its method does not use (mergekit
# ignores it, e.g. ``density`` left in a task_arithmetic recipe); other unknown names are typos
MERGEKIT_PARAM_NAMES = {"t", "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask",
                        "select_topk", "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps", "max_iter",
                        "tol", "r", "alpha", "scale", "filter_wise"}


def _unused(method: Method, compat: str, key: str) -> bool:
    """Under mergekit semantics, a mergekit parameter this method does not take is ignored (as mergekit does)."""
    if compat != "mergekit" or key not in MERGEKIT_PARAM_NAMES:
        return False
    p = method.param(key)
    return p is None or p not in method.params_for(compat)


def _check_level(method: Method, compat: str, params: Mapping | None, scope: str, per_model: bool,
                 ignored: list[str] | None = None) -> dict:
    """Check names (as ``resolve_params`` does) and every value of each setting of one mapping."""
    params = {k: v for k, v in (params or {}).items() if k not in NO_EFFECT_PARAMS}
    for key in [k for k in params if _unused(method, compat, k)]:
        del params[key]
        if ignored is not None:
            ignored.append(f"{scope}.{key} (not a parameter of {method.name})")
    # names, scopes and duplicates: checked by resolve_params on scalar stand-ins
    stand_in = {k: _first_value(v) for k, v in params.items()}
    probe = [stand_in] if per_model else []
    resolve_params_names(method, {} if per_model else stand_in, probe, compat, scope, per_model)
    out = {}
    for key, value in params.items():
        p = method.param(key)
        out[p.name] = check_setting(p, value, scope, ignored if compat == "mergekit" else None)
    return out


def _first_value(v: Any) -> Any:
    while isinstance(v, (list, tuple, Mapping)):
        if isinstance(v, Mapping):
            v = v.get("value")
        elif v:
            v = v[0]
        else:
            return None
    return v


def resolve_params_names(method: Method, params: dict, model_params: list[dict], compat: str, where: str,
                         per_model: bool) -> None:
    """Unknown names, globals given per model, aliases given twice: the registry's own messages."""
    from mergelab.methods.registry import COMPAT_MODES
    allowed = method.params_for(compat)
    for raw, scope in ([(mp, where) for mp in model_params] if per_model else [(params, where)]):
        seen = set()
        for key in raw:
            p = method.param(key)
            if p is None or p not in allowed:
                names = ", ".join(q.name for q in allowed) or "none"
                other = [m for m in COMPAT_MODES if m != compat]
                extra = f" with compat: {other[0]}" if p is not None and other else ""
                raise MergelabError(f"{scope}: unknown parameter {key!r} for method {method.name!r}{extra} "
                                    f"(parameters: {names})")
            if per_model and not p.per_model:
                raise MergelabError(f"{scope}: parameter {p.name!r} of {method.name!r} is global, "
                                    "set it under the top-level 'parameters'")
            if p.name in seen:
                raise MergelabError(f"{scope}: parameter {p.name!r} given twice (as {key!r})")
            seen.add(p.name)


class ParamResolver:
    """Per-tensor parameters of one merge (or one slice of it): ``resolve(out_name, t, source_names)``.

    ``levels`` run from the highest precedence (the sources) to the lowest (the top-level
    ``parameters``); a shared setting at the sources' level is not allowed (mergekit's per-source
    parameters are per-model ones). With only scalars everywhere, ``static`` is True and every tensor gets
    the same parameters, resolved once (the engine's fast path).
    """

    def __init__(self, method: Method, compat: str, top: Mapping | None, model_params: Sequence[Mapping | None],
                 slice_params: Mapping | None = None, where: str = "recipe",
                 model_where: Callable[[int], str] | None = None):
        self.method, self.compat, self.where = method, compat, where
        model_where = model_where or (lambda i: f"{where}: models[{i}].parameters")
        self.ignored: list[str] = []       # mergekit parameters this method does not take (mergekit ignores them)
        self.top = _check_level(method, compat, top, f"{where}: parameters", False, self.ignored)
        self.slice = _check_level(method, compat, slice_params, f"{where}: slice parameters", False, self.ignored)
        self.models = [_check_level(method, compat, mp, model_where(i), True, self.ignored)
                       for i, mp in enumerate(model_params)]
        self.n = len(self.models)
        settings = [*self.top.values(), *self.slice.values(), *(v for m in self.models for v in m.values())]
        self.static = all(is_static(s) for s in settings)
        self._cache: dict[tuple, tuple[dict, list[dict]]] = {}
        self._static = self._resolve_values(self._evaluate("", 0.0, None)) if self.static else None
        if not self.static:
            # every value and combination a recipe could produce is checked when tensors are planned; check
            # the defaults and registry rules (prepare) once now at the first layer
            self.resolve("", 0.0)

    def _evaluate(self, name: str, t: float, source_names: Sequence[str] | None) -> tuple[dict, list[dict]]:
        shared = {}
        for key in {**self.top, **self.slice}:
            for level in (self.slice, self.top):
                if key in level:
                    v = evaluate_setting(name, level[key], t)
                    if v is not None:
                        shared[key] = v
                        break
        per = []
        for i, mp in enumerate(self.models):
            own = source_names[i] if source_names is not None else name
            values = {}
            for key in {**mp, **{k: None for k in self.slice}, **{k: None for k in self.top}}:
                p = self.method.param(key)
                if not p.per_model:
                    continue
                for level, nm in ((mp, own), (self.slice, own), (self.top, own)):
                    if key in level:
                        v = evaluate_setting(nm, level[key], t)
                        if v is not None:
                            values[key] = v
                            break
            per.append(values)
        # per-model parameters set globally stay in ``shared`` too: the resolved global set then reports the
        # value the recipe gave (each model's own value is in ``per`` either way)
        return shared, per

    def _resolve_values(self, evaluated: tuple[dict, list[dict]]) -> tuple[dict, list[dict]]:
        shared, per = evaluated
        key = (tuple(sorted(shared.items())), tuple(tuple(sorted(p.items())) for p in per))
        hit = self._cache.get(key)
        if hit is None:
            hit = resolve_params(self.method, shared, per, self.compat, where=self.where)
            self._cache[key] = hit
        return hit

    def resolve(self, name: str, t: float, source_names: Sequence[str] | None = None) -> tuple[dict, list[dict]]:
        """(shared parameters, per-model parameters) of one output tensor, defaults filled in."""
        if self._static is not None:
            return self._static
        return self._resolve_values(self._evaluate(name, t, source_names))
