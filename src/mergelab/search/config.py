"""``search.yaml``: a recipe as the template, the space, the objective(s), the algorithm and the budget.

```yaml
recipe: recipe.yaml            # or an inline recipe mapping; its values are the defaults of every trial
space:
  method: [task_arithmetic, ties]          # optional: the method as a choice
  lambda: {low: 0.2, high: 1.5}            # a global parameter of the method(s): range ...
  density: [0.1, 0.2, 0.4]                 # ... or a list of values
  weight: {low: 0.0, high: 1.0}            # per-model weights: one dimension per model
  # density: {low: 0.1, high: 0.9, per_model: true}   # any per-model parameter, one value per model
  layers: {granularity: 2, low: 0.0, high: 2.0}   # per-layer coefficients of the task vectors
objective: {type: perplexity, files: {code: code.txt, prose: prose.txt}}   # or objectives: [...]
algorithm: tpe                 # tpe | cmaes | random | grid
trials: 40
batch: 4                       # trials asked together; results do not depend on the worker count
seed: 0
workers: 2                     # Ray: trials at a time (embedded runtime); local: one at a time
resources: {cpus: 1, gpus: 0, memory: null}    # per trial
executor: ray                  # ray | local
naive_probe: 2                 # trials re-run the naive way (merge to disk + reload) for the timing ratio
```
Everything is checked here, before any trial: a parameter the method (or every method of the choice)
does not have, or a range the method refuses, is one line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergelab.engine.recipe import load_recipe, read_recipe_mapping
from mergelab.errors import MergelabError
from mergelab.methods import get_method

ALGORITHMS = ("tpe", "cmaes", "random", "grid")
KEYS = {"recipe", "space", "objective", "objectives", "algorithm", "trials", "batch", "seed", "workers",
        "resources", "executor", "naive_probe", "final_split"}
LAYER_KEYS = {"granularity", "low", "high", "log", "values", "steps", "per_model", "other"}


@dataclass
class Dim:
    """One searched dimension: a float range (``low``/``high``, optionally ``log``, ``steps`` for grid) or
    a list of ``values``."""
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: list | None = None
    steps: int | None = None
    methods: tuple[str, ...] = ()           # methods for which this dimension exists (empty = all)
    per_model: bool | None = None           # one dimension per model (default: only for 'weight')

    def grid(self) -> list:
        if self.values is not None:
            return list(self.values)
        if not self.steps:
            raise MergelabError(f"space.{self.name}: grid search needs a list of values or 'steps'")
        if self.steps == 1:
            return [self.low]
        return [self.low + (self.high - self.low) * i / (self.steps - 1) for i in range(self.steps)]

    def ends(self) -> list:
        return list(self.values) if self.values is not None else [self.low, self.high]


@dataclass
class LayerSpace:
    """Per-layer coefficients: every ``granularity`` consecutive layers share one coefficient that scales
    the task vectors of their tensors (of every model, or one per model with ``per_model``)."""
    granularity: int = 1
    dim: Dim = field(default_factory=lambda: Dim("layers", 0.0, 2.0))
    per_model: bool = False
    other: bool = False                     # one more coefficient for tensors outside the layers


@dataclass
class SearchConfig:
    recipe: dict[str, Any]                  # the template recipe (mergekit layout), paths absolute
    methods: list[str]
    dims: list[Dim]                         # global and per-model method parameters
    per_model: dict[str, Dim]               # per-model parameter name -> its dimension
    layers: LayerSpace | None
    objectives: list[dict[str, Any]]
    algorithm: str = "tpe"
    trials: int = 20
    batch: int = 4
    seed: int = 0
    workers: int = 1
    resources: dict[str, Any] = field(default_factory=lambda: {"cpus": 1, "gpus": 0, "memory": None})
    executor: str = "ray"
    naive_probe: int = 2
    final_split: str | None = None
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return len(self.recipe["models"])

    def digest(self) -> str:
        """What fixes the trials' sequence: a resumed run must have the same one (budget excluded)."""
        keep = {k: v for k, v in self.raw.items() if k not in ("trials", "workers", "executor", "resources",
                                                                "naive_probe")}
        keep["recipe"] = self.recipe
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dim(name: str, spec: Any, where: str) -> Dim:
    if isinstance(spec, list):
        if not spec:
            raise MergelabError(f"{where}: space.{name}: an empty list of values")
        return Dim(name, values=list(spec))
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "values", "steps", "per_model"}
        if unknown:
            raise MergelabError(f"{where}: space.{name}: unknown key {sorted(unknown)[0]!r} "
                                "(low, high, log, steps, values or per_model)")
        pm = spec.get("per_model")
        if pm is not None and not isinstance(pm, bool):
            raise MergelabError(f"{where}: space.{name}.per_model must be true or false")
        if "values" in spec:
            d = _dim(name, spec["values"], where)
            d.per_model = pm
            return d
        try:
            low, high = float(spec["low"]), float(spec["high"])
        except (KeyError, TypeError, ValueError):
            raise MergelabError(f"{where}: space.{name}: give numbers 'low' and 'high' (or a list of values)") \
                from None
        if not low <= high:
            raise MergelabError(f"{where}: space.{name}: low {low} is above high {high}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise MergelabError(f"{where}: space.{name}: a log range needs low > 0")
        steps = spec.get("steps")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise MergelabError(f"{where}: space.{name}: 'steps' must be a positive integer")
        return Dim(name, low, high, log, None, steps, per_model=pm)
    if isinstance(spec, (int, float, str, bool)):
        return Dim(name, values=[spec])
    raise MergelabError(f"{where}: space.{name}: expected a range {{low, high}} or a list of values")


def _int(raw: dict, key: str, default: int, where: str, low: int = 1) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise MergelabError(f"{where}: '{key}' must be an integer >= {low}, got {v!r}")
    return v


def load_search_config(source: str | Path | dict) -> SearchConfig:
    """Parse and check a search file; every mistake is one line naming the file and the key."""
    raw, path = read_recipe_mapping(source)
    where = str(path or "search")
    unknown = set(raw) - KEYS
    if unknown:
        raise MergelabError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(KEYS))})")
    base_dir = path.parent if path else Path.cwd()
    rsrc = raw.get("recipe")
    if rsrc is None:
        raise MergelabError(f"{where}: missing 'recipe' (a recipe file or an inline recipe mapping)")
    if isinstance(rsrc, str):
        rp = Path(rsrc).expanduser()
        rsrc = rp if rp.is_absolute() else base_dir / rp
    elif not isinstance(rsrc, dict):
        raise MergelabError(f"{where}: 'recipe' must be a recipe file or a mapping")
    recipe_raw, recipe_path = read_recipe_mapping(rsrc)
    rwhere = str(recipe_path or f"{where}: recipe")
    template = load_recipe(recipe_raw if recipe_path is None else recipe_path, validate=False,
                           method_required=False)
    rel = recipe_path.parent if recipe_path else base_dir

    def absolute(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (rel / q).resolve())
    recipe = dict(recipe_raw)
    if template.base_model:
        recipe["base_model"] = absolute(template.base_model)
    recipe["models"] = [{"model": absolute(m.path), **({"parameters": dict(m.params)} if m.params else {})}
                        for m in template.models]
    if template.extra:
        raise MergelabError(f"{rwhere}: unknown recipe key {sorted(template.extra)[0]!r}")
    if template.compute_dtype not in (None, "float32"):
        raise MergelabError(f"{rwhere}: a search merges in float32; remove 'compute_dtype'")

    space = raw.get("space") or {}
    if not isinstance(space, dict):
        raise MergelabError(f"{where}: 'space' must be a mapping of parameter -> range or values")
    mspec = space.get("method", template.method or None)
    methods = [mspec] if isinstance(mspec, str) else list(mspec or [])
    if not methods:
        raise MergelabError(f"{where}: no merge method: set 'merge_method' in the recipe or space.method")
    resolved = [get_method(m) for m in methods]
    methods = [m.name for m in resolved]
    if len(set(methods)) != len(methods):
        raise MergelabError(f"{where}: space.method names a method twice")
    n = len(template.models)

    dims: list[Dim] = []
    per_model: dict[str, Dim] = {}
    layers = None
    for name, spec in space.items():
        if name == "method":
            continue
        if name == "layers":
            layers = _layers(spec, where)
            continue
        d = _dim(name, spec, where)
        having = [m for m in resolved if m.param(name) is not None and m.param(name) in m.params_for(
            template.compat)]
        if not having:
            which = methods[0] if len(methods) == 1 else "any of " + ", ".join(methods)
            names = sorted({p.name for m in resolved for p in m.params_for(template.compat)})
            raise MergelabError(f"{where}: space.{name}: {which} has no parameter {name!r} "
                                f"(parameters: {', '.join(names) or 'none'}, plus 'layers')")
        d.methods = tuple(m.name for m in having) if len(having) < len(resolved) else ()
        canon = having[0].param(name).name
        d.name = canon
        for m in having:
            p = m.param(canon)
            for v in d.ends():
                p.check(v, f"{where}: space.{name} ({m.name})")
        can = all(m.param(canon).per_model for m in having)
        if d.per_model and not can:
            raise MergelabError(f"{where}: space.{name}: {canon!r} is one global value (per_model: false)")
        if d.per_model is None:
            d.per_model = can and canon == "weight"
        if d.per_model:
            per_model[canon] = d
        else:
            dims.append(d)
    if layers is not None and not template.base_model:
        raise MergelabError(f"{where}: space.layers scales task vectors, which needs a 'base_model' in the recipe")

    # the template itself must merge with every method of the choice (minus the searched keys)
    searched = {d.name for d in dims} | set(per_model)
    for m in resolved:
        if m.needs_base and not template.base_model:
            raise MergelabError(f"{rwhere}: method {m.name!r} needs a 'base_model'")
        from mergelab.methods import resolve_params
        g = {k: v for k, v in template.params.items() if k not in searched and m.param(k) is not None}
        if len(methods) == 1:
            g = {k: v for k, v in template.params.items() if k not in searched}
        resolve_params(m, g, [{k: v for k, v in e.params.items() if k not in searched and m.param(k)}
                              for e in template.models], template.compat, where=rwhere)

    objectives = _objectives(raw, where, base_dir)
    algorithm = raw.get("algorithm", "tpe")
    if algorithm not in ALGORITHMS:
        raise MergelabError(f"{where}: algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    cfg = SearchConfig(recipe=recipe, methods=methods, dims=dims, per_model=per_model, layers=layers,
                       objectives=objectives, algorithm=algorithm, trials=_int(raw, "trials", 20, where),
                       batch=_int(raw, "batch", 4, where), seed=_int(raw, "seed", 0, where, low=0),
                       workers=_int(raw, "workers", 1, where), executor=raw.get("executor", "ray"),
                       naive_probe=_int(raw, "naive_probe", 2, where, low=0),
                       final_split=raw.get("final_split"), source=path, raw=raw)
    for o in objectives:
        if o["type"] == "tasks":
            from mergelab.search.bench_adapter import resolve_heads
            resolve_heads(o, [m["model"] for m in recipe["models"]])
    if cfg.final_split not in (None, "test"):
        raise MergelabError(f"{where}: final_split must be 'test' (the chosen model scored once on it) or absent")
    if cfg.final_split and not any(o["type"] == "tasks" for o in objectives):
        raise MergelabError(f"{where}: final_split needs a tasks objective (its suite has the test split)")
    if cfg.executor not in ("ray", "local"):
        raise MergelabError(f"{where}: executor must be 'ray' or 'local', got {cfg.executor!r}")
    res = raw.get("resources") or {}
    if not isinstance(res, dict) or set(res) - {"cpus", "gpus", "memory"}:
        raise MergelabError(f"{where}: resources takes cpus, gpus and memory (bytes) per trial")
    cfg.resources = {"cpus": res.get("cpus", 1), "gpus": res.get("gpus", 0), "memory": res.get("memory")}
    if algorithm == "cmaes" and len(objectives_names(cfg)) > 1:
        raise MergelabError(f"{where}: CMA-ES optimises one objective; use tpe, random or grid for several")
    if algorithm == "grid":
        for d in all_dims(cfg):
            d.grid()
    return cfg


def _layers(spec: Any, where: str) -> LayerSpace:
    if not isinstance(spec, dict):
        raise MergelabError(f"{where}: space.layers must be a mapping {{granularity, low, high}}")
    unknown = set(spec) - LAYER_KEYS
    if unknown:
        raise MergelabError(f"{where}: space.layers: unknown key {sorted(unknown)[0]!r} "
                            f"(known: {', '.join(sorted(LAYER_KEYS))})")
    g = spec.get("granularity", 1)
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise MergelabError(f"{where}: space.layers.granularity must be a positive integer (layers per coefficient)")
    rng = {k: spec[k] for k in ("low", "high", "log", "values", "steps") if k in spec}
    dim = _dim("layers", rng or {"low": 0.0, "high": 2.0}, where)
    for v in dim.ends():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MergelabError(f"{where}: space.layers: coefficients must be numbers, got {v!r}")
    return LayerSpace(g, dim, bool(spec.get("per_model", False)), bool(spec.get("other", False)))


OBJECTIVE_TYPES = ("tasks", "perplexity", "python", "command")


def _objectives(raw: dict, where: str, base_dir: Path) -> list[dict[str, Any]]:
    if ("objective" in raw) == ("objectives" in raw):
        raise MergelabError(f"{where}: give exactly one of 'objective' or 'objectives' (a list)")
    items = raw.get("objectives") if "objectives" in raw else [raw["objective"]]
    if not isinstance(items, list) or not items:
        raise MergelabError(f"{where}: 'objectives' must be a non-empty list")
    out = []
    for i, o in enumerate(items):
        at = f"{where}: objective" + (f"s[{i}]" if "objectives" in raw else "")
        if not isinstance(o, dict) or o.get("type") not in OBJECTIVE_TYPES:
            raise MergelabError(f"{at}: needs 'type', one of {', '.join(OBJECTIVE_TYPES)}")
        from mergelab.search.objectives import check_objective
        out.append(check_objective(dict(o), at, base_dir))
    names = [n for o in out for n, _ in o["_outputs"]]
    if len(set(names)) != len(names):
        raise MergelabError(f"{where}: two objectives have the same name; give each a 'name'")
    return out


def objectives_names(cfg: SearchConfig) -> list[tuple[str, str]]:
    """(name, direction) of every optimised value, in order."""
    return [nd for o in cfg.objectives for nd in o["_outputs"]]


def all_dims(cfg: SearchConfig) -> list[Dim]:
    return list(cfg.dims) + list(cfg.per_model.values()) + ([cfg.layers.dim] if cfg.layers else [])


def dump(cfg: SearchConfig) -> str:
    return yaml.safe_dump(cfg.raw, sort_keys=False)
