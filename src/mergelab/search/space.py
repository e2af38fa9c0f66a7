"""From the search space to one trial's merge: Optuna suggestions (define-by-run, so a parameter of one
method of the choice exists only in its trials), grid points, and per-layer groups of tensor names."""
from __future__ import annotations

import itertools
import re
from typing import Any, Sequence

from mergelab.errors import MergelabError
from mergelab.search.config import Dim, SearchConfig

# "encoder.layer.3.", "h.3.", "model.layers.3.", "blocks.3." ...: the layer index of a tensor name
LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")
OTHER = "other"


def layer_groups(names: Sequence[str], granularity: int, other: bool) -> tuple[list[str], dict[str, str]]:
    """Group labels in order ("L0-1", ...) and tensor name -> label (tensors outside layers: "other" when
    ``other``, else absent: their task vectors are not scaled)."""
    idx = {}
    for n in names:
        m = LAYER_RE.search(n)
        if m:
            idx[n] = int(m.group(1))
    if not idx:
        raise MergelabError("space.layers: no tensor name has a layer index (like 'layers.3.' or 'h.3.')")
    top = max(idx.values())
    labels = []
    for start in range(0, top + 1, granularity):
        end = min(start + granularity - 1, top)
        labels.append(f"L{start}" if start == end else f"L{start}-{end}")
    of = {n: labels[i // granularity] for n, i in idx.items()}
    if other:
        labels.append(OTHER)
        of.update({n: OTHER for n in names if n not in idx})
    return labels, of


def layer_param_names(cfg: SearchConfig, labels: Sequence[str]) -> list[str]:
    if cfg.layers is None:
        return []
    if cfg.layers.per_model:
        return [f"layer.{l}.m{i}" for l in labels for i in range(cfg.n_models)]
    return [f"layer.{l}" for l in labels]


def _suggest(trial, name: str, d: Dim):
    if d.values is not None:
        return trial.suggest_categorical(name, d.values)
    return trial.suggest_float(name, d.low, d.high, log=d.log)


def suggest(trial, cfg: SearchConfig, labels: Sequence[str]) -> dict[str, Any]:
    """The flat parameters of one trial (the names of the trial table's columns)."""
    out: dict[str, Any] = {}
    method = trial.suggest_categorical("method", cfg.methods) if len(cfg.methods) > 1 else cfg.methods[0]
    out["method"] = method
    for d in cfg.dims:
        if not d.methods or method in d.methods:
            out[d.name] = _suggest(trial, d.name, d)
    for name, d in cfg.per_model.items():
        if not d.methods or method in d.methods:
            for i in range(cfg.n_models):
                out[f"{name}[{i}]"] = _suggest(trial, f"{name}[{i}]", d)
    for pname in layer_param_names(cfg, labels):
        out[pname] = _suggest(trial, pname, cfg.layers.dim)
    return out


def grid_points(cfg: SearchConfig, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Every point of the grid, method by method (a parameter another method lacks is not multiplied in)."""
    points = []
    for method in cfg.methods:
        axes: list[tuple[str, list]] = []
        for d in cfg.dims:
            if not d.methods or method in d.methods:
                axes.append((d.name, d.grid()))
        for name, d in cfg.per_model.items():
            if not d.methods or method in d.methods:
                axes += [(f"{name}[{i}]", d.grid()) for i in range(cfg.n_models)]
        axes += [(p, cfg.layers.dim.grid()) for p in layer_param_names(cfg, labels)]
        for values in itertools.product(*(v for _, v in axes)):
            point = {"method": method} if len(cfg.methods) > 1 else {}
            point.update(dict(zip((k for k, _ in axes), values)))
            points.append(point)
    return points


def to_merge(cfg: SearchConfig, flat: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """A trial's flat parameters as a merge: method, global and per-model parameters, layer coefficients."""
    from mergelab.methods import get_method
    recipe = cfg.recipe
    method = get_method(flat.get("method", cfg.methods[0]))
    params = {k: v for k, v in (recipe.get("parameters") or {}).items() if method.param(k) is not None}
    models = [dict(m.get("parameters") or {}) for m in recipe["models"]]
    models = [{k: v for k, v in mp.items() if method.param(k) is not None} for mp in models]
    for d in cfg.dims:
        if d.name in flat:
            params[d.name] = flat[d.name]
    for name in cfg.per_model:
        for i in range(cfg.n_models):
            if f"{name}[{i}]" in flat:
                models[i][name] = flat[f"{name}[{i}]"]
    coeffs = None
    if cfg.layers is not None:
        if cfg.layers.per_model:
            coeffs = [{l: float(flat[f"layer.{l}.m{i}"]) for l in labels} for i in range(cfg.n_models)]
        else:
            shared = {l: float(flat[f"layer.{l}"]) for l in labels}
            coeffs = [shared for _ in range(cfg.n_models)]
    return {"method": method.name, "params": params, "model_params": models, "layers": coeffs}
