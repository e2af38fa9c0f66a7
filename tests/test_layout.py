"""The package's shape: layers import only downwards, no import cycles, and the CLI answers without torch.

Layers (lowest first): errors -> kernels -> methods -> io -> engine -> upscale, adapt, databased -> bench ->
recycle, search -> cli.
A module may import its own layer or any lower one; a lazy import inside a function counts too (it is
still a dependency), and so does ``lazy_module("...")``. The module-level import graph has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mergelab"

LAYERS = {
    "errors": 0, "_lazy": 0,
    "kernels": 1,
    "methods": 2,
    "io": 3,
    "engine": 4,
    "upscale": 5, "adapt": 5, "databased": 5,
    "bench": 6,
    "recycle": 7, "search": 7,
    "cli": 8,
    "__init__": 9, "__main__": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1 and path.parent != PACKAGE:
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The mergelab module an import names (``mergelab.io.X`` may be a module or a name in ``mergelab.io``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(all imported mergelab modules, those imported at module level)."""
    tree = ast.parse(path.read_text(), str(path))
    everywhere: set[str] = set()
    top: set[str] = set()

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            return [f"{node.module}.{a.name}" for a in node.names]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "lazy_module"
                and node.args and isinstance(node.args[0], ast.Constant)):
            return [node.args[0].value]
        return []

    for node in ast.walk(tree):
        for t in targets(node):
            if t.startswith("mergelab"):
                resolved = _resolve(t, known)
                if resolved:
                    everywhere.add(resolved)
    for node in tree.body:
        for t in targets(node):
            if t.startswith("mergelab"):
                resolved = _resolve(t, known)
                if resolved:
                    top.add(resolved)
    return everywhere, top


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    assert key in LAYERS, f"{module}: not in any layer; add its folder to LAYERS (and docs/ARCHITECTURE.md)"
    return LAYERS[key]


def test_every_module_belongs_to_a_layer():
    for module in _modules():
        _layer(module)


def test_no_module_imports_a_layer_above_it():
    known = _modules()
    upward = []
    for module, path in known.items():
        everywhere, _ = _imports(path, known)
        for target in everywhere:
            if _layer(target) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert not upward, "\n".join(sorted(upward))


def test_module_level_imports_have_no_cycle():
    known = _modules()
    graph = {m: _imports(p, known)[1] - {m} for m, p in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The layering check can fail: a kernel importing the engine is reported."""
    fake = tmp_path / "k.py"
    fake.write_text("def f():\n    from mergelab.engine.streaming import merge\n")
    known = _modules()
    everywhere, top = _imports(fake, known)
    assert everywhere == {"mergelab.engine.streaming"} and top == set()
    assert _layer("mergelab.engine.streaming") > _layer("mergelab.kernels.merge")


_PROBE = """
import sys
from mergelab.cli import main
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "transformers", "numpy", "safetensors") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize("argvs", [
    [["--help"]],
    [["methods"], ["methods", "--compat", "mergekit"]],
    [[cmd, "--help"] for cmd in ("merge", "methods", "demo", "upscale", "moe", "lora-merge", "adapt", "recycle", "bench",
                                 "search", "emr")],
    [["merge"], ["no-such-command"], ["merge", "r.yaml", "out", "--threads", "x"]],
    [["adapt", m, "--help"] for m in ("regmean", "regmean++", "fisher", "wemoe")]
    + [["adapt", "fisher", "r.yaml", "out", "--data", "d", "--num-examples", "0"]],
], ids=["help", "methods", "every-command-help", "argument-errors", "adapt-data-based"])
def test_cli_answers_without_importing_torch(argvs):
    out = subprocess.run([sys.executable, "-c", _PROBE.format(argvs=argvs)], capture_output=True, text=True,
                         timeout=120, cwd=PACKAGE.parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY:", out.stdout[-500:]


def test_import_mergelab_is_lazy_and_complete():
    code = ("import sys, mergelab; assert 'torch' not in sys.modules; "
            "names = [n for n in mergelab.__all__ if getattr(mergelab, n) is None]; assert not names, names; "
            "print(sorted(mergelab.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("merge", "merge_state_dicts", "MergeSummary", "MergelabError", "open_checkpoint",
                 "load_state_dict", "load_recipe", "list_methods", "get_method"):
        assert name in out.stdout
