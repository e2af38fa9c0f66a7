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
```
Every path must exist; an unknown key is an error with a "did you mean" suggestion (a command that
reads more keys passes them as ``extra_keys``; they are kept in ``Recipe.extra``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from mergelab.errors import MergelabError
from mergelab.io import parse_dtype, parse_size
from mergelab.methods import COMPAT_MODES, get_method, resolve_params

KNOWN_KEYS = {"base_model", "models", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
              "compat", "compute_dtype", "shard_size", "device", "name"}
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

    def resolved(self, method_name: str | None = None) -> tuple[dict, list[dict]]:
        """Global and per-model parameters with defaults, validated (raises MergelabError)."""
        method = get_method(method_name or self.method)
        return resolve_params(method, self.params, [m.params for m in self.models], self.compat,
                              where=str(self.source or "recipe"))

    def input_paths(self) -> list[str]:
        """Every path this recipe reads (an output folder must not touch any of them)."""
        paths = [self.base_model, *(m.path for m in self.models)]
        if self.tokenizer_source and self.tokenizer_source != "base":
            paths.append(self.tokenizer_source)
        return [p for p in paths if p]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def _resolve_path(value: Any, relative_to: Path | None, where: str, must_exist: bool = True) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MergelabError(f"{where}: expected a model path, got {value!r}")
    p = Path(value).expanduser()
    if not p.is_absolute() and relative_to is not None and not p.exists() and (relative_to / p).exists():
        p = relative_to / p
    if must_exist and not p.exists():
        raise MergelabError(f"{where}: {value}: no such file or folder"
                            + (f" (also not relative to {relative_to})" if relative_to and not p.is_absolute() else ""))
    return str(p)


def unknown_key_error(where: str, key: Any, known: set[str] | list[str], what: str = "key") -> MergelabError:
    """``unknown key 'paramters' (did you mean 'parameters'?)``."""
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
    return MergelabError(f"{where}: unknown {what} {str(key)!r}{hint}")


def read_recipe_mapping(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The recipe as a dict, and the file it came from (None for a dict); one-line errors."""
    if isinstance(source, Mapping):
        return dict(source), None
    path = Path(source).expanduser()
    if not path.is_file():
        raise MergelabError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergelabError(f"{path}: not a text file (byte {e.start} is not UTF-8); a recipe is YAML") from None
    except OSError as e:
        raise MergelabError(f"{path}: cannot read the recipe ({e.strerror})") from None
    if "\x00" in text:
        raise MergelabError(f"{path}: not a text file (contains NUL bytes); a recipe is YAML")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise MergelabError(f"{path}: invalid YAML{at}") from None
    if not isinstance(raw, dict):
        raise MergelabError(f"{path}: a recipe must be a YAML mapping")
    return raw, path


def load_recipe(source: str | Path | Mapping[str, Any], *, compat: str | None = None,
                method_required: bool = True, validate: bool = True, extra_keys: set[str] | None = None,
                check_paths: bool = True) -> Recipe:
    """Parse a recipe file or dict. ``validate`` checks the method and its parameters now;
    ``extra_keys`` are top-level keys the caller reads itself; ``check_paths``: every path must exist."""
    raw, path = read_recipe_mapping(source)
    where = str(path or "recipe")
    for key, why in UNSUPPORTED.items():
        if key in raw:
            raise MergelabError(f"{where}: {why}")
    allowed = KNOWN_KEYS | set(extra_keys or ())
    for key in raw:
        if not isinstance(key, str) or key not in allowed:
            raise unknown_key_error(where, key, allowed)
    base_dir = path.parent if path else None

    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise MergelabError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    base = raw.get("base_model")
    base_path = _resolve_path(base, base_dir, f"{where}: base_model", check_paths) if base is not None else None
    models: list[ModelEntry] = []
    for i, entry in enumerate(models_raw):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergelabError(f"{where}: models[{i}] must be a mapping with a 'model' key")
        unknown = sorted(str(k) for k in set(entry) - {"model", "parameters"})
        if unknown:
            raise unknown_key_error(f"{where}: models[{i}]", unknown[0], {"model", "parameters"})
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergelabError(f"{where}: models[{i}].parameters must be a mapping")
        for k, v in params.items():
            if isinstance(v, (list, dict)):
                raise MergelabError(f"{where}: models[{i}].parameters.{k}: per-layer lists and filters are not "
                                    "supported; give one number")
        mpath = _resolve_path(entry["model"], base_dir, f"{where}: models[{i}]", check_paths)
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
        if raw.get(key) is not None and not isinstance(raw.get(key), str):
            raise MergelabError(f"{where}: {key} must be a dtype name, got {raw.get(key)!r}")
        parse_dtype(raw.get(key), f"{where}: {key}")
    if "shard_size" in raw:
        size = raw["shard_size"]
        if isinstance(size, bool) or not isinstance(size, (str, int)):
            raise MergelabError(f"{where}: shard_size must be a size such as 2GB, got {size!r}")
        if parse_size(size) < 1:
            raise MergelabError(f"{where}: shard_size must be positive, got {size!r}")
    tok_src = raw.get("tokenizer_source")
    if tok_src is not None:
        if not isinstance(tok_src, str) or not tok_src.strip():
            raise MergelabError(f"{where}: tokenizer_source must be 'base' or a model folder, got {tok_src!r}")
        if tok_src != "base":
            if tok_src == "union" or tok_src.startswith("model:"):
                raise MergelabError(f"{where}: tokenizer_source {tok_src!r} is not supported; use 'base' or a folder")
            tok_src = _resolve_path(tok_src, base_dir, f"{where}: tokenizer_source", check_paths)
            if check_paths and not Path(tok_src).is_dir():
                raise MergelabError(f"{where}: tokenizer_source {tok_src} is not a folder")
    if raw.get("merge_method") is not None and not isinstance(raw.get("merge_method"), str):
        raise MergelabError(f"{where}: merge_method must be a method name, got {raw.get('merge_method')!r}")
    recipe = Recipe(
        method=str(method) if method is not None else "",
        base_model=base_path, models=models, params=dict(params),
        dtype=raw.get("dtype"), out_dtype=raw.get("out_dtype"),
        compute_dtype=raw.get("compute_dtype", "float32"), compat=mode,
        tokenizer_source=tok_src, shard_size=raw.get("shard_size", "2GB"),
        source=path, extra={k: v for k, v in raw.items() if k not in KNOWN_KEYS}, raw=raw,
    )
    if validate and method is not None:
        m = get_method(recipe.method)
        if m.needs_base and base_path is None:
            raise MergelabError(f"{where}: method {m.name!r} needs a 'base_model'")
        recipe.resolved()
    return recipe
