"""Merged LoRA adapters as outputs: merge adapters (or models) with any method and write the merged
delta back as a PEFT adapter of a chosen rank (the best rank-R approximation of each delta, by SVD)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from mergelab.errors import MergelabError
from mergelab.io import Checkpoint, TensorInfo, atomic_output_dir, open_checkpoint, parse_size, save_state_dict
from mergelab.io.lora import CONFIG, PREFIX, LoraCheckpoint, is_adapter, load_adapter
from mergelab.kernels import svd as SK

Progress = Callable[[str, int, int], None]


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
    rank: int
    modules: int
    out_dir: Path
    seconds: float
    max_relative_error: float      # worst ||delta - rank-R approximation||_F / ||delta||_F over modules
    mean_relative_error: float
    bytes_written: int

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir)
        return d


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
                     progress: Progress | None = None) -> AdapterSummary:
    """Merge the adapters a recipe lists with its method; write a PEFT adapter of rank ``rank``.

    The merge is the same as ``mergelab merge`` on the adapters (dense deltas, any method); each adapted
    module's merged delta is then replaced by its best rank-``rank`` approximation (truncated SVD,
    Eckart-Young), stored as ``B = U sqrt(S)``, ``A = sqrt(S) Vh`` with ``lora_alpha = r``.
    """
    from mergelab.engine.streaming import check_structure, run_merge
    from mergelab.methods import get_method
    from mergelab.engine.recipe import Recipe, load_recipe

    started = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergelabError(f"--rank must be a positive integer, got {rank!r}")
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

        factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
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
            u, s, vh = SK.svd(mat, rank, "auto", generator=job.generator(0))
            root = s.sqrt()
            b = torch.zeros(mat.shape[0], rank, dtype=torch.float32)
            a = torch.zeros(rank, mat.shape[1], dtype=torch.float32)
            b[:, : s.numel()] = (u * root).cpu()
            a[: s.numel()] = (root[:, None] * vh).cpu()
            approx = b @ a
            norm = float(torch.linalg.matrix_norm(mat))
            err = float(torch.linalg.matrix_norm(mat.cpu() - approx)) / norm if norm > 0 else 0.0
            with lock:
                factors[job.name] = (a, b, err)

        def merge_tensor(job):
            merged = method.merge_tensor(job)
            factorise(job, merged)
            return merged

        # whole tensors: each merged delta is factorised by one SVD
        wrapped = dataclasses.replace(method, merge_tensor=merge_tensor, chunkable=lambda params, compat: False)
        run_merge(wrapped, merge_base, models, g, per, recipe.compat, lambda name, t, row: None,
                  out_dtype=torch.float32,
                  device=device or "cpu", threads=threads, progress=progress,
                  labels=[m.path for m in recipe.models], base_label=recipe.base_model)
        if changed:
            raise MergelabError(f"{method.name} changed tensor {sorted(changed)[0]!r}, which no adapter touches; "
                                "the result is not a LoRA adapter (use 'mergelab merge' for a full model)")

        tensors: dict[str, torch.Tensor] = {}
        for t, lm in sorted(targets.items()):
            a, b, _ = factors[t]
            if lm.embedding:
                tensors[f"{PREFIX}{lm.module}.lora_embedding_A"] = a.contiguous()
                tensors[f"{PREFIX}{lm.module}.lora_embedding_B"] = b.contiguous()
            else:
                tensors[f"{PREFIX}{lm.module}.lora_A.weight"] = a.contiguous()
                tensors[f"{PREFIX}{lm.module}.lora_B.weight"] = b.contiguous()
        config = _lora_config(adapters[0].config, rank, sorted(lm.module for lm in targets.values()), fifo.pop())
        with atomic_output_dir(out_dir, force=force, inputs=recipe.input_paths(), command="lora-merge") as tmp:
            written = save_state_dict(tensors, tmp, parse_size("1000TB"), metadata={"mergelab_method": method.name})
            (tmp / "model.safetensors").rename(tmp / "adapter_model.safetensors")
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
            (tmp / "mergelab_recipe.yaml").write_text(yaml.safe_dump(
                {**recipe.raw, "compat": recipe.compat, "lora_rank": rank, "resolved_parameters": g,
                 "resolved_model_parameters": per}, sort_keys=False))
        errors = [e for _, _, e in factors.values()]
        return AdapterSummary(method=method.name, rank=rank, modules=len(targets),
                              out_dir=Path(out_dir).expanduser().resolve(), seconds=time.perf_counter() - started,
                              max_relative_error=max(errors, default=0.0),
                              mean_relative_error=sum(errors) / len(errors) if errors else 0.0,
                              bytes_written=written)
    finally:
        for ad in adapters:
            ad.close()
        base.close()
