"""Modules imported on first use, so that ``mergelab --help`` and ``mergelab methods`` need no torch.

``torch = lazy_module("torch")`` at the top of a module reads like an import; the module is imported
the first time one of its attributes is used. The layering test (tests/test_layout.py) reads these
calls as imports. ``lazy_exports`` does the same for a package's names (PEP 562).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Mapping, Sequence


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


def lazy_exports(package: str, namespace: dict, where: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` of a package whose public names live in modules
    (``where``: module -> names), each imported the first time one of its names is used and then kept in
    the package's ``namespace`` (its ``globals()``)."""
    module_of = {name: module for module, names in where.items() for name in names}
    names = sorted(module_of)

    def __getattr__(name: str):
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return names, __getattr__, __dir__
