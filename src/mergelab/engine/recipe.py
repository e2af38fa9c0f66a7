"""Recipes: mergekit's YAML layout, validated against the method registry before any tensor is read.

```yaml
base_model: path/to/base
models:
  - model: path/to/finetune_a
    parameters: {weight: 1.0, density: 0.2}
  - model: path/to/finetune_b
merge_method: ties
parameters: {lambda: 1.0}
dtype: float32          # mergekit: merge dtype; mergelab computes in float32 and writes this dtype
out_dtype: bfloat16     # optional, wins over dtype
tokenizer_source: base  # optional
# mergelab additions
compat: paper           # or mergekit
lines: {beta: 0.5}      # optional LiNeS post-processing (alpha: auto | number), see methods/lines.py
```
Keys of other commands (SMILE, adapt, recycle, bench) are kept in ``Recipe.extra``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from mergelab.errors import MergelabError
from mergelab.io import parse_dtype
from mergelab.methods import COMPAT_MODES, get_method, resolve_params
from mergelab.methods.lines import LinesConfig, resolve_lines

KNOWN_KEYS = {"base_model", "models", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
              "compat", "compute_dtype", "shard_size", "device", "name", "lines"}
UNSUPPORTED = {"slices": "per-layer slices are not supported; list whole models under 'models'",
               "tokenizer": "the 'tokenizer' section is not supported; use tokenizer_source: base"}


@dataclass
class ModelEntry:
    path: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    method: str
    base_model: str | None
    models: list[ModelEntry]
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    compute_dtype: str = "float32"
    compat: str = "paper"
    tokenizer_source: str | None = None
    shard_size: str | int = "2GB"
    source: Path | None = None              # the YAML file, if read from one
    extra: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    lines: LinesConfig | None = None        # LiNeS post-processing (methods.lines), None when off

    def resolved(self, method_name: str | None = None) -> tuple[dict, list[dict]]:
        """Global and per-model parameters with defaults, validated (raises MergelabError)."""
        method = get_method(method_name or self.method)
        return resolve_params(method, self.params, [m.params for m in self.models], self.compat,
                              where=str(self.source or "recipe"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def _resolve_path(value: Any, relative_to: Path | None, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MergelabError(f"{where}: expected a model path, got {value!r}")
    p = Path(value).expanduser()
    if not p.is_absolute() and relative_to is not None and not p.exists() and (relative_to / p).exists():
        p = relative_to / p
    return str(p)


def read_recipe_mapping(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The recipe as a dict, and the file it came from (None for a dict); one-line errors."""
    if isinstance(source, Mapping):
        return dict(source), None
    path = Path(source).expanduser()
    if not path.is_file():
        raise MergelabError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise MergelabError(f"{path}: invalid YAML{at}") from None
    if not isinstance(raw, dict):
        raise MergelabError(f"{path}: a recipe must be a YAML mapping")
    return raw, path


def load_recipe(source: str | Path | Mapping[str, Any], *, compat: str | None = None,
                method_required: bool = True, validate: bool = True) -> Recipe:
    """Parse a recipe file or dict. ``validate`` checks the method and its parameters now."""
    raw, path = read_recipe_mapping(source)
    where = str(path or "recipe")
    for key, why in UNSUPPORTED.items():
        if key in raw:
            raise MergelabError(f"{where}: {why}")
    base_dir = path.parent if path else None

    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise MergelabError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    base = raw.get("base_model")
    base_path = _resolve_path(base, base_dir, f"{where}: base_model") if base is not None else None
    models: list[ModelEntry] = []
    for i, entry in enumerate(models_raw):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergelabError(f"{where}: models[{i}] must be a mapping with a 'model' key")
        unknown = set(entry) - {"model", "parameters"}
        if unknown:
            raise MergelabError(f"{where}: models[{i}]: unknown key {sorted(unknown)[0]!r}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergelabError(f"{where}: models[{i}].parameters must be a mapping")
        for k, v in params.items():
            if isinstance(v, (list, dict)):
                raise MergelabError(f"{where}: models[{i}].parameters.{k}: per-layer lists and filters are not "
                                    "supported; give one number")
        mpath = _resolve_path(entry["model"], base_dir, f"{where}: models[{i}]")
        if base_path is not None and Path(mpath).resolve() == Path(base_path).resolve():
            continue  # mergekit lets the base appear among the models; it is the base, not a fine-tune
        models.append(ModelEntry(mpath, dict(params)))
    if not models:
        raise MergelabError(f"{where}: no models to merge besides the base")

    method = raw.get("merge_method")
    if method is None and method_required:
        raise MergelabError(f"{where}: missing 'merge_method'")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergelabError(f"{where}: 'parameters' must be a mapping")
    mode = compat or raw.get("compat", "paper")
    if mode not in COMPAT_MODES:
        raise MergelabError(f"{where}: compat must be one of {', '.join(COMPAT_MODES)}, got {mode!r}")
    for key in ("dtype", "out_dtype", "compute_dtype"):
        parse_dtype(raw.get(key), f"{where}: {key}")
    recipe = Recipe(
        method=str(method) if method is not None else "",
        base_model=base_path, models=models, params=dict(params),
        dtype=raw.get("dtype"), out_dtype=raw.get("out_dtype"),
        compute_dtype=raw.get("compute_dtype", "float32"), compat=mode,
        tokenizer_source=raw.get("tokenizer_source"), shard_size=raw.get("shard_size", "2GB"),
        source=path, extra={k: v for k, v in raw.items() if k not in KNOWN_KEYS}, raw=raw,
        lines=resolve_lines(raw.get("lines"), where),
    )
    if validate and method is not None:
        m = get_method(recipe.method)
        if m.needs_base and base_path is None:
            raise MergelabError(f"{where}: method {m.name!r} needs a 'base_model'")
        recipe.resolved()
        if recipe.lines is not None and not m.needs_base:
            raise MergelabError(f"{where}: 'lines' scales task vectors; method {m.name!r} does not use a base model")
    return recipe
