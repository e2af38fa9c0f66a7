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

from mergelab._lazy import lazy_exports

_WHERE = {
    "mergelab.io.checkpoint": ("DTYPE_NAMES", "SAFETENSORS_DTYPES", "USER_DTYPES", "Checkpoint", "PickleFile",
                               "SafetensorsFile", "TensorInfo", "check_finite", "check_finite_state",
                               "from_state_dict", "load_state_dict", "open_checkpoint", "parse_dtype"),
    "mergelab.io.safetensors_format": ("model_folder", "parse_size"),
    "mergelab.io.output": ("MARKER", "MODEL_SIDE_FILES", "TOKENIZER_FILES", "atomic_output_dir", "check_output_dir",
                           "claim_output", "copy_model_files", "finish_output", "fix_modes", "replace_dir"),
    "mergelab.io.writer": ("ShardedWriter", "save_state_dict"),
}
__all__, __getattr__, __dir__ = lazy_exports("mergelab.io", globals(), _WHERE)
