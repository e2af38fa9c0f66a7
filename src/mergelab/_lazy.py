"""Modules imported on first use, so that ``mergelab --help`` and ``mergelab methods`` need no torch.

``torch = lazy_module("torch")`` at the top of a module reads like an import; the module is imported
the first time one of its attributes is used. The layering test (tests/test_layout.py) reads these
calls as imports.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy_module(name: str) -> LazyModule:
    return LazyModule(name)
