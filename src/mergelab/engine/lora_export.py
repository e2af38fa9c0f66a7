"""Merged LoRA adapters as outputs: merge adapters (or models) with any method and write the merged
delta back as a PEFT adapter of a chosen rank (the best rank-R approximation of each delta, by SVD)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from mergelab.errors import MergelabError
from mergelab.io import Checkpoint, TensorInfo, atomic_output_dir, open_checkpoint, parse_size, save_state_dict
from mergelab.io.model_card import write_model_card
from mergelab.io.lora import CONFIG, PREFIX, LoraCheckpoint, is_adapter, load_adapter
from mergelab.kernels import svd as SK

Progress = Callable[[str, int, int], None]
# relative truncation error ||dW - dW_R||_F / ||dW||_F above which the summary carries a warning
WARN_ERROR = 0.05


class _Subset(Checkpoint):
    """A view of a checkpoint restricted to some tensor names."""

    def __init__(self, inner: Checkpoint, names: list[str]):
        super().__init__(inner.path, {}, {})
        self.inner, self.names = inner, [n for n in inner.keys() if n in set(names)]

    def keys(self) -> list[str]:
        return list(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def info(self, name: str) -> TensorInfo:
        return self.inner.info(name)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.inner.get(name, rows)

    @property
    def fresh_tensors(self) -> bool:
        return self.inner.fresh_tensors

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- merged adapter of a chosen rank

@dataclass
class AdapterSummary:
    method: str
    rank: int                      # the adapter's r: --rank clipped to the largest module's min(d_out, d_in)
    modules: int
    out_dir: Path
    seconds: float
    max_relative_error: float      # worst ||delta - rank-R approximation||_F / ||delta||_F over modules
    mean_relative_error: float
    bytes_written: int
    requested_rank: int = 0
    overall_relative_error: float = 0.0           # over all modules: sqrt(sum err^2 norm^2 / sum norm^2)
    layer_errors: dict = dataclasses.field(default_factory=dict)   # {module: relative error}
    layer_ranks: dict = dataclasses.field(default_factory=dict)    # {module: rank}, where clipped below r
    warnings: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir)
        return d


def _warnings(requested: int, rank: int, errors: dict[str, float], warn_error: float, method: str) -> list[str]:
    out = []
    if rank < requested:
        out.append(f"--rank {requested} is above every module's min(d_out, d_in): the adapter has rank {rank}")
    high = sorted((e, m) for m, e in errors.items() if e > warn_error)
    if high:
        worst, name = high[-1]
        hint = ("sparsifying and SVD methods give full-rank merged deltas; raise --rank or merge with "
                "task_arithmetic/average, whose merged delta has at most the sum of the adapters' ranks")
        out.append(f"rank-{rank} truncation loses more than {warn_error:.0%} of the merged delta "
                   f"(||dW - dW_R|| / ||dW||) in {len(high)} of {len(errors)} modules, worst {worst:.1%} "
                   f"in {name!r}: the adapter is not the merged model ({method}); {hint}")
    return out


def _lora_config(first: dict, rank: int, targets: list[str], fan_in_fan_out: bool) -> dict:
    config = dict(first)
    config.update({
        "r": rank, "lora_alpha": rank, "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {},
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "bias": "none", "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "inference_mode": True,
        "peft_type": "LORA",
    })
    return config


def merge_to_adapter(recipe, out_dir: str | Path, rank: int, *, force: bool = False, compat: str | None = None,
                     device: str | None = None, threads: int | None = None,
                     progress: Progress | None = None, warn_error: float = WARN_ERROR) -> AdapterSummary:
    """Merge the adapters a recipe lists with its method; write a PEFT adapter of rank ``rank``.

    The merge is the same as ``mergelab merge`` on the adapters (dense deltas, any method); each adapted
    module's merged delta is then replaced by its best rank-``rank`` approximation (truncated SVD,
    Eckart-Young), stored as ``B = U sqrt(S)``, ``A = sqrt(S) Vh`` with ``lora_alpha = r``. A module's
    rank is at most its ``min(d_out, d_in)`` (``rank_pattern`` holds those below the adapter's ``r``).
    The summary has each module's relative truncation error and warnings (error above ``warn_error``,
    rank clipped); a library prints nothing, the CLI shows them.
    """
    from mergelab.engine.streaming import check_structure, run_merge
    from mergelab.methods import get_method
    from mergelab.engine.recipe import Recipe, load_recipe

    started = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergelabError(f"--rank must be a positive integer, got {rank!r}")
    if not (isinstance(warn_error, (int, float)) and warn_error >= 0):
        raise MergelabError(f"--warn-error must be a number >= 0, got {warn_error!r}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, compat=compat)
    method = get_method(recipe.method)
    g, per = recipe.resolved()
    where = str(recipe.source or "recipe")
    if recipe.base_model is None:
        raise MergelabError(f"{where}: lora-merge needs a 'base_model' (the model the adapters apply to)")
    for i, m in enumerate(recipe.models):
        if not is_adapter(m.path):
            raise MergelabError(f"{where}: models[{i}] ({m.path}) is not a PEFT adapter folder; lora-merge "
                                "merges adapters (use 'mergelab merge' for full models)")
    base = open_checkpoint(recipe.base_model)
    adapters: list[LoraAdapter] = []
    try:
        for m in recipe.models:
            adapters.append(load_adapter(m.path, base))
        for ad in adapters:
            if ad.replaced or ad.bias_deltas:
                name = next(iter(ad.replaced or ad.bias_deltas))
                raise MergelabError(f"{ad.path}: stores tensor {name!r} in full (modules_to_save or trained biases); "
                                    "a merged LoRA adapter cannot hold it, use 'mergelab merge' for a full model")
        fifo = {bool(ad.config.get("fan_in_fan_out", False)) for ad in adapters}
        if len(fifo) > 1:
            raise MergelabError(f"{where}: the adapters disagree on fan_in_fan_out")
        targets: dict[str, LoraModule] = {}
        for ad in adapters:
            for t, lm in ad.modules.items():
                prev = targets.setdefault(t, lm)
                if prev.transpose != lm.transpose or prev.embedding != lm.embedding:
                    raise MergelabError(f"{ad.path}: module {lm.module!r} has a different layout than in "
                                        f"{adapters[0].path}")
        models: list[Checkpoint] = [LoraCheckpoint(ad, base) for ad in adapters]
        check_structure(base, models, recipe.base_model, [m.path for m in recipe.models])
        merge_base: Checkpoint = base
        if method.global_trim is None or method.global_trim(g, per, recipe.compat) is None:
            # every tensor no adapter touches merges to the base: only a whole-model trim (TIES) needs them
            merge_base = _Subset(base, list(targets))
            models = [_Subset(m, list(targets)) for m in models]

        factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, float]] = {}   # A, B, error, ||dW||
        lock = threading.Lock()
        changed: list[str] = []

        def factorise(job, merged: torch.Tensor) -> None:
            if job.name not in targets:
                scale = float(job.base.abs().max()) if job.base.numel() else 0.0
                if job.base.numel() and float((merged - job.base).abs().max()) > 1e-5 * max(1.0, scale):
                    with lock:
                        changed.append(job.name)
                return
            lm = targets[job.name]
            delta = merged - job.base
            mat = delta.T if lm.transpose else delta      # the layout of B @ A
            r = min(rank, *mat.shape)
            u, s, vh = SK.svd(mat, r, "auto", generator=job.generator(0))
            root = s.sqrt()
            b = torch.zeros(mat.shape[0], r, dtype=torch.float32)
            a = torch.zeros(r, mat.shape[1], dtype=torch.float32)
            b[:, : s.numel()] = (u * root).cpu()
            a[: s.numel()] = (root[:, None] * vh).cpu()
            approx = b @ a
            norm = float(torch.linalg.matrix_norm(mat))
            err = float(torch.linalg.matrix_norm(mat.cpu() - approx)) / norm if norm > 0 else 0.0
            with lock:
                factors[job.name] = (a, b, err, norm)

        def merge_tensor(job):
            merged = method.merge_tensor(job)
            factorise(job, merged)
            return merged

        # whole tensors: each merged delta is factorised by one SVD
        # (and never through the fused linear pass, which would not call merge_tensor)
        wrapped = dataclasses.replace(method, merge_tensor=merge_tensor, chunkable=lambda params, compat: False,
                                      linear_combination=None)
        run_merge(wrapped, merge_base, models, g, per, recipe.compat, lambda name, t, row: None,
                  out_dtype=torch.float32,
                  device=device or "cpu", threads=threads, progress=progress,
                  labels=[m.path for m in recipe.models], base_label=recipe.base_model)
        if changed:
            raise MergelabError(f"{method.name} changed tensor {sorted(changed)[0]!r}, which no adapter touches; "
                                "the result is not a LoRA adapter (use 'mergelab merge' for a full model)")

        tensors: dict[str, torch.Tensor] = {}
        layer_errors = {targets[t].module: factors[t][2] for t in sorted(targets)}
        adapter_rank = max((factors[t][0].shape[0] for t in targets), default=rank)
        layer_ranks = {targets[t].module: factors[t][0].shape[0] for t in sorted(targets)
                       if factors[t][0].shape[0] < adapter_rank}
        for t, lm in sorted(targets.items()):
            a, b, _, _ = factors[t]
            if lm.embedding:
                tensors[f"{PREFIX}{lm.module}.lora_embedding_A"] = a.contiguous()
                tensors[f"{PREFIX}{lm.module}.lora_embedding_B"] = b.contiguous()
            else:
                tensors[f"{PREFIX}{lm.module}.lora_A.weight"] = a.contiguous()
                tensors[f"{PREFIX}{lm.module}.lora_B.weight"] = b.contiguous()
        config = _lora_config(adapters[0].config, adapter_rank, sorted(lm.module for lm in targets.values()),
                              fifo.pop())
        # PEFT matches pattern keys as regular expressions on the module name (``(.*\.)?key$``)
        config["rank_pattern"] = {re.escape(m): r for m, r in layer_ranks.items()}
        config["alpha_pattern"] = dict(config["rank_pattern"])
        with atomic_output_dir(out_dir, force=force, inputs=recipe.input_paths(), command="lora-merge") as tmp:
            written = save_state_dict(tensors, tmp, parse_size("1000TB"), metadata={"mergelab_method": method.name})
            (tmp / "model.safetensors").rename(tmp / "adapter_model.safetensors")
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
            (tmp / "mergelab_recipe.yaml").write_text(yaml.safe_dump(
                {**recipe.raw, "compat": recipe.compat, "lora_rank": adapter_rank, "resolved_parameters": g,
                 "resolved_model_parameters": per,
                 "truncation_errors": {m: float(f"{e:.4g}") for m, e in layer_errors.items()}}, sort_keys=False))
            write_model_card(tmp, method=method.name, base_model=recipe.base_model,
                             models=[m.label for m in recipe.models], library_name="peft", kind="LoRA adapter merge",
                             tags=["lora"], recipe={**recipe.raw, "lora_rank": adapter_rank, "resolved_parameters": g},
                             extra=f"A PEFT LoRA adapter of rank {adapter_rank} on the base model.")
        errors = list(layer_errors.values())
        total = sum(n * n for _, _, _, n in factors.values())
        lost = sum((e * n) ** 2 for _, _, e, n in factors.values())
        return AdapterSummary(method=method.name, rank=adapter_rank, modules=len(targets),
                              out_dir=Path(out_dir).expanduser().resolve(), seconds=time.perf_counter() - started,
                              max_relative_error=max(errors, default=0.0),
                              mean_relative_error=sum(errors) / len(errors) if errors else 0.0,
                              bytes_written=written, requested_rank=rank,
                              overall_relative_error=math.sqrt(lost / total) if total > 0 else 0.0,
                              layer_errors=layer_errors, layer_ranks=layer_ranks,
                              warnings=_warnings(rank, adapter_rank, layer_errors, warn_error, method.name))
    finally:
        for ad in adapters:
            ad.close()
        base.close()
