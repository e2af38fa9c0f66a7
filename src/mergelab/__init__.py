"""mergelab: merge fine-tunings of one foundation model into one better model.

The public API is loaded on first use (PEP 562), so ``import mergelab`` and the CLI's ``--help`` do not
import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "merge": "mergelab.engine.streaming",
    "merge_state_dicts": "mergelab.engine.streaming",
    "MergeSummary": "mergelab.engine.output_folder",
    "load_recipe": "mergelab.engine.recipe",
    "MergelabError": "mergelab.errors",
    "open_checkpoint": "mergelab.io.checkpoint",
    "load_state_dict": "mergelab.io.checkpoint",
    "list_methods": "mergelab.methods",
    "get_method": "mergelab.methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mergelab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
