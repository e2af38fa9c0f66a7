"""The one place that reads and writes checkpoints.

``checkpoint`` (lazy reading of safetensors, ``.bin`` with ``weights_only=True``, state dicts),
``lora`` (PEFT adapters read as base + B @ A), ``writer`` (sharded safetensors filled tensor by
tensor), ``output`` (output folders written beside OUT_DIR and renamed when complete). A new input
format is a new module here that returns a ``Checkpoint``.
"""

from mergelab.io.checkpoint import (DTYPE_NAMES, SAFETENSORS_DTYPES, USER_DTYPES, Checkpoint, PickleFile,
                                    SafetensorsFile, TensorInfo, check_finite, check_finite_state, from_state_dict,
                                    load_state_dict, model_folder, open_checkpoint, parse_dtype, parse_size)
from mergelab.io.output import (MARKER, MODEL_SIDE_FILES, TOKENIZER_FILES, atomic_output_dir, check_output_dir,
                                claim_output, copy_model_files, finish_output, fix_modes, replace_dir)
from mergelab.io.writer import ShardedWriter, save_state_dict

__all__ = ["DTYPE_NAMES", "SAFETENSORS_DTYPES", "USER_DTYPES", "Checkpoint", "PickleFile", "SafetensorsFile",
           "TensorInfo", "from_state_dict", "load_state_dict", "model_folder", "open_checkpoint", "parse_dtype",
           "parse_size", "MODEL_SIDE_FILES", "TOKENIZER_FILES", "atomic_output_dir", "copy_model_files",
           "replace_dir", "ShardedWriter", "save_state_dict", "check_finite", "check_finite_state", "MARKER",
           "check_output_dir", "claim_output", "finish_output", "fix_modes"]
