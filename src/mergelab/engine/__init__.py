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

from mergelab._lazy import lazy_exports

_WHERE = {
    "mergelab.engine.recipe": ("Recipe", "load_recipe"),
    "mergelab.engine.streaming": ("check_structure", "merge", "merge_state_dicts", "run_merge"),
    "mergelab.engine.output_folder": ("MergeSummary",),
}
__all__, __getattr__, __dir__ = lazy_exports("mergelab.engine", globals(), _WHERE)
