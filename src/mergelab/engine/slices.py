"""mergekit's ``slices:``: output layers taken from layer ranges of the sources, merged slice by slice, streamed.

```yaml
slices:
  - sources:
      - {model: A, layer_range: [0, 16]}
      - {model: B, layer_range: [0, 16], parameters: {weight: 0.3}}
    base_model: A          # optional, else the top-level base_model
    parameters: {t: 0.5}   # optional, between the sources' and the top-level parameters
  - sources: [{model: A, layer_range: [8, 24]}]     # passthrough frankenmerge: one source per slice
merge_method: slerp
```
As mergekit 0.1.5 ``plan.py`` (ALGORITHMS-2 §13.11): ``layer_range`` is [start, end), all sources of a
slice have its length; output layers are numbered consecutively over the slices (source layer ``start + j``
becomes output layer ``offset + j``); gradients restart in every slice (``t = j / (L-1)``); tensors outside
the layers (embeddings) come from the first slice's sources, those after them (final norm, head) from the
last slice's, both at ``t = 0``. The output config gets the new ``num_hidden_layers`` and per-layer config
lists (``layer_types`` ...) re-indexed. Each slice is one ordinary streaming merge over renamed views
of the inputs (``RenamedCheckpoint``), so memory stays bounded as for ``models:`` recipes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import yaml

from mergelab.engine.recipe import Recipe, SliceSpec, _same_path
from mergelab.errors import MergelabError
from mergelab.engine.output_folder import edit_config, set_config_dtype
from mergelab.io import (DTYPE_NAMES, ShardedWriter, atomic_output_dir, copy_model_files, model_folder, open_checkpoint, parse_dtype,
                         parse_size)
from mergelab.methods import get_method
from mergelab.methods.registry import base_is_input
from mergelab.methods.settings import ParamResolver, depth_t, layer_count, layer_index, rename_layer


PRE_RE = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.")


class RenamedCheckpoint:
    """A view of a checkpoint under other tensor names (``{output name: source name}``), read lazily."""

    def __init__(self, ckpt, names: dict[str, str]):
        self.ckpt, self.names = ckpt, names
        self.path = getattr(ckpt, "path", None)

    def keys(self) -> list[str]:
        return list(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def shape(self, name: str):
        return self.ckpt.shape(self.names[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.dtype(self.names[name])

    def get(self, name: str, rows=None) -> torch.Tensor:
        return self.ckpt.get(self.names[name], rows)

    @property
    def fresh_tensors(self) -> bool:
        return self.ckpt.fresh_tensors

    def close(self) -> None:
        pass


@dataclass
class _SlicePlan:
    spec: SliceSpec
    length: int
    offset: int
    ranges: list[tuple[int, int]]       # per source
    base_index: int | None              # which source is the base
    model_indices: list[int]            # sources merged as models, in order


def _layer_names(names: Sequence[str]) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for n in names:
        i = layer_index(n)
        if i is not None:
            by_layer.setdefault(i, []).append(n)
    return by_layer


def slice_roles(recipe: Recipe, sl: SliceSpec, at: str) -> tuple[int | None, list[int]]:
    """(index of the slice's base among its sources or None, indices of the sources merged as models)."""
    method = get_method(recipe.method)
    for j, src in enumerate(sl.sources):
        if any(_same_path(src.path, o.path) for o in sl.sources[:j]):
            raise MergelabError(f"{at}: {src.path} is listed twice among the sources (as mergekit, one model "
                                "may be one input of a slice only)")
    base = sl.base_model or recipe.base_model
    base_index = None
    if base is not None and not base_is_input(method, recipe.compat):
        base_index = next((j for j, s in enumerate(sl.sources) if _same_path(s.path, base)), None)
    if method.needs_base and base_index is None:
        raise MergelabError(f"{at}: method {method.name!r} needs the base model ({base}) among the slice's "
                            "sources" if base else f"{at}: method {method.name!r} needs a base_model")
    models = [j for j in range(len(sl.sources)) if j != base_index]
    if not method.needs_base and not method.optional_base:
        base_index = None
    if len(models) < method.min_models or (method.max_models is not None and len(models) > method.max_models):
        most = f"at most {method.max_models}" if method.max_models is not None else "any number of"
        raise MergelabError(f"{at}: method {method.name!r} takes at least {method.min_models} and {most} "
                            f"source(s) besides the base, got {len(models)}")
    return base_index, models


def plan_slices(recipe: Recipe, n_layers: Callable[[str], int]) -> list[_SlicePlan]:
    """Lengths, offsets, base and models of every slice; errors name the slice."""
    where = str(recipe.source or "recipe")
    plans, offset = [], 0
    for si, sl in enumerate(recipe.slices):
        at = f"{where}: slices[{si}]"
        base_index, models = slice_roles(recipe, sl, at)
        ranges = [src.layer_range or (0, n_layers(src.path)) for src in sl.sources]
        for src, (a, b) in zip(sl.sources, ranges):
            if b > n_layers(src.path):
                raise MergelabError(f"{at}: layer_range [{a}, {b}] of {src.path} goes past its {n_layers(src.path)} "
                                    "layers")
        lengths = {b - a for a, b in ranges}
        if len(lengths) != 1:
            raise MergelabError(f"{at}: all sources of a slice must have the same number of layers, got "
                                f"{sorted(b - a for a, b in ranges)}")
        length = lengths.pop()
        plans.append(_SlicePlan(sl, length, offset, ranges, base_index, models))
        offset += length
    return plans


def _resolver(recipe: Recipe, plan: _SlicePlan, si: int) -> ParamResolver:
    where = str(recipe.source or "recipe")
    return ParamResolver(get_method(recipe.method), recipe.compat, recipe.params,
                         [plan.spec.sources[j].params for j in plan.model_indices], plan.spec.params,
                         where=where, model_where=lambda i: f"{where}: slices[{si}].sources[{plan.model_indices[i]}]"
                                                            ".parameters")


def check_slices(recipe: Recipe) -> None:
    """Parameter names and values of every slice, before any checkpoint is opened."""
    where = str(recipe.source or "recipe")
    for si, sl in enumerate(recipe.slices):
        base_index, models = slice_roles(recipe, sl, f"{where}: slices[{si}]")
        _resolver(recipe, _SlicePlan(sl, 0, 0, [], base_index, models), si)


def merge_slices(recipe: Recipe, out_dir, *, force: bool = False, device: str | None = None,
                 threads: int | None = None, progress=None, shard_size=None, block_elements: int | None = None):
    from mergelab.engine.streaming import BLOCK_ELEMENTS, MergeSummary, _mergeable, merge_dtypes, run_merge
    started = time.perf_counter()
    method = get_method(recipe.method)
    out_dtype = parse_dtype(recipe.out_dtype or recipe.dtype)
    round_dtype, compute_dtype = merge_dtypes(recipe, method)
    max_shard = parse_size(shard_size if shard_size is not None else recipe.shard_size)
    paths: list[str] = []
    for sl in recipe.slices:
        for p in [s.path for s in sl.sources]:
            if not any(_same_path(p, q) for q in paths):
                paths.append(p)
    ckpts = {p: open_checkpoint(p) for p in paths}

    def ckpt(path: str):
        return next(c for q, c in ckpts.items() if _same_path(q, path))
    try:
        layers_of = {p: layer_count(c.keys()) for p, c in ckpts.items()}
        plans = plan_slices(recipe, lambda p: next(n for q, n in layers_of.items() if _same_path(q, p)))
        first, last = plans[0], plans[-1]
        first_ck = ckpt(first.spec.sources[0].path)
        outside = [n for n in first_ck.keys() if layer_index(n) is None]
        # before the layers: embeddings (mergekit's pre_weights); after them: final norm, head (post_weights)
        pre = [n for n in outside if PRE_RE.search(n)]
        post = [n for n in outside if not PRE_RE.search(n)]

        # per slice: views of its sources under the output names, and each output tensor's depth t
        segments = []
        notes: list[str] = []
        layout = []
        source_layers: list[int] = []            # output layer -> source layer of the slice's first source
        pre_layout = []
        for si, plan in enumerate(plans):
            srcs = plan.spec.sources
            maps: list[dict[str, str]] = [dict() for _ in srcs]
            t_of: dict[str, float] = {}
            extra = (pre if si == 0 else []) + (post if si == len(plans) - 1 else [])
            for name in extra:
                for j in range(len(srcs)):
                    maps[j][name] = name
                t_of[name] = 0.0
            for k in range(plan.length):
                out_layer = plan.offset + k
                source_layers.append(plan.ranges[0][0] + k)
                per_src = [_layer_names(ckpt(s.path).keys()).get(plan.ranges[j][0] + k, [])
                           for j, s in enumerate(srcs)]
                for name in per_src[0]:
                    out = rename_layer(name, out_layer)
                    t_of[out] = depth_t(k, plan.length)
                    for j, names in enumerate(per_src):
                        src_name = rename_layer(name, plan.ranges[j][0] + k)
                        if src_name not in ckpt(srcs[j].path):
                            raise MergelabError(f"{srcs[j].path}: tensor {src_name!r} missing (slices[{si}])")
                        maps[j][out] = src_name
            views = [RenamedCheckpoint(ckpt(s.path), m) for s, m in zip(srcs, maps)]
            resolver = _resolver(recipe, plan, si)
            notes += [n for n in resolver.ignored if n not in notes]
            order = [n for n in maps[0]]
            src_names = {n: [maps[j][n] for j in plan.model_indices] for n in order}
            table = {n: resolver.resolve(n, t_of[n], src_names[n]) for n in order}
            segments.append((plan, views, table))
            ref = views[plan.base_index] if plan.base_index is not None else views[plan.model_indices[0]]
            for n in order:
                d = ref.dtype(n)
                entry = (n, out_dtype if out_dtype is not None and _mergeable(d) else d, tuple(ref.shape(n)))
                (pre_layout if n in pre else layout).append(entry)
        post_entries = [e for e in layout if e[0] in post]
        layout = pre_layout + [e for e in layout if e[0] not in post] + post_entries

        with atomic_output_dir(out_dir, force=force) as tmp:
            writer = ShardedWriter(tmp, layout, max_shard, metadata={"mergelab_method": method.name})
            stages: dict[str, float] = {}
            try:
                for si, (plan, views, table) in enumerate(segments):
                    base_view = views[plan.base_index] if plan.base_index is not None else None
                    models = [views[j] for j in plan.model_indices]
                    labels = [f"{plan.spec.sources[j].path} (slices[{si}])" for j in plan.model_indices]
                    g, per = next(iter(table.values()))
                    st = run_merge(method, base_view, models, g, per, recipe.compat, writer.write, out_dtype=out_dtype,
                                   device=device or "cpu", compute_dtype=compute_dtype, threads=threads,
                                   progress=progress, labels=labels,
                                   base_label=f"{plan.spec.sources[plan.base_index].path} (slices[{si}])"
                                   if plan.base_index is not None else "base",
                                   block_elements=block_elements or BLOCK_ELEMENTS, resolve=table.__getitem__,
                                   round_dtype=round_dtype)
                    for k, v in st.items():
                        stages[k] = stages.get(k, 0.0) + v
            except BaseException:
                writer.abort()
                raise
            writer.close()
            src = first.spec.sources[first.base_index if first.base_index is not None else 0].path
            tok = recipe.tokenizer_source
            copy_model_files(model_folder(recipe.base_model or src), tmp,
                             model_folder(tok) if tok and tok != "base" else None)
            _fix_config(tmp / "config.json", out_dtype, source_layers, layers_of_path(layers_of, src))
            (tmp / "mergelab_recipe.yaml").write_text(yaml.safe_dump({**recipe.raw, "compat": recipe.compat},
                                                                     sort_keys=False))
        parameters = sum(_prod(s) for _, _, s in layout)
        merged = sum(1 for _, d, _ in layout if d.is_floating_point)
        return MergeSummary(method=method.name, compat=recipe.compat, tensors=len(layout), merged=merged,
                            copied=len(layout) - merged, parameters=parameters,
                            seconds=time.perf_counter() - started, out_dir=Path(out_dir).expanduser().resolve(),
                            bytes_written=writer.total_bytes, shards=len(writer.filenames), stages=stages,
                            notes=notes)
    finally:
        for c in ckpts.values():
            c.close()


def layers_of_path(layers_of: dict, path: str) -> int:
    return next(n for q, n in layers_of.items() if _same_path(q, path))


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fix_config(path: Path, dtype, source_layers: list[int], n_source: int) -> None:
    """``num_hidden_layers`` = the output's layers; lists with one entry per source layer re-indexed."""

    def fix(d: dict) -> None:
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == n_source and n_source > 0 and key != "architectures":
                d[key] = [value[i] for i in source_layers]
            elif isinstance(value, dict):
                fix(value)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in d and isinstance(d[key], int) and d[key] == n_source:
                d[key] = len(source_layers)
    edit_config(path, fix)
    set_config_dtype(path, None if dtype is None else DTYPE_NAMES[dtype])
