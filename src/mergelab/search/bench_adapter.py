"""The benchmark's task pool as a search objective: accuracy of each task through its own frozen head.

Uses ``mergelab.bench`` read-only (its suites, task loading, tokenization, heads and evaluation loop);
everything the search needs from it goes through this module, so a change of the benchmark's API is
one place to follow.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.search.objectives import Evaluator, _load_into, _path

SPLITS = ("val", "test")


def check_tasks_objective(o: dict, at: str, base_dir: Path, name: str, direction: str) -> list[tuple[str, str]]:
    from mergelab.bench.suite import get_suite
    suite_name = o.get("suite")
    if not isinstance(suite_name, str):
        raise MergelabError(f"{at}: 'suite' must name a benchmark suite or a suite .yaml (its tasks and protocol)")
    if suite_name.endswith((".yaml", ".yml")):
        suite_name = o["suite"] = _path(suite_name, base_dir, at, "suite")
    suite = get_suite(suite_name)
    tasks = o.get("tasks") or list(suite.tasks)
    bad = [t for t in tasks if t not in suite.tasks]
    if bad:
        raise MergelabError(f"{at}: task {bad[0]!r} is not in suite {suite.name!r} ({', '.join(suite.tasks)})")
    o["tasks"] = list(tasks)
    heads = o.get("heads") or {}
    if not isinstance(heads, dict):
        raise MergelabError(f"{at}: 'heads' must map task -> folder holding head.safetensors")
    o["heads"] = {t: _path(p, base_dir, at, f"heads.{t}") for t, p in heads.items()}
    if o.get("split", "val") != "val":
        raise MergelabError(f"{at}: the search scores the validation split only (test is for the final model: "
                            "set final_split: test)")
    return [(f"{name}:{t}", direction) for t in tasks] if o.get("per_task") else [(name, direction)]


def _task_of(folder: Path) -> str | None:
    meta = folder / "meta.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("task")
        except ValueError:
            return None
    return None


def resolve_heads(o: dict, model_paths: list[str]) -> dict[str, str]:
    """Task -> folder with its head: the objective's ``heads``, else the recipe's models (by their
    meta.json 'task', else in the suite's task order)."""
    heads = dict(o.get("heads") or {})
    by_meta = {_task_of(Path(p)): p for p in model_paths}
    for i, t in enumerate(o["tasks"]):
        if t not in heads:
            if t in by_meta:
                heads[t] = by_meta[t]
            elif i < len(model_paths) and (Path(model_paths[i]) / "head.safetensors").is_file():
                heads[t] = model_paths[i]
            else:
                raise MergelabError(f"tasks objective: no head for task {t!r}: give heads: {{{t}: FOLDER}}")
    return heads


class TasksEvaluator(Evaluator):
    """Mean accuracy over the tasks (or one value per task with ``per_task``)."""

    def __init__(self, o: dict, base_folder: str | None, model_paths: list[str] | None = None):
        super().__init__(o, base_folder)
        from transformers import AutoModel, AutoTokenizer

        from mergelab.bench import data, train
        from mergelab.bench.runner import load_head
        from mergelab.bench.suite import get_suite
        if base_folder is None:
            raise MergelabError("tasks objective: the recipe's base model must be a model folder")
        suite = get_suite(o["suite"])
        p = suite.protocol
        tok = AutoTokenizer.from_pretrained(base_folder)
        self.pad = tok.pad_token_id or 0
        heads = resolve_heads(o, model_paths or o.get("_model_paths", []))
        self.heads = {t: load_head(Path(heads[t])) for t in o["tasks"]}
        self.data: dict[str, dict[str, Any]] = {}
        for t in o["tasks"]:
            td = data.load_task(t, p.n_train, p.n_val, p.n_test, seed=p.seed, spec=suite.task_spec(t))
            self.data[t] = {s: (train.tokenize(tok, getattr(td, s).texts, p.max_len), getattr(td, s).labels)
                            for s in SPLITS}
        self.encoder = AutoModel.from_pretrained(base_folder, attn_implementation="eager").eval()
        self.batch = int(o.get("batch", 128))

    def accuracies(self, encoder, split: str = "val") -> dict[str, Any]:
        from mergelab.bench.evaluate import evaluate
        return {t: evaluate(encoder, self.heads[t], *self.data[t][split], batch_size=self.batch, pad_id=self.pad)
                for t in self.o["tasks"]}

    def _values(self, encoder) -> list[float]:
        acc = [r.accuracy for r in self.accuracies(encoder).values()]
        return acc if self.o.get("per_task") else [sum(acc) / len(acc)]

    def score_state(self, sd):
        _load_into(self.encoder, sd, "tasks objective")
        return self._values(self.encoder)

    def score_folder(self, folder):
        from transformers import AutoModel
        return self._values(AutoModel.from_pretrained(folder, attn_implementation="eager").eval())
