"""EMR-Merging folders: one shared model plus light per-task masks and rescalers, loaded per task id.

Layout of the folder ``save_emr`` writes (atomically):

* ``model.safetensors``  the pre-trained weights theta0 (every tensor of the base state dict);
* ``unified.safetensors`` the elected unified task vector tau_uni (float32, merged tensors only);
* ``masks.safetensors``  per task and tensor, the mask M_t bit-packed (uint8, 8 entries a byte,
  key ``"{task}/{tensor}"``);
* ``emr_config.json``    task names, rescalers lam_t, shapes, the extra bytes per task, the model class;
* ``config.json`` and tokenizer files copied from a given folder, so ``load_emr`` can rebuild the model.

``load_emr(folder, task)`` returns the module for one task: theta0 + lam_t * M_t * tau_uni.
The extra cost of a task over the shared part is its packed mask plus one float32.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mergelab.errors import MergelabError
from mergelab.methods.emr import EMRResult, emr_merge

CONFIG_NAME = "emr_config.json"
FORMAT_VERSION = 1


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy().astype(np.bool_)))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.numpy(), count=n).astype(np.bool_)
    return torch.from_numpy(bits).reshape(tuple(shape))


def emr_from_state_dicts(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]
                         ) -> EMRResult:
    """EMR over every floating-point tensor of the base (tau_t = theta_t - theta0)."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    tvs = []
    for i, sd in enumerate(finetuned, 1):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise MergelabError(f"fine-tuned model {i} lacks tensor '{missing[0]}'")
        bad = [k for k in keys if tuple(sd[k].shape) != tuple(base[k].shape)]
        if bad:
            raise MergelabError(f"fine-tuned model {i}: tensor '{bad[0]}' has shape {tuple(sd[bad[0]].shape)}, "
                                f"the base has {tuple(base[bad[0]].shape)}")
        tvs.append({k: sd[k].float() - base[k].float() for k in keys})
    return emr_merge(tvs)


def save_emr(out_dir: str | os.PathLike, base: Mapping[str, torch.Tensor], result: EMRResult,
             task_names: Sequence[str] | None = None, model_folder: str | os.PathLike | None = None,
             model_class: str | None = None, overwrite: bool = False) -> dict:
    """Write the folder; returns its summary (bytes of the shared part and extra bytes per task)."""
    from safetensors.torch import save_file

    from mergelab.io import MODEL_SIDE_FILES, TOKENIZER_FILES, atomic_output_dir
    names = list(task_names or [f"task{t}" for t in range(result.num_tasks)])
    if len(names) != result.num_tasks or len(set(names)) != len(names):
        raise MergelabError(f"EMR: need {result.num_tasks} distinct task names, got {names}")
    with atomic_output_dir(out_dir, force=overwrite) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in base.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in result.unified.items()}, str(tmp / "unified.safetensors"))
        packed = {f"{t}/{k}": pack_mask(m) for t in range(result.num_tasks) for k, m in result.masks[t].items()}
        save_file(packed, str(tmp / "masks.safetensors"))
        extra = [sum(int(packed[f"{t}/{k}"].numel()) for k in result.masks[t]) + 4 for t in range(result.num_tasks)]
        meta = {"format_version": FORMAT_VERSION, "method": "emr", "tasks": names,
                "rescalers": result.rescalers, "model_class": model_class,
                "shapes": {k: list(v.shape) for k, v in result.unified.items()},
                "extra_bytes_per_task": extra,
                "shared_bytes": (tmp / "model.safetensors").stat().st_size + (tmp / "unified.safetensors").stat().st_size}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if model_folder is not None:
            for name in (*MODEL_SIDE_FILES, *TOKENIZER_FILES):
                src = Path(model_folder) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
    return {"out_dir": str(Path(out_dir).expanduser().resolve()), "extra_bytes_per_task": extra,
            "shared_bytes": meta["shared_bytes"], "rescalers": result.rescalers}


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise MergelabError(f"'{folder}' is not an EMR folder: no {CONFIG_NAME}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MergelabError(f"{path}: invalid JSON ({e})") from e
    if meta.get("method") != "emr" or meta.get("format_version") != FORMAT_VERSION:
        raise MergelabError(f"{path}: not an EMR config of format version {FORMAT_VERSION}")
    return meta


def _task_id(meta: dict, task: int | str, where: Path) -> int:
    if isinstance(task, str) and task in meta["tasks"]:
        return meta["tasks"].index(task)
    if isinstance(task, int) and 0 <= task < len(meta["tasks"]):
        return task
    raise MergelabError(f"{where}: no task {task!r} (tasks: {', '.join(meta['tasks'])})")


def load_emr_result(folder: str | os.PathLike) -> tuple[dict, EMRResult, dict]:
    """(base state dict, EMRResult, config) from a folder written by ``save_emr``."""
    from safetensors.torch import load_file
    folder = Path(folder)
    meta = _read_config(folder)
    base = load_file(str(folder / "model.safetensors"))
    unified = load_file(str(folder / "unified.safetensors"))
    packed = load_file(str(folder / "masks.safetensors"))
    masks = []
    for t in range(len(meta["tasks"])):
        masks.append({k: unpack_mask(packed[f"{t}/{k}"], meta["shapes"][k]) for k in unified})
    return base, EMRResult(unified, masks, list(meta["rescalers"])), meta


def load_emr_state_dict(folder: str | os.PathLike, task: int | str) -> dict:
    """theta0 + lam_t * M_t * tau_uni for one task (by index or name), in the base's dtypes."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    folder = Path(folder)
    meta = _read_config(folder)
    t = _task_id(meta, task, folder)
    base = load_file(str(folder / "model.safetensors"))
    unified = load_file(str(folder / "unified.safetensors"))
    with safe_open(str(folder / "masks.safetensors"), "pt") as f:     # only this task's masks are read
        masks = {k: unpack_mask(f.get_tensor(f"{t}/{k}"), meta["shapes"][k]) for k in unified}
    lam = meta["rescalers"][t]
    return {k: ((v.float() + lam * masks[k] * unified[k]).to(v.dtype) if k in unified else v)
            for k, v in base.items()}


def load_emr(folder: str | os.PathLike, task: int | str, model: nn.Module | None = None,
             attn_implementation: str | None = "eager") -> nn.Module:
    """The model for one task: the architecture from ``config.json`` (or the given ``model``
    skeleton) with that task's weights loaded strictly; eval mode."""
    from mergelab.upscale.smile import _build_architecture
    folder = Path(folder)
    meta = _read_config(folder)
    sd = load_emr_state_dict(folder, task)
    if model is None:
        model = _build_architecture(str(folder), meta.get("model_class"), attn_implementation)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        why = " ".join(ln.strip() for ln in str(e).splitlines()[1:])[:300]
        raise MergelabError(f"{folder}: weights do not fit the architecture ({why})") from e
    return model.eval()


class EMRModel(nn.Module):
    """All tasks in memory: ``set_task(t)`` loads task t's weights into the wrapped module (for a
    benchmark that evaluates one task after another)."""

    def __init__(self, module: nn.Module, base: Mapping[str, torch.Tensor], result: EMRResult,
                 task_names: Sequence[str]):
        super().__init__()
        self.module = module
        self._base = dict(base)
        self._result = result
        self.task_names = list(task_names)
        self.task = None

    def set_task(self, task: int | str) -> "EMRModel":
        t = self.task_names.index(task) if isinstance(task, str) else task
        self.module.load_state_dict(self._result.task_state_dict(self._base, t), strict=True)
        self.task = t
        return self

    def forward(self, *args, **kwargs):
        if self.task is None:
            raise MergelabError("EMRModel: call set_task(task) first (EMR needs the task id)")
        return self.module(*args, **kwargs)
