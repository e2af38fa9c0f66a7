"""Multi-stage recipes (mergekit-multi): several ``---``-separated recipes in one file, later ones naming
earlier ones as models.

Every document is a normal recipe plus ``name``; a named stage is written to
``INTERMEDIATE_DIR/<name>``, the unnamed one (at most one) to OUT_DIR, and where every stage is named
the one no other stage uses is the final model. A model path equal to a stage's name refers to that
stage's output. Stages run in dependency order. A stage whose output already holds the same resolved
recipe (the recipe and the recipes of everything it depends on, hashed) is reused, so an interrupted run
resumes where it stopped and a changed stage re-merges only itself and what depends on it (outputs
holding an earlier run's stage record are replaced; any other existing OUT_DIR needs ``--force``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from mergelab.errors import MergelabError

STAGE_FILE = "mergelab_stage.json"
_MODEL_KEYS = ("model", "base_model", "source_model")


@dataclass
class Stage:
    name: str | None
    raw: dict[str, Any]
    needs: list[str]


def read_documents(path: str | Path) -> list[Any]:
    from mergelab.engine.recipe import read_recipe_text
    path = Path(path).expanduser()
    text = read_recipe_text(path)
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise MergelabError(f"{path}: invalid YAML{at}") from None


def is_multistage(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return p.is_file() and len(read_documents(p)) > 1


def _references(value: Any, names: set[str], key: str | None = None) -> set[str]:
    """Stage names used as model paths anywhere in a recipe (models, base_model, slices' sources)."""
    if isinstance(value, dict):
        found: set[str] = set()
        for k, v in value.items():
            found |= _references(v, names, k)
        return found
    if isinstance(value, list):
        return set().union(*(_references(v, names, key) for v in value)) if value else set()
    if isinstance(value, str) and key in _MODEL_KEYS and value in names:
        return {value}
    return set()


def _substitute(value: Any, paths: dict[str, str], relative_to: Path, key: str | None = None) -> Any:
    """Stage names -> their output folders; relative model paths -> absolute, as the file would read them."""
    if isinstance(value, dict):
        return {k: _substitute(v, paths, relative_to, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, paths, relative_to, key) for v in value]
    if isinstance(value, str) and key in _MODEL_KEYS + ("tokenizer_source",):
        if value in paths:
            return paths[value]
        p = Path(value).expanduser()
        if not p.is_absolute() and not p.exists() and (relative_to / p).exists():
            return str(relative_to / p)
    return value


def plan_stages(path: str | Path) -> list[Stage]:
    """The stages in the order they run; one-line errors for names, cycles and unknown references."""
    path = Path(path).expanduser()
    docs = read_documents(path)
    stages: list[Stage] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise MergelabError(f"{path}: document {i + 1} must be a recipe mapping")
        name = doc.get("name")
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
            raise MergelabError(f"{path}: document {i + 1}: 'name' must be a plain folder name, got {name!r}")
        stages.append(Stage(name, {k: v for k, v in doc.items() if k != "name"}, []))
    names = [s.name for s in stages if s.name is not None]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MergelabError(f"{path}: two documents are named {dup!r}")
    if sum(s.name is None for s in stages) > 1:
        raise MergelabError(f"{path}: more than one document has no 'name' (only the final merge may be unnamed)")
    for s in stages:
        s.needs = sorted(_references(s.raw, set(names)))
        if s.name in s.needs:
            raise MergelabError(f"{path}: stage {s.name!r} uses its own output")
    ordered: list[Stage] = []
    done: set[str | None] = set()
    pending = list(stages)
    while pending:
        ready = [s for s in pending if set(s.needs) <= done]
        if not ready:
            raise MergelabError(f"{path}: the stages {sorted(str(s.name) for s in pending)} depend on each other "
                                "in a cycle")
        for s in ready:
            ordered.append(s)
            done.add(s.name)
            pending.remove(s)
    return ordered


def final_stage(stages: list[Stage], where: str) -> Stage:
    unnamed = [s for s in stages if s.name is None]
    if unnamed:
        return unnamed[0]
    used = {n for s in stages for n in s.needs}
    finals = [s for s in stages if s.name not in used]
    if len(finals) != 1:
        raise MergelabError(f"{where}: {len(finals)} stages are used by no other stage "
                            f"({', '.join(str(s.name) for s in finals)}); leave the final one unnamed")
    return finals[0]


def _digest(raw: dict, upstream: list[str]) -> str:
    blob = json.dumps({"recipe": raw, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _reusable(folder: Path, digest: str) -> bool:
    try:
        return json.loads((folder / STAGE_FILE).read_text()).get("digest") == digest
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class StageResult:
    name: str | None
    out_dir: Path
    reused: bool
    seconds: float


def merge_stages(path: str | Path, out_dir: str | Path, *, intermediate_dir: str | Path | None = None,
                 force: bool = False, merge_kwargs: dict | None = None,
                 on_stage: Callable[[int, int, Stage], None] | None = None,
                 before_engine: Callable[[], None] | None = None) -> list[StageResult]:
    """Run every stage of a multi-document recipe; returns one result per stage, in the order run (each by
    the torch-free lane where it takes the stage, else by the torch engine after ``before_engine()``)."""
    from mergelab.engine.linear_lane import merge_recipe

    path = Path(path).expanduser()
    stages = plan_stages(path)
    final = final_stage(stages, str(path))
    out = Path(out_dir).expanduser()
    inter = Path(intermediate_dir).expanduser() if intermediate_dir else out.parent / f"{out.name}.stages"
    outputs: dict[str, str] = {}
    digests: dict[str | None, str] = {}
    results = []
    for i, stage in enumerate(stages):
        target = out if stage is final else inter / str(stage.name)
        raw = _substitute(stage.raw, outputs, path.parent)
        digest = _digest(raw, [digests[n] for n in stage.needs])
        digests[stage.name] = digest
        if on_stage:
            on_stage(i, len(stages), stage)
        reused = target.is_dir() and _reusable(target, digest) and not (stage is final and force)
        seconds = 0.0
        if not reused:
            if target.exists() and stage is not final and not (target / STAGE_FILE).is_file():
                raise MergelabError(f"{target}: exists and was not written by a mergelab stage; choose another "
                                    "--intermediate-dir")
            if stage is not final:
                inter.mkdir(parents=True, exist_ok=True)
            # a stale output of an earlier run of this file (it holds our stage record) is replaced
            ours = (target / STAGE_FILE).is_file()
            summary = merge_recipe(raw, target, force=force or ours, before_engine=before_engine,
                                   **(merge_kwargs or {}))
            (target / STAGE_FILE).write_text(json.dumps({"name": stage.name, "digest": digest}, indent=2))
            seconds = summary.seconds
        if stage.name is not None:
            outputs[stage.name] = str(target)
        results.append(StageResult(stage.name, target, reused, seconds))
    return results
