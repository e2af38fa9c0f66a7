"""The one place that reads and writes checkpoints.

``checkpoint`` (lazy reading of safetensors, ``.bin`` with ``weights_only=True``, state dicts),
``lora`` (PEFT adapters read as base + B @ A), ``writer`` (sharded safetensors filled tensor by
tensor), ``output`` (output folders written beside OUT_DIR and renamed when complete),
``safetensors_format`` (headers, dtype names and weight files without torch). A new input format is a
new module here that returns a ``Checkpoint``.

The names below are imported on first use: ``from mergelab.io import parse_size`` needs no torch, so a
merge that runs no torch kernel (``engine.linear_lane``) starts without it.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "mergelab.io.checkpoint": ("DTYPE_NAMES", "SAFETENSORS_DTYPES", "USER_DTYPES", "Checkpoint", "PickleFile",
                               "SafetensorsFile", "TensorInfo", "check_finite", "check_finite_state",
                               "from_state_dict", "load_state_dict", "open_checkpoint", "parse_dtype"),
    "mergelab.io.safetensors_format": ("model_folder", "parse_size"),
    "mergelab.io.output": ("MARKER", "MODEL_SIDE_FILES", "TOKENIZER_FILES", "atomic_output_dir", "check_output_dir",
                           "claim_output", "copy_model_files", "finish_output", "fix_modes", "replace_dir"),
    "mergelab.io.writer": ("ShardedWriter", "save_state_dict"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mergelab.io' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
