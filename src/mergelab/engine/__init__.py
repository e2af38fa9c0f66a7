"""Merges of checkpoints on disk: recipe -> plan -> tensors -> kernels -> writer.

``recipe`` parses and validates a mergekit-layout recipe before any tensor is read; ``streaming``
checks the models' structure, plans the output, merges tensor by tensor on a thread pool and writes
through ``mergelab.io``; ``lora_export`` writes a merge back as a PEFT adapter of a chosen rank;
``linear_lane`` runs mergekit's task arithmetic on numpy without importing torch; ``output_folder``
finishes an output folder the same way for both.

The names below are imported on first use, so that loading a recipe and the torch-free lane start
without torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "mergelab.engine.recipe": ("Recipe", "load_recipe"),
    "mergelab.engine.streaming": ("check_structure", "merge", "merge_state_dicts", "run_merge"),
    "mergelab.engine.output_folder": ("MergeSummary",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mergelab.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
