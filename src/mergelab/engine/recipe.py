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
compat: paper           # the papers' semantics; without it a recipe means what mergekit 0.1.5 makes of it
lines: {beta: 0.5}      # optional LiNeS post-processing (alpha: auto | number), see methods/lines.py
```
or, instead of ``models``, mergekit's ``slices`` (``sources`` with ``layer_range``, per-slice ``base_model`` and
``parameters``). Parameter values may be scalars, gradients over layer depth or ``{filter, value}`` lists
(``mergelab.methods.settings``). Keys of other commands (SMILE, adapt, recycle, bench) are kept in
``Recipe.extra``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from mergelab.errors import MergelabError
from mergelab.io.safetensors_format import parse_size, user_dtype_name
from mergelab.io.chat_template import check_chat_template
from mergelab.io.reference import _HUB_ID, resolve_reference
from mergelab.io.tokenizer_spec import TokenizerSpec, parse_tokenizer_spec
from mergelab.methods import COMPAT_MODES, get_method
from mergelab.methods.registry import base_is_input
from mergelab.methods.lines import LinesConfig, resolve_lines
from mergelab.methods.settings import ParamResolver

KNOWN_KEYS = {"base_model", "models", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
              "compat", "compute_dtype", "shard_size", "device", "name", "slices", "chat_template", "tokenizer",
              "lines"}
UNSUPPORTED: dict[str, str] = {}
# a recipe without 'compat' means what mergekit makes of it (its users' recipes run unchanged); the
# in-memory API (merge_state_dicts) and the benchmark use the papers' semantics
DEFAULT_RECIPE_COMPAT = "mergekit"


@dataclass
class ModelEntry:
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    lora: str | None = None                 # mergekit's ``model+lora``: an adapter applied on the fly

    @property
    def label(self) -> str:
        return f"{self.path}+{self.lora}" if self.lora else self.path


@dataclass
class SliceSource:
    path: str
    layer_range: tuple[int, int] | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSpec:
    """One output slice: its sources' layer ranges (all of one length), optional base and parameters."""
    sources: list[SliceSource]
    base_model: str | None = None
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
    compat: str = DEFAULT_RECIPE_COMPAT
    tokenizer_source: str | None = None
    chat_template: str | None = None        # 'auto', a built-in name or a Jinja string (io.chat_template)
    tokenizer: TokenizerSpec | None = None  # output tokenizer and vocabulary alignment (io.vocab)
    shard_size: str | int = "2GB"
    source: Path | None = None              # the YAML file, if read from one
    extra: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    slices: list[SliceSpec] | None = None   # mergekit 'slices' (then ``models`` lists every source once)

    def resolver(self, method_name: str | None = None) -> ParamResolver:
        """Per-tensor parameters of a ``models:`` recipe (gradients, filters), validated now."""
        method = get_method(method_name or self.method)
        return ParamResolver(method, self.compat, self.params, [m.params for m in self.models],
                             where=str(self.source or "recipe"))
    lines: LinesConfig | None = None        # LiNeS post-processing (methods.lines), None when off

    def resolved(self, method_name: str | None = None) -> tuple[dict, list[dict]]:
        """Global and per-model parameters with defaults, validated (raises MergelabError).

        A recipe whose values change over layers or tensors (gradients, filters, slices) has no single set:
        callers that need one get an error; the streaming merge resolves them tensor by tensor."""
        where = str(self.source or "recipe")
        if self.slices is not None:
            raise MergelabError(f"{where}: 'slices' are supported by 'mergelab merge' only")
        r = self.resolver(method_name)
        if not r.static:
            raise MergelabError(f"{where}: per-layer or filtered parameter values are supported by "
                                "'mergelab merge' only; give one number per parameter")
        return r.resolve("", 0.0)

    def input_paths(self) -> list[str]:
        """Every path this recipe reads (an output folder must not touch any of them)."""
        paths = [self.base_model, *(m.path for m in self.models), *(m.lora for m in self.models if m.lora)]
        for sl in self.slices or []:
            paths += [sl.base_model, *(s.path for s in sl.sources)]
        if self.tokenizer is not None and self.tokenizer.source not in ("base", "union"):
            paths.append(self.tokenizer.source)
        out = []
        for p in paths:
            if p and p not in out:
                out.append(p)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def _resolve_path(value: Any, relative_to: Path | None, where: str, must_exist: bool = True) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MergelabError(f"{where}: expected a model path, got {value!r}")
    p = Path(value).expanduser()
    if not p.is_absolute() and relative_to is not None and not p.exists() and (relative_to / p).exists():
        p = relative_to / p
    if not p.exists() and ("@" in value or _HUB_ID.match(value)):
        return resolve_reference(value, relative_to, where).path     # a hub id: the local cache's snapshot
    if must_exist and not p.exists():
        raise MergelabError(f"{where}: {value}: no such file or folder"
                            + (f" (also not relative to {relative_to})" if relative_to and not p.is_absolute() else ""))
    return str(p)


def unknown_key_error(where: str, key: Any, known: set[str] | list[str], what: str = "key") -> MergelabError:
    """``unknown key 'paramters' (did you mean 'parameters'?)``."""
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
    return MergelabError(f"{where}: unknown {what} {str(key)!r}{hint}")


def _existing_folder(value: Any, relative_to: Path | None, where: str) -> str:
    path = _resolve_path(value, relative_to, where)
    if not Path(path).is_dir():
        raise MergelabError(f"{where}: {value!r} is not a folder (nothing is downloaded)")
    return path


def read_recipe_text(path: Path) -> str:
    """A recipe file's text; a binary or unreadable file is one line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergelabError(f"{path}: not a text file (byte {e.start} is not UTF-8); a recipe is YAML") from None
    except OSError as e:
        raise MergelabError(f"{path}: cannot read the recipe ({e.strerror})") from None
    if "\x00" in text:
        raise MergelabError(f"{path}: not a text file (contains NUL bytes); a recipe is YAML")
    return text


def read_recipe_mapping(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The recipe as a dict, and the file it came from (None for a dict); one-line errors."""
    if isinstance(source, Mapping):
        return dict(source), None
    path = Path(source).expanduser()
    if not path.is_file():
        raise MergelabError(f"{path}: recipe file not found")
    text = read_recipe_text(path)
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
                method_required: bool = True, validate: bool = True, extra_keys: set[str] | None = None) -> Recipe:
    """Parse a recipe file or dict. ``validate`` checks the method and its parameters now;
    ``extra_keys`` are top-level keys the caller reads itself (every other unknown key is an error)."""
    raw, path = read_recipe_mapping(source)
    where = str(path or "recipe")
    for key, why in UNSUPPORTED.items():
        if key in raw:
            raise MergelabError(f"{where}: {why}")
    allowed = KNOWN_KEYS | set(extra_keys or ())
    for key in raw:
        if not isinstance(key, str) or key not in allowed:
            raise unknown_key_error(where, key, allowed)
    for key in ("dtype", "out_dtype", "compute_dtype"):
        if raw.get(key) is not None and not isinstance(raw.get(key), str):
            raise MergelabError(f"{where}: {key} must be a dtype name, got {raw.get(key)!r}")
    if "shard_size" in raw:
        size = raw["shard_size"]
        if isinstance(size, bool) or not isinstance(size, (str, int)):
            raise MergelabError(f"{where}: shard_size must be a size such as 2GB, got {size!r}")
        if parse_size(size) < 1:
            raise MergelabError(f"{where}: shard_size must be positive, got {size!r}")
    if raw.get("merge_method") is not None and not isinstance(raw.get("merge_method"), str):
        raise MergelabError(f"{where}: merge_method must be a method name, got {raw.get('merge_method')!r}")
    base_dir = path.parent if path else None

    base = raw.get("base_model")
    base_path = _resolve_path(base, base_dir, f"{where}: base_model") if base is not None else None
    slices = None
    if "slices" in raw:
        if "models" in raw:
            raise MergelabError(f"{where}: give either 'models' or 'slices', not both")
        slices = parse_slices(raw["slices"], base_dir, where)
        models = slice_models(slices, base_path)
    else:
        models = parse_models(raw.get("models"), base_path, base_dir, where)
    method = raw.get("merge_method")
    if method is None and method_required:
        raise MergelabError(f"{where}: missing 'merge_method'")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergelabError(f"{where}: 'parameters' must be a mapping")
    mode = compat or raw.get("compat", DEFAULT_RECIPE_COMPAT)
    if mode not in COMPAT_MODES:
        raise MergelabError(f"{where}: compat must be one of {', '.join(COMPAT_MODES)}, got {mode!r}")
    for key in ("dtype", "out_dtype", "compute_dtype"):
        user_dtype_name(raw.get(key), f"{where}: {key}")
    if slices is None and method is not None and base_path is not None and validate:
        m = get_method(str(method))
        if base_is_input(m, mode):
            models = parse_models(raw.get("models"), base_path, base_dir, where, keep_base=True)
    recipe = Recipe(
        method=str(method) if method is not None else "",
        base_model=base_path, models=models, params=dict(params),
        dtype=raw.get("dtype"), out_dtype=raw.get("out_dtype"),
        compute_dtype=raw.get("compute_dtype", "float32"), compat=mode,
        tokenizer_source=raw.get("tokenizer_source"), shard_size=raw.get("shard_size", "2GB"),
        chat_template=check_chat_template(raw.get("chat_template"), where),
        lines=resolve_lines(raw.get("lines"), where),
        tokenizer=parse_tokenizer_spec(raw.get("tokenizer"), raw.get("tokenizer_source"), where,
                                       lambda v, w: _existing_folder(v, base_dir, w)),
        source=path, extra={k: v for k, v in raw.items() if k not in KNOWN_KEYS}, raw=raw, slices=slices,
    )
    if validate and method is not None:
        m = get_method(recipe.method)
        if m.needs_base and base_path is None and not (slices and all(s.base_model for s in slices)):
            raise MergelabError(f"{where}: method {m.name!r} needs a 'base_model'")
        if recipe.lines is not None and not m.needs_base:
            raise MergelabError(f"{where}: 'lines' scales task vectors; method {m.name!r} does not use a base model")
        if recipe.lines is not None and slices is not None:
            raise MergelabError(f"{where}: 'lines' with 'slices' is not supported; give whole models")
        if slices is None:
            recipe.resolver()
        else:
            from mergelab.engine.slices import check_slices
            check_slices(recipe)
    return recipe


def parse_models(models_raw: Any, base_path: str | None, base_dir: Path | None, where: str,
                 keep_base: bool = False) -> list[ModelEntry]:
    """The ``models:`` list; the base, where it is listed too, is left out (it is the base, not a fine-tune),
    unless ``keep_base`` (mergekit's methods that ignore the base: it is one more input, added last when not
    listed)."""
    if not isinstance(models_raw, list) or not models_raw:
        raise MergelabError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
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
        ref = entry["model"]
        lora = None
        if isinstance(ref, str) and "+" in ref and not Path(ref).expanduser().exists():
            resolved = resolve_reference(ref, base_dir, f"{where}: models[{i}]")
            mpath, lora = resolved.path, resolved.lora
        else:
            mpath = _resolve_path(ref, base_dir, f"{where}: models[{i}]")
        if lora is None and base_path is not None and _same_path(mpath, base_path):
            if not keep_base:
                continue
        models.append(ModelEntry(mpath, dict(params), lora))
    if keep_base and base_path is not None and not any(_same_path(m.path, base_path) for m in models):
        models.append(ModelEntry(base_path))
    if not models:
        raise MergelabError(f"{where}: no models to merge besides the base")
    return models


def _same_path(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def parse_slices(raw: Any, base_dir: Path | None, where: str) -> list[SliceSpec]:
    """mergekit's ``slices:``: ``[{sources: [{model, layer_range: [a, b], parameters}], base_model, parameters}]``."""
    if not isinstance(raw, list) or not raw:
        raise MergelabError(f"{where}: 'slices' must be a non-empty list of {{sources: [...]}}")
    out = []
    for si, sl in enumerate(raw):
        at = f"{where}: slices[{si}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise MergelabError(f"{at} must be a mapping with a non-empty 'sources' list")
        unknown = set(sl) - {"sources", "base_model", "parameters"}
        if unknown:
            raise MergelabError(f"{at}: unknown key {sorted(unknown)[0]!r} (keys: sources, base_model, parameters)")
        params = sl.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergelabError(f"{at}.parameters must be a mapping")
        sources = []
        for j, src in enumerate(sl["sources"]):
            sat = f"{at}.sources[{j}]"
            if isinstance(src, str):
                src = {"model": src}
            if not isinstance(src, dict) or "model" not in src:
                raise MergelabError(f"{sat} must be a mapping with a 'model' key")
            unknown = set(src) - {"model", "layer_range", "parameters"}
            if unknown:
                raise MergelabError(f"{sat}: unknown key {sorted(unknown)[0]!r} (keys: model, layer_range, parameters)")
            lr = src.get("layer_range")
            if lr is not None:
                if (not isinstance(lr, (list, tuple)) or len(lr) != 2
                        or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                        or lr[0] < 0 or lr[1] <= lr[0]):
                    raise MergelabError(f"{sat}.layer_range must be [start, end) with 0 <= start < end, got {lr!r}")
                lr = (lr[0], lr[1])
            sp = src.get("parameters") or {}
            if not isinstance(sp, dict):
                raise MergelabError(f"{sat}.parameters must be a mapping")
            sources.append(SliceSource(_resolve_path(src["model"], base_dir, sat), lr, dict(sp)))
        sbase = sl.get("base_model")
        sbase = _resolve_path(sbase, base_dir, f"{at}.base_model") if sbase is not None else None
        out.append(SliceSpec(sources, sbase, dict(params)))
    return out


def slice_models(slices: list[SliceSpec], base_path: str | None) -> list[ModelEntry]:
    """Every model the slices read, once, in order of first use (the base left out)."""
    seen: list[str] = []
    for sl in slices:
        for src in sl.sources:
            if base_path is not None and _same_path(src.path, base_path):
                continue
            if not any(_same_path(src.path, p) for p in seen):
                seen.append(src.path)
    models = [ModelEntry(p) for p in seen]
    if not models and base_path is not None:
        models = [ModelEntry(base_path)]     # slices of the base alone (a frankenmerge of one model)
    return models


def check_random_seed(recipe: Recipe, seed: int) -> None:
    """``--random-seed`` replays mergekit's mask stream: only where mergelab knows mergekit's order of draws."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise MergelabError(f"random seed {seed!r}: must be an integer in [0, 2^32) (mergekit's set_seed seeds numpy "
                            "too, which takes no other)")
    if recipe.compat != "mergekit":
        raise MergelabError("random seed: it reproduces mergekit's masks, so it needs mergekit semantics "
                            "(compat: mergekit, the default), not compat: paper")
    if recipe.slices is not None or recipe.tokenizer is not None:
        raise MergelabError("random seed: mergekit's order of mask draws is replayed for recipes with 'models:' and "
                            f"no tokenizer section; this recipe has {'slices' if recipe.slices else 'a tokenizer'}")
