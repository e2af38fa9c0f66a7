"""mergelab: merge fine-tunings of one foundation model into one better model.

The public API is loaded on first use (PEP 562), so ``import mergelab`` and the CLI's ``--help`` do not
import torch.
"""

from __future__ import annotations

from mergelab._lazy import lazy_exports

__version__ = "0.1.0"

# module -> the public names it defines
_WHERE = {
    "mergelab.engine.streaming": ("merge", "merge_state_dicts"),
    "mergelab.engine.output_folder": ("MergeSummary",),
    "mergelab.engine.recipe": ("load_recipe",),
    "mergelab.errors": ("MergelabError",),
    "mergelab.io.checkpoint": ("open_checkpoint", "load_state_dict"),
    "mergelab.methods": ("list_methods", "get_method"),
}
__all__, __getattr__, __dir__ = lazy_exports("mergelab", globals(), _WHERE)
