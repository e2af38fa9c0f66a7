"""Suites: which tasks, how much data, how to fine-tune, and which merge methods to compare.

Built-in suites: ``text6`` (the six Debian-corpus tasks, the default) and ``demo`` (3 tasks, fewer
examples; ``make demo``).  A suite can also come from a YAML file (see docs/bench.md), and a task
from a YAML block naming a TSV/JSONL file or a folder of per-class files.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from mergelab.bench import data
from mergelab.errors import MergelabError


@dataclass
class Protocol:
    """Data sizes and fine-tuning settings shared by every task of a suite.

    ``steps`` (optimizer steps per task, batch ``batch_size``) fixes the training budget
    independently of the train split size; ``n_train`` examples are cycled through.
    """

    n_train: int = 2000
    n_val: int = 200
    n_test: int = 600
    max_len: int = 40
    batch_size: int = 32
    steps: int = 60
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    probe_weight_decay: float = 1e-4
    seed: int = 0

    def training_key(self) -> dict[str, Any]:
        """The fields that change a fine-tuned checkpoint (the cache key)."""
        d = asdict(self)
        return d


@dataclass
class MethodSpec:
    """One row of the benchmark.

    Either ``method`` (a name of mergelab's merge registry: the row merges the fine-tuned encoders'
    state dicts with ``merge_state_dicts``) or ``builder`` (a callable
    ``builder(models: ModelPool, tasks: TaskPool, params: dict)`` returning an encoder
    ``nn.Module`` or a mapping task name -> encoder module; see docs/bench.md).
    ``grid`` lists the values searched on the validation split; ``params`` are fixed.
    """

    name: str
    method: str | None = None
    builder: Callable[..., Any] | None = None
    grid: dict[str, list] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if (self.method is None) == (self.builder is None):
            raise MergelabError(f"method {self.name!r}: give exactly one of 'method' or 'builder'")

    def settings(self) -> list[dict[str, Any]]:
        """Every point of the grid, merged over the fixed params (one empty grid = one setting)."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            out.append({**self.params, **dict(zip(keys, values))})
        return out


@dataclass
class Suite:
    name: str
    tasks: list[str]
    protocol: Protocol
    methods: list[MethodSpec]
    description: str = ""


def default_methods() -> list[MethodSpec]:
    """The literature's data-free merges with small validation grids around their defaults.

    Lambda grids cost one merge per setting of the other parameters (see runner.LAMBDA_LINEAR).
    """
    return [
        MethodSpec("average", "average"),
        MethodSpec("task_arithmetic", "task_arithmetic",
                   grid={"lambda": [0.05, 0.1, 0.15, 0.2, 0.25]}),
        MethodSpec("ties", "ties", grid={"density": [0.05, 0.1], "lambda": [0.3, 0.5, 0.7]},
                   params={"merge": "mean", "trim_scope": "global"}),
        MethodSpec("breadcrumbs", "breadcrumbs", grid={"keep": [0.1], "lambda": [0.5, 0.7, 0.85]},
                   params={"top_remove": 0.01}),
        MethodSpec("dare_ties", "dare_ties", grid={"density": [0.3], "lambda": [0.2, 0.35, 0.5]},
                   params={"seed": 0}),
        # SVD-based merges (issue 8): alpha grid around the validation optima of benchmarks/svd_text6.py
        MethodSpec("tsv", "tsv", grid={"lambda": [0.5, 0.7, 0.9, 1.1, 1.3]}),
        MethodSpec("iso_c", "iso_c", grid={"lambda": [0.5, 0.7, 0.9, 1.1, 1.3]}),
        MethodSpec("iso_cts", "iso_cts", grid={"lambda": [0.7, 0.9, 1.1, 1.3, 1.6]}),
    ]


def model_builder_rows() -> list[MethodSpec]:
    """Rows that build a model instead of a merged state dict: SMILE (issue 4)."""
    from mergelab.bench.smile_methods import bench_methods
    return bench_methods([(32, 16), (8, 4)])


TEXT6_TASKS = ["fortune_topic", "fortune_lang", "foldoc", "gcide", "wordnet_noun", "wordnet_verb"]

SUITES: dict[str, Callable[[], Suite]] = {
    "text6": lambda: Suite("text6", list(TEXT6_TASKS), Protocol(), default_methods() + model_builder_rows(),
                           "six Debian-corpus text tasks on all-MiniLM-L6-v2"),
    "demo": lambda: Suite(
        "demo", ["fortune_lang", "gcide", "wordnet_verb"],
        Protocol(n_train=640, n_val=120, n_test=300, steps=30, max_len=40),
        [MethodSpec("average", "average"),
         MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.3, 0.5, 0.8]}),
         MethodSpec("ties", "ties", grid={"density": [0.2], "lambda": [0.8, 1.0, 1.3]},
                    params={"merge": "mean", "trim_scope": "global"}),
         MethodSpec("breadcrumbs", "breadcrumbs", grid={"keep": [0.1], "lambda": [0.5, 1.0]},
                    params={"top_remove": 0.01}),
         MethodSpec("dare_ties", "dare_ties", grid={"density": [0.5], "lambda": [0.8, 1.0]},
                    params={"seed": 0})],
        "reduced suite for `make demo`: 3 tasks, fewer examples and steps"),
}


def register_suite(name: str, factory: Callable[[], Suite]) -> None:
    """Make a suite available to ``mergelab bench --suite NAME``."""
    SUITES[name] = factory


# ----------------------------------------------------------------------------- YAML
def _task_from_yaml(block: Mapping[str, Any], base_dir: Path) -> str:
    """Register a task read from a file: ``format`` tsv (label<TAB>text), jsonl ({text,label}),
    or folder (one file per class, records separated by lines holding only ``%`` or one per line)."""
    try:
        name, fmt, path = block["name"], block.get("format", "tsv"), Path(block["path"])
    except KeyError as exc:
        raise MergelabError(f"task block {dict(block)!r} needs 'name' and 'path'") from exc
    if not path.is_absolute():
        path = base_dir / path
    classes = block.get("classes")

    def read() -> list[tuple[str, str]]:
        if not path.exists():
            raise MergelabError(f"task {name!r}: {path} not found")
        out = []
        if fmt == "tsv":
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise MergelabError(f"{path}:{i + 1}: expected 'label<TAB>text'")
                label, text = line.split("\t", 1)
                out.append((data.clean_text(text), label.strip()))
        elif fmt == "jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        out.append((data.clean_text(str(rec["text"])), str(rec["label"])))
                    except (ValueError, KeyError, TypeError) as exc:
                        raise MergelabError(f"{path}:{i + 1}: expected a JSON object with "
                                            f"'text' and 'label'") from exc
        elif fmt == "folder":
            for f in sorted(p for p in path.iterdir() if p.is_file()):
                raw = f.read_text(encoding="utf-8", errors="replace")
                recs = (data.parse_fortune_file(f, min_chars=1) if "\n%\n" in raw
                        else [data.clean_text(l) for l in raw.splitlines() if l.strip()])
                out += [(r, f.stem) for r in recs]
        else:
            raise MergelabError(f"task {name!r}: unknown format {fmt!r} (tsv, jsonl, folder)")
        return out

    data.register_task(data.TaskSpec(name, block.get("description", f"{fmt} file {path}"), read,
                                     classes), overwrite=True)
    return name


def load_suite_file(path: str | Path) -> Suite:
    """Read a suite from YAML: ``name``, ``tasks`` (names or file blocks), ``protocol``, ``methods``."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MergelabError(f"{path}: cannot read suite YAML ({exc})") from exc
    if not isinstance(doc, dict) or "tasks" not in doc:
        raise MergelabError(f"{path}: a suite file needs a 'tasks' list")
    tasks = []
    for t in doc["tasks"]:
        tasks.append(t if isinstance(t, str) else _task_from_yaml(t, path.parent))
    for t in tasks:
        if t not in data.TASKS:
            raise MergelabError(f"{path}: unknown task {t!r}; known: {', '.join(data.list_tasks())}")
    try:
        protocol = Protocol(**(doc.get("protocol") or {}))
    except TypeError as exc:
        raise MergelabError(f"{path}: bad protocol field ({exc})") from exc
    methods = default_methods()
    if doc.get("methods") is not None:
        methods = []
        for m in doc["methods"]:
            if not isinstance(m, dict) or "name" not in m:
                raise MergelabError(f"{path}: each method needs at least a 'name'")
            methods.append(MethodSpec(m["name"], m.get("method", m["name"]), None,
                                      dict(m.get("grid") or {}), dict(m.get("params") or {})))
    return Suite(doc.get("name", path.stem), tasks, protocol, methods, doc.get("description", ""))


def get_suite(name_or_path: str) -> Suite:
    """A built-in suite by name, or a YAML suite file by path."""
    if name_or_path in SUITES:
        return SUITES[name_or_path]()
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_suite_file(name_or_path)
    raise MergelabError(f"unknown suite {name_or_path!r}; built-in: {', '.join(sorted(SUITES))} "
                        "(or a path to a suite .yaml)")
