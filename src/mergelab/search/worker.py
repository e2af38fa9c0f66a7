"""One trial, where it runs (this process or a Ray worker): merge in memory from task vectors read once
per worker, score, and report seconds. ``naive`` trials merge to disk and reload instead (the reference
the cached path is measured against, in the same run)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError

# per process: context key -> _State (base, models, task vectors, evaluators); a Ray worker keeps it
# between the trials it runs
_CACHE: dict[str, "_State"] = {}


class _State:
    def __init__(self, ctx: dict[str, Any]):
        from mergelab.io import load_state_dict
        from mergelab.search.objectives import make_evaluator
        t0 = time.perf_counter()
        recipe = ctx["recipe"]
        self.base_path = recipe.get("base_model")
        self.base = load_state_dict(self.base_path) if self.base_path else None
        self.models = [load_state_dict(m["model"]) for m in recipe["models"]]
        self.deltas = None
        if ctx["layer_of"] is not None:          # task vectors of the scaled tensors, float32, kept
            of = ctx["layer_of"]
            self.deltas = [{k: m[k].float() - self.base[k].float() for k in of if self.base[k].is_floating_point()}
                           for m in self.models]
        folder = self.base_path if self.base_path and Path(self.base_path).is_dir() else None
        self.evaluators = [make_evaluator(o, folder) for o in ctx["objectives"]]
        self.load_seconds = time.perf_counter() - t0


def scaled_models(base: dict, models: list[dict], deltas: list[dict] | None, layer_of: dict | None,
                  coeffs: list[dict] | None) -> list[dict]:
    """Each model with the task vectors of its layers scaled: base + c * (model - base), in float32; a
    tensor whose coefficient is 1 is the model's own tensor."""
    if coeffs is None:
        return models
    out = []
    for i, m in enumerate(models):
        sd = dict(m)
        for name, label in layer_of.items():
            c = coeffs[i].get(label, 1.0)
            if c != 1.0 and name in deltas[i]:
                sd[name] = base[name].float() + c * deltas[i][name]
        out.append(sd)
    return out


def _merge(ctx: dict, st: _State, merge_spec: dict) -> dict:
    from mergelab.engine.streaming import merge_state_dicts
    from mergelab.io import parse_dtype
    recipe = ctx["recipe"]
    models = scaled_models(st.base, st.models, st.deltas, ctx["layer_of"], merge_spec["layers"])
    out_dtype = parse_dtype(recipe.get("out_dtype") or recipe.get("dtype"))
    return merge_state_dicts(st.base, models, merge_spec["method"], merge_spec["params"],
                             merge_spec["model_params"], compat=recipe.get("compat", "paper"), threads=1,
                             out_dtype=out_dtype)


def write_model_folder(sd: dict, folder: Path, base_path: str | None) -> None:
    from mergelab.io import copy_model_files, model_folder, save_state_dict
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, folder)
    src = model_folder(base_path) if base_path else None
    copy_model_files(src, folder)


def _score(ctx: dict, st: _State, sd: dict | None, folder_of) -> list[float]:
    values: list[float] = []
    folder = None
    try:
        for ev in st.evaluators:
            if ev.needs_folder or sd is None:
                if folder is None:
                    folder = folder_of()
                values += ev.score_folder(str(folder))
            else:
                values += ev.score_state(sd)
    finally:
        if folder is not None and sd is not None:
            shutil.rmtree(folder.parent, ignore_errors=True)
    return values


def run_trial(job: dict) -> dict:
    """Picklable entry point of both executors: returns the trial's record (values or error, seconds)."""
    import torch
    ctx = job["context"]
    threads = int(ctx.get("threads", 1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rec = {"number": job["number"], "params": job["params"], "pid": os.getpid(), "naive": job.get("naive", False)}
    t0 = time.perf_counter()
    try:
        st = _CACHE.get(ctx["key"])
        rec["cache_hit"] = st is not None
        if st is None:
            _CACHE.clear()           # one search per worker at a time
            st = _CACHE[ctx["key"]] = _State(ctx)
            rec["load_seconds"] = st.load_seconds
        t1 = time.perf_counter()
        if job.get("naive"):
            rec["values"] = _naive(ctx, st, job["merge"])
        else:
            sd = _merge(ctx, st, job["merge"])
            rec["merge_seconds"] = time.perf_counter() - t1

            def folder_of() -> Path:
                d = Path(tempfile.mkdtemp(prefix="mergelab-trial-", dir=ctx.get("tmp_dir"))) / "model"
                write_model_folder(sd, d, st.base_path)
                return d
            rec["values"] = _score(ctx, st, sd, folder_of)
        rec["trial_seconds"] = time.perf_counter() - t1
        rec["state"] = "complete"
    except MergelabError as e:
        rec.update(state="fail", error=str(e))
    except Exception as e:  # an objective's own failure fails the trial, not the search
        rec.update(state="fail", error=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=3))
    finally:
        torch.set_num_threads(before)
    rec["seconds"] = time.perf_counter() - t0
    rec["node"] = _node()
    return rec


def _node() -> str | None:
    """The Ray node this trial ran on (None outside Ray)."""
    import sys
    ray = sys.modules.get("ray")
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:
        return None


def write_inputs(ctx: dict, st_base: dict, st_models: list[dict], deltas, merge_spec: dict, root: Path) -> list[str]:
    """The scaled models as folders (safetensors + the base's config), so that a plain recipe names them."""
    from mergelab.io import save_state_dict
    if merge_spec["layers"] is None:
        return [entry["model"] for entry in ctx["recipe"]["models"]]
    models = scaled_models(st_base, st_models, deltas, ctx["layer_of"], merge_spec["layers"])
    paths = []
    for i, sd in enumerate(models):
        d = root / f"model{i}"
        d.mkdir(parents=True, exist_ok=True)
        save_state_dict(sd, d)
        base = ctx["recipe"].get("base_model")
        if base and (Path(base) / "config.json").is_file():
            shutil.copy2(Path(base) / "config.json", d / "config.json")
        paths.append(str(d))
    return paths


def plain_recipe(ctx: dict, merge_spec: dict, model_paths: list[str]) -> dict:
    """A mergekit-layout recipe of one trial (no search keys, one number per parameter)."""
    recipe = ctx["recipe"]
    out: dict[str, Any] = {}
    if recipe.get("base_model"):
        out["base_model"] = recipe["base_model"]
    out["models"] = []
    for p, mp in zip(model_paths, merge_spec["model_params"]):
        out["models"].append({"model": p, **({"parameters": dict(mp)} if mp else {})})
    out["merge_method"] = merge_spec["method"]
    if merge_spec["params"]:
        out["parameters"] = dict(merge_spec["params"])
    for k in ("dtype", "out_dtype", "tokenizer_source", "shard_size"):
        if k in recipe:
            out[k] = recipe[k]
    # the semantics the trials merged with, written out: a recipe without 'compat' means mergekit's
    out["compat"] = recipe.get("compat", "paper")
    return out


def _naive(ctx: dict, st: _State, merge_spec: dict) -> list[float]:
    """Merge to disk from the checkpoints (scaled inputs written first) and score by reloading."""
    from mergelab.engine.streaming import merge
    tmp = Path(tempfile.mkdtemp(prefix="mergelab-naive-", dir=ctx.get("tmp_dir")))
    try:
        from mergelab.io import load_state_dict
        base = load_state_dict(st.base_path) if merge_spec["layers"] is not None else None
        models = [load_state_dict(m["model"]) for m in ctx["recipe"]["models"]] if base is not None else None
        deltas = None
        if base is not None:
            of = ctx["layer_of"]
            deltas = [{k: m[k].float() - base[k].float() for k in of if base[k].is_floating_point()}
                      for m in models]
        paths = write_inputs(ctx, base, models, deltas, merge_spec, tmp / "inputs")
        merge(plain_recipe(ctx, merge_spec, paths), tmp / "model", threads=1)
        return _score(ctx, st, None, lambda: tmp / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
