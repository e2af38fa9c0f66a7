"""What a merge writes besides the weights, and what it reports: shared by the torch engine
(``streaming``) and the torch-free lane (``linear_lane``), so that both leave the same folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import yaml

from mergelab.io.chat_template import resolve_chat_template, write_chat_template
from mergelab.io.model_card import write_model_card
from mergelab.io.output import copy_model_files
from mergelab.io.safetensors_format import model_folder


@dataclass
class MergeSummary:
    method: str
    compat: str
    tensors: int
    merged: int
    copied: int
    parameters: int
    seconds: float
    out_dir: Path | None = None
    bytes_written: int = 0
    shards: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)     # what the recipe had that this merge ignored, as mergekit
    engine: str = "torch"        # "numpy": the torch-free lane (``linear_lane``) computed it

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir) if self.out_dir else None
        return d


def parameter_count(shapes: Sequence[Sequence[int]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def finish_folder(tmp: Path, recipe, method_name: str, params: dict, model_params: list[dict], static: bool,
                  out_dtype_name: str | None, vocab=None) -> None:
    """Model files, tokenizer, config dtype, chat template, the resolved recipe and the model card of a
    merge's (temporary) output folder, after its weights are written."""
    paths = [m.path for m in recipe.models]
    src_folder = model_folder(recipe.base_model or paths[0])
    tok_folder = None
    if vocab is not None and vocab.identity and recipe.tokenizer.source not in ("base", "union"):
        tok_folder = model_folder(recipe.tokenizer.source)
    copy_model_files(src_folder, tmp, tok_folder)
    if vocab is not None and not vocab.identity:
        vocab.tokenizer.save_pretrained(tmp)
        set_config_value(tmp / "config.json", "vocab_size", vocab.size)
    set_config_dtype(tmp / "config.json", out_dtype_name)
    template = resolve_chat_template(recipe.chat_template, [model_folder(p) for p in [recipe.base_model, *paths] if p])
    if template is not None:
        write_chat_template(tmp, template)
    resolved = {**recipe.raw, "compat": recipe.compat,
                **({"resolved_parameters": params, "resolved_model_parameters": model_params} if static
                   else {"resolved_parameters": "per tensor (gradients or filters)"})}
    (tmp / "mergelab_recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    write_model_card(tmp, method=method_name, base_model=recipe.base_model, models=[m.label for m in recipe.models],
                     recipe=resolved)


def edit_config(config_path: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to config.json, if there is one that parses (others are copied as they are)."""
    if not config_path.exists():
        return
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        return
    change(config)
    config_path.write_text(json.dumps(config, indent=2))


def set_config_value(config_path: Path, key: str, value) -> None:
    edit_config(config_path, lambda config: config.__setitem__(key, value))


# safetensors dtype name -> the name config.json uses
CONFIG_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def set_config_dtype(config_path: Path, dtype_name: str | None) -> None:
    """Keep config.json's dtype in step with the written weights (``dtype_name``: "F32", "BF16", ...)."""
    if dtype_name is None:
        return

    def change(config: dict) -> None:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = CONFIG_DTYPE_NAMES[dtype_name]
    edit_config(config_path, change)
