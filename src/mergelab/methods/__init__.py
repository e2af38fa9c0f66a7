"""Data-free merge methods: the registry and one module per method family.

A new method is one new module here (its parameters, its per-tensor function and a ``register(...)``
call) plus its name in ``METHOD_MODULES``. Importing this package imports no torch: the modules reach
torch and ``mergelab.kernels`` lazily, so ``mergelab methods`` answers at once.
"""

from __future__ import annotations

import importlib

from mergelab.methods.registry import (COMPAT_MODES, REGISTRY, Method, Param, TensorJob, get_method, list_methods,
                                       register, resolve_params)

METHOD_MODULES = ("linear", "ties", "breadcrumbs", "dare", "model_stock", "svd", "slerp", "nuslerp", "multislerp",
                  "karcher", "della", "sce", "nearswap", "arcee_fusion", "ram", "passthrough", "wudi")

for _name in METHOD_MODULES:
    importlib.import_module(f"mergelab.methods.{_name}")

__all__ = ["COMPAT_MODES", "REGISTRY", "Method", "Param", "TensorJob", "get_method", "list_methods", "register",
           "resolve_params", "METHOD_MODULES"]
