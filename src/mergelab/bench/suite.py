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
    """Data sizes, task heads and fine-tuning settings shared by every task of a suite.

    ``head``: ``zero_shot`` (class-name prompts embedded by the base, cosine logits times
    ``head_scale``; no label used) or ``probe`` (logistic regression on the base's train
    embeddings, the protocol before issue 14).  ``steps`` (optimizer steps per task, batch
    ``batch_size``) fixes the training budget independently of the train split size.  ``seed``
    draws the data splits; ``finetune_seeds`` are the fine-tuning seeds (one table each, and
    their mean).  ``mtl_steps`` (0 = none) adds the multi-task row: one encoder fine-tuned on all
    tasks' train splits at once, each example through its own task's head.
    """

    n_train: int = 2000
    n_val: int = 300
    n_test: int = 1000
    max_len: int = 32
    batch_size: int = 32
    steps: int = 150
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup: float = 0.1
    schedule: str = "cosine"
    freeze_embeddings: bool = True
    head: str = "zero_shot"
    head_scale: float = 20.0
    probe_weight_decay: float = 1e-4
    seed: int = 0
    finetune_seeds: list = field(default_factory=lambda: [0])
    mtl_steps: int = 0
    ensemble: bool = True

    def __post_init__(self):
        if self.head not in ("zero_shot", "probe"):
            raise MergelabError(f"protocol head {self.head!r}: expected zero_shot or probe")
        if self.schedule not in ("cosine", "linear"):
            raise MergelabError(f"protocol schedule {self.schedule!r}: expected cosine or linear")
        if not self.finetune_seeds:
            raise MergelabError("protocol finetune_seeds: give at least one seed")

    def training_key(self) -> dict[str, Any]:
        """The fields that change a fine-tuned checkpoint (the cache key; the fine-tune seed is added
        per checkpoint, the evaluation-only fields are left out)."""
        d = asdict(self)
        for k in ("finetune_seeds", "mtl_steps", "ensemble", "n_val", "n_test"):
            d.pop(k)
        if self.head == "zero_shot":
            d.pop("probe_weight_decay")
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
    default: dict[str, Any] | None = None  # the paper's data-free setting: an extra row NAME@paper

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
    """``task_specs``: this suite's own tasks (read from files) and its own prompts for built-in
    tasks, by name; they shadow the registry for this suite only (nothing global changes)."""

    name: str
    tasks: list[str]
    protocol: Protocol
    methods: list[MethodSpec]
    description: str = ""
    task_specs: dict[str, data.TaskSpec] = field(default_factory=dict)

    def task_spec(self, name: str) -> data.TaskSpec | None:
        """The suite's own spec of ``name``, or None for the registry's."""
        return self.task_specs.get(name)


def default_methods() -> list[MethodSpec]:
    """The literature's data-free merges: each with its paper's default (row ``NAME@paper``, no
    validation data) and a validation-tuned row ``NAME`` searched on the grid.

    Defaults (ALGORITHMS.md): task arithmetic lambda 0.3 (8-task CLIP setting of AdaMerging and
    FusionBench); TIES k = 20 %, lambda 1, disjoint mean; Breadcrumbs keep 10 %, top 1 % removed,
    lambda 1; DARE drop rate 0.2 (the paper's merging example) with TIES lambda 1; TSV-M, Iso-C
    and Iso-CTS alpha 1 (FusionBench).  Lambda grids cost one merge per setting of the other
    parameters (see runner.LAMBDA_LINEAR).
    """
    svd_grid = {"lambda": [0.5, 0.7, 1.0, 1.3, 1.6, 2.0]}
    return [
        MethodSpec("average", "average"),
        MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]},
                   default={"lambda": 0.3}),
        MethodSpec("ties", "ties", grid={"density": [0.1, 0.2, 0.4], "lambda": [0.7, 1.0, 1.5]},
                   params={"merge": "mean", "trim_scope": "global"}, default={"density": 0.2, "lambda": 1.0}),
        MethodSpec("breadcrumbs", "breadcrumbs", grid={"keep": [0.1], "lambda": [0.2, 0.3, 0.5, 0.7, 1.0]},
                   params={"top_remove": 0.01}, default={"keep": 0.1, "lambda": 1.0}),
        MethodSpec("dare_ties", "dare_ties", grid={"density": [0.3], "lambda": [0.5, 0.7, 1.0, 1.5]},
                   params={"seed": 0}, default={"density": 0.8, "lambda": 1.0}),
        MethodSpec("tsv", "tsv", grid=dict(svd_grid), default={"lambda": 1.0}),
        MethodSpec("iso_c", "iso_c", grid=dict(svd_grid), default={"lambda": 1.0}),
        MethodSpec("iso_cts", "iso_cts", grid=dict(svd_grid), default={"lambda": 1.0}),
    ]


def model_builder_rows() -> list[MethodSpec]:
    """Rows that build a model instead of a merged state dict: SMILE (issue 4) at several
    (k, gate_k), each with its parameter count."""
    from mergelab.bench.smile_methods import bench_methods
    return bench_methods([(8, 4), (32, 16)])


def adaptive_rows() -> list[MethodSpec]:
    """Test-time adaptation on the unlabelled test inputs (as the papers): AdaMerging task- and
    layer-wise, AdaMerging++ (TIES-trimmed task vectors), Concrete TA, Concrete AdaMerging; and the
    layer-wise and Concrete rows once more adapted on the validation inputs instead (held out from
    test: does adapting on the very test inputs matter?)."""
    from mergelab.bench.adapt_methods import CPU_ROWS, adapt_methods
    rows = dict(CPU_ROWS)
    rows["adamerging_pp_layer"] = {**CPU_ROWS["adamerging_layer"], "ties_trim": 0.2}
    order = ["adamerging_task", "adamerging_layer", "adamerging_pp_layer", "concrete_ta", "concrete_adamerging"]
    held_out = ["adamerging_layer", "concrete_ta", "concrete_adamerging"]
    return (adapt_methods(("test",), rows={k: rows[k] for k in order})
            + adapt_methods(("val",), rows={k: rows[k] for k in held_out}))


def leaderboard_rows() -> list[MethodSpec]:
    """The leaderboard methods of issue 19 as rows (``databased.builders``): RegMean and Fisher
    merging (unlabelled train inputs, FusionBench's example counts; Fisher shortened to 64 per task
    for the CPU), TIES + LiNeS (beta searched on validation), EMR (task id at inference, its masks
    and rescalers cost extra bytes per task), WUDI (data-free; 100 of the paper's 400 steps at
    4x the lr on this CPU) and WEMoE (routers trained on the unlabelled test inputs at the paper's
    lr 1e-4 and batch 16, 200 of its 1,000 steps: a step costs ~2 s here)."""
    from mergelab.databased.builders import (emr_builder, fisher_builder, regmean_builder, registry_builder,
                                             wemoe_builder)
    ties = {"lambda": 1.0, "density": 0.2, "merge": "mean", "trim_scope": "global"}
    return [MethodSpec("regmean", builder=regmean_builder, params={"alpha": 0.95, "num_examples": 256}),
            MethodSpec("fisher", builder=fisher_builder, params={"num_examples": 64}),
            MethodSpec("ties+lines", builder=registry_builder, params={"method": "ties", "params": ties},
                       grid={"lines": [{"beta": 0.2}, {"beta": 0.5}, {"beta": 1.0}]}),
            MethodSpec("emr", builder=emr_builder),
            MethodSpec("wudi", builder=registry_builder,
                       params={"method": "wudi", "params": {"iter_num": 100, "lr": 4e-5}}),
            MethodSpec("wemoe@test", builder=wemoe_builder, params={"steps": 200, "lr": 1e-4, "split": "test"})]


TEXT6_TASKS = ["fortune_topic", "fortune_lang", "foldoc", "gcide", "wordnet_noun", "wordnet_verb"]
# gcide gained only +8.6 points over its zero-shot head (docs/bench.md, Measured): replaced by wordnet_noun2
TEXT8_TASKS = ["fortune_topic", "fortune_topic2", "fortune_lang", "foldoc", "wordnet_noun", "wordnet_noun2",
               "wordnet_verb", "wordnet_pos"]
DEMO_TASKS = ["fortune_lang", "wordnet_noun", "wordnet_pos"]


def _demo_methods() -> list[MethodSpec]:
    return [MethodSpec("average", "average"),
            MethodSpec("task_arithmetic", "task_arithmetic", grid={"lambda": [0.3, 0.5, 0.7, 1.0]},
                       default={"lambda": 0.3}),
            MethodSpec("ties", "ties", grid={"density": [0.2], "lambda": [0.7, 1.0, 1.5]},
                       params={"merge": "mean", "trim_scope": "global"}, default={"density": 0.2, "lambda": 1.0}),
            MethodSpec("tsv", "tsv", grid={"lambda": [0.7, 1.0, 1.5]}, default={"lambda": 1.0})]



SUITES: dict[str, Callable[[], Suite]] = {
    "text8": lambda: Suite("text8", list(TEXT8_TASKS), Protocol(finetune_seeds=[0, 1], mtl_steps=600),
                           default_methods() + model_builder_rows() + adaptive_rows(),
                           "eight Debian-corpus text tasks on all-MiniLM-L6-v2, zero-shot heads"),
    # text8 plus issue 19's leaderboard rows; `--resume` a text8 result to measure only the new rows
    "text8-all": lambda: Suite("text8-all", list(TEXT8_TASKS), Protocol(finetune_seeds=[0, 1], mtl_steps=600),
                               default_methods() + model_builder_rows() + adaptive_rows() + leaderboard_rows(),
                               "text8 and the leaderboard methods (RegMean, Fisher, TIES+LiNeS, EMR, WUDI, WEMoE)"),
    "text6": lambda: Suite("text6", list(TEXT6_TASKS), Protocol(mtl_steps=450),
                           default_methods() + model_builder_rows(),
                           "the six original Debian-corpus text tasks, zero-shot heads"),
    # 3 of text8's tasks, shorter fine-tunes (80 steps at 2x the lr: every task still gains >= 20
    # points, docs/results/demo-2026-12-01-80steps/) so that `make demo` stays under 6 minutes
    "demo": lambda: Suite("demo", list(DEMO_TASKS), Protocol(steps=80, lr=2e-4), _demo_methods(),
                          "reduced suite for `make demo`: 3 of text8's tasks, 80-step fine-tunes, fewer methods"),
}


def register_suite(name: str, factory: Callable[[], Suite]) -> None:
    """Make a suite available to ``mergelab bench --suite NAME``."""
    SUITES[name] = factory


# ----------------------------------------------------------------------------- YAML
def _task_from_yaml(block: Mapping[str, Any], base_dir: Path) -> data.TaskSpec:
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

    return data.TaskSpec(name, block.get("description", f"{fmt} file {path}"), read,
                         classes, (), *_prompt_fields(block, name))


def _prompt_fields(block: Mapping[str, Any], name: str) -> tuple[dict | None, tuple[str, ...]]:
    """``class_names`` (label -> name) and ``templates`` (strings with one ``{}``) of a task block."""
    names = block.get("class_names")
    if names is not None and not (isinstance(names, dict) and all(isinstance(v, str) for v in names.values())):
        raise MergelabError(f"task {name!r}: class_names must map each label to a name")
    templates = block.get("templates", ["{}."])
    if (not isinstance(templates, list) or not templates
            or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates)):
        raise MergelabError(f"task {name!r}: templates must be a list of strings with exactly one '{{}}'")
    return ({str(k): v for k, v in names.items()} if names else None), tuple(templates)


def _override_prompts(block: Mapping[str, Any]) -> data.TaskSpec:
    """A block naming a built-in task without a ``path``: the task with the block's own prompts."""
    import dataclasses
    name = block["name"]
    if name not in data.TASKS:
        raise MergelabError(f"unknown task {name!r}; known: {', '.join(data.list_tasks())}")
    spec = data.TASKS[name]
    names, templates = _prompt_fields({"templates": list(spec.templates), **block}, name)
    return dataclasses.replace(spec, class_names={**dict(spec.class_names or {}), **(names or {})},
                               templates=templates)


def load_suite_file(path: str | Path) -> Suite:
    """Read a suite from YAML: ``name``, ``tasks`` (names or file blocks), ``protocol``, ``methods``."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MergelabError(f"{path}: cannot read suite YAML ({exc})") from exc
    if not isinstance(doc, dict) or "tasks" not in doc:
        raise MergelabError(f"{path}: a suite file needs a 'tasks' list")
    tasks, specs = [], {}
    for t in doc["tasks"]:
        if isinstance(t, str):
            tasks.append(t)
            continue
        if not isinstance(t, dict):
            raise MergelabError(f"{path}: a task is a name or a block with 'name' (got {t!r})")
        spec = _override_prompts(t) if "name" in t and "path" not in t else _task_from_yaml(t, path.parent)
        specs[spec.name] = spec
        tasks.append(spec.name)
    for t in tasks:
        if t not in data.TASKS and t not in specs:
            raise MergelabError(f"{path}: unknown task {t!r}; known: {', '.join(data.list_tasks())}")
    try:
        protocol = Protocol(**(doc.get("protocol") or {}))
    except (TypeError, MergelabError) as exc:
        raise MergelabError(f"{path}: bad protocol field ({exc})") from exc
    methods = default_methods()
    if doc.get("methods") is not None:
        methods = []
        for m in doc["methods"]:
            if not isinstance(m, dict) or "name" not in m:
                raise MergelabError(f"{path}: each method needs at least a 'name'")
            methods.append(MethodSpec(m["name"], m.get("method", m["name"]), None,
                                      dict(m.get("grid") or {}), dict(m.get("params") or {}),
                                      dict(m["default"]) if m.get("default") is not None else None))
    return Suite(doc.get("name", path.stem), tasks, protocol, methods, doc.get("description", ""), specs)


def get_suite(name_or_path: str) -> Suite:
    """A built-in suite by name, or a YAML suite file by path."""
    if name_or_path in SUITES:
        return SUITES[name_or_path]()
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_suite_file(name_or_path)
    raise MergelabError(f"unknown suite {name_or_path!r}; built-in: {', '.join(sorted(SUITES))} "
                        "(or a path to a suite .yaml)")
