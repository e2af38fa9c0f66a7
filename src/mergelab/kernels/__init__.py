"""Pure tensor math: merge kernels (trims, sign election, disjoint merge, DARE, Model Stock), exact
selection of thresholds, and the SVD kernels of the TSV/Iso family and SMILE.

No I/O, no printing: each function takes and returns tensors, so each step of a method can be tested
alone and composed differently by the paper and mergekit semantics.

The torch kernels (``merge``, ``select``) are imported on first use of one of their names, so that the
numpy modules (``band_select``, ``cpu_sort``, ``numpy_consensus``, ``numpy_dare``) load without torch.
"""

from __future__ import annotations

import importlib

_TORCH_PARTS = ("mergelab.kernels.merge", "mergelab.kernels.select")
# ``from mergelab.kernels import cpu_sort`` asks this package for the name before importing the submodule
_SUBMODULES = frozenset({"band_select", "cpu_sort", "numpy_consensus", "numpy_dare", "numpy_mergekit_stream", "merge",
                         "select", "svd", "mergekit_stream"})


def _load() -> list[str]:
    names: list[str] = []
    for part in _TORCH_PARTS:
        module = importlib.import_module(part)
        globals().update({name: getattr(module, name) for name in module.__all__})
        names.extend(module.__all__)
    globals()["__all__"] = names
    return names


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    names = _load()
    if name == "__all__":
        return names
    if name in names:
        return globals()[name]
    raise AttributeError(f"module 'mergelab.kernels' has no attribute {name!r}")
