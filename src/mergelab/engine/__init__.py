"""Merges of checkpoints on disk: recipe -> plan -> tensors -> kernels -> writer.

``recipe`` parses and validates a mergekit-layout recipe before any tensor is read; ``streaming``
checks the models' structure, plans the output, merges tensor by tensor on a thread pool and writes
through ``mergelab.io``; ``lora_export`` writes a merge back as a PEFT adapter of a chosen rank.
"""

from mergelab.engine.recipe import Recipe, load_recipe
from mergelab.engine.streaming import MergeSummary, check_structure, merge, merge_state_dicts, run_merge

__all__ = ["Recipe", "load_recipe", "MergeSummary", "check_structure", "merge", "merge_state_dicts", "run_merge"]
