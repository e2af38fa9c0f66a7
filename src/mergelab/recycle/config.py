"""The ``mergelab recycle`` recipe: parsed and checked before anything is trained.

```yaml
base_model: minilm              # or a Hugging Face encoder folder
target:                         # the built-in text target (see docs/recycle.md) ...
  task: gcide_to_wordnet
  n_train: 1000
  n_val: 250
  n_test: 750
  ood_per_class: 300
# data: bundle.json             # ... or a pre-tokenized bundle (tests, other tasks)
auxiliary:
  tasks: [wordnet_verb, foldoc] # fine-tuned by the pipeline (benchmark tasks) ...
  checkpoints: {}               # ... and/or given fine-tunes: {name: path}
  runs_per_task: 1
  n_train: 800
  n_val: 200
  hparams: {lr: 5.0e-5, steps: 60, batch_size: 16}
runs: 6                         # target fine-tunings of the Ratatouille sweep (and of the soup sweep)
fusing_runs: 2
fusing_range: 0.0               # 0: plain average of the auxiliaries; >0: random weights (paper: 4)
fusing_base: false              # the base is one more member of the fused average (paper: yes)
hparams:                        # a list is a choice, {low, high, log} a range, a number fixed
  lr: [1.0e-5, 3.0e-5, 5.0e-5]
  weight_decay: [1.0e-4, 1.0e-6]
  dropout: [0.0, 0.1]
  steps: 50
  batch_size: 16
  eval_every: 25
lp_steps: 20                    # head-only steps before full fine-tuning from an auxiliary featurizer
probe_iters: 300                # L-BFGS iterations of the linear probes
soup: greedy                    # which Ratatouille soup is written as OUT_DIR/model
executor: ray                   # or local
ray_address: null
num_cpus: 2
cpus_per_run: 1
seed: 0
```
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


from mergelab.errors import MergelabError

DEFAULT_HPARAMS = {"lr": [1e-5, 3e-5, 5e-5], "weight_decay": [1e-4, 1e-6], "dropout": [0.0, 0.1],
                   "steps": 50, "batch_size": 16, "eval_every": 25, "lp_lr": 1e-3}
DEFAULT_AUX_HPARAMS = {"lr": 5e-5, "weight_decay": 0.0, "dropout": 0.0, "steps": 60, "batch_size": 16,
                       "lp_lr": 1e-3}
INT_HPARAMS = {"steps", "batch_size", "eval_every"}
# the corpus each built-in target is drawn from: neither an auxiliary task nor a checkpoint fine-tuned on it
# may be recycled (the auxiliary would have seen the target's test texts)
TARGET_SOURCES = {"gcide_to_wordnet": ("gcide", "gcide2")}
# the corpora of a built-in target's OOD side: a *checkpoint* fine-tuned on one of them may have trained
# on the OOD test texts (auxiliary *tasks* are fine: the pipeline removes every target text from them)
TARGET_OOD_SOURCES = {"gcide_to_wordnet": ("wordnet_noun", "wordnet_noun2", "wordnet_verb", "wordnet_pos")}
KNOWN_HPARAMS = {"lr", "weight_decay", "dropout", "steps", "batch_size", "eval_every", "lp_lr"}
TOP_KEYS = {"base_model", "target", "data", "auxiliary", "runs", "fusing_runs", "fusing_range", "fusing_base", "hparams",
            "lp_steps", "soup", "executor", "ray_address", "num_cpus", "cpus_per_run", "seed", "max_length",
            "train_head", "probe_iters"}


@dataclass
class RecycleConfig:
    base_model: str = "minilm"
    target: dict = field(default_factory=lambda: {"task": "gcide_to_wordnet"})
    data: str | None = None
    aux_tasks: list[str] = field(default_factory=list)
    aux_checkpoints: dict[str, str] = field(default_factory=dict)
    aux_runs_per_task: int = 1
    aux_n_train: int = 800
    aux_n_val: int = 200
    aux_hparams: dict = field(default_factory=lambda: dict(DEFAULT_AUX_HPARAMS))
    runs: int = 6
    fusing_runs: int = 2
    fusing_range: float = 0.0
    fusing_base: bool = False
    hparams: dict = field(default_factory=lambda: dict(DEFAULT_HPARAMS))
    lp_steps: int = 20
    soup: str = "greedy"
    executor: str = "ray"
    ray_address: str | None = None
    num_cpus: int | None = None
    cpus_per_run: int = 1
    seed: int = 0
    max_length: int = 64
    train_head: bool = True
    probe_iters: int = 300
    source: Path | None = None

    @property
    def aux_names(self) -> list[str]:
        return list(self.aux_tasks) + [n for n in self.aux_checkpoints if n not in self.aux_tasks]


def _check_space(space: Any, where: str) -> dict:
    if not isinstance(space, Mapping):
        raise MergelabError(f"{where}: must be a mapping of hyper-parameter -> value, list or {{low, high}}")
    for k, v in space.items():
        if k not in KNOWN_HPARAMS:
            raise MergelabError(f"{where}.{k}: unknown hyper-parameter (known: {', '.join(sorted(KNOWN_HPARAMS))})")
        values = v if isinstance(v, list) else [v.get("low"), v.get("high")] if isinstance(v, Mapping) else [v]
        if not values:
            raise MergelabError(f"{where}.{k}: an empty list")
        for x in values:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                raise MergelabError(f"{where}.{k}: expected non-negative numbers, got {v!r}")
        if isinstance(v, Mapping):
            if set(v) - {"low", "high", "log"} or v["low"] > v["high"] or (v.get("log") and v["low"] <= 0):
                raise MergelabError(f"{where}.{k}: a range is {{low, high, log}} with 0 < low <= high for log")
        if k in INT_HPARAMS and any(x < 1 or int(x) != x for x in values):
            raise MergelabError(f"{where}.{k}: must be a positive integer")
    return dict(space)


def sample_hparams(space: Mapping, seed: int) -> dict:
    """One draw from the space (deterministic in ``seed``); keys in sorted order."""
    rng = random.Random(seed)
    out = {}
    for k in sorted(space):
        v = space[k]
        if isinstance(v, list):
            x = rng.choice(v)
        elif isinstance(v, Mapping):
            lo, hi = float(v["low"]), float(v["high"])
            x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if v.get("log") else rng.uniform(lo, hi)
        else:
            x = v
        out[k] = int(x) if k in INT_HPARAMS else float(x)
    return out


def _int(raw: Mapping, key: str, default: int, where: str, low: int = 0) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise MergelabError(f"{where}: {key} must be an integer >= {low}, got {v!r}")
    return v


def checkpoint_task(path: str | Path) -> str | None:
    """The task a fine-tuned folder was trained on, when it says so (``meta.json`` of ``mergelab bench``)."""
    import json
    meta = Path(path) / "meta.json"
    try:
        task = json.loads(meta.read_text()).get("task") if meta.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return task if isinstance(task, str) else None


def _check_no_leak(cfg: RecycleConfig, where: str) -> None:
    task = cfg.target.get("task")
    sources = TARGET_SOURCES.get(task, ())
    for source in sources:
        if source in cfg.aux_tasks:
            raise MergelabError(f"{where}: auxiliary.tasks: {source!r} is the target's own corpus; choose another task")
    for name, path in cfg.aux_checkpoints.items():
        trained_on = checkpoint_task(path)
        for source in sources:
            if name == source or trained_on == source:
                what = f"was fine-tuned on {source!r}" if trained_on == source else f"is named {source!r}"
                raise MergelabError(f"{where}: auxiliary.checkpoints.{name} ({path}) {what}, the target's own corpus "
                                    "(its texts include the target's test texts); choose another checkpoint")
        if trained_on in TARGET_OOD_SOURCES.get(task, ()):
            raise MergelabError(f"{where}: auxiliary.checkpoints.{name} ({path}) was fine-tuned on {trained_on!r}, "
                                "the corpus of the target's OOD side (it may have trained on the OOD test texts); "
                                "choose another checkpoint")


def load_config(source: str | Path | Mapping) -> RecycleConfig:
    """Parse and validate a recycle recipe (a YAML file or a dict)."""
    from mergelab.engine.recipe import read_recipe_mapping
    raw, path = read_recipe_mapping(source)
    where = str(path or "recipe")
    from mergelab.engine.recipe import unknown_key_error
    unknown = sorted(str(k) for k in set(raw) - TOP_KEYS)
    if unknown:
        raise unknown_key_error(where, unknown[0], TOP_KEYS)
    here = path.parent if path else Path.cwd()

    def resolve(p: Any, key: str) -> str:
        if not isinstance(p, str) or not p:
            raise MergelabError(f"{where}: {key} must be a path, got {p!r}")
        q = Path(p).expanduser()
        q = q if q.is_absolute() else (here / q).resolve()
        if not q.exists():
            raise MergelabError(f"{where}: {key}: {p}: no such file or folder")
        return str(q)

    cfg = RecycleConfig(source=path)
    base = raw.get("base_model", "minilm")
    cfg.base_model = base if base == "minilm" else resolve(base, "base_model")
    if "data" in raw:
        cfg.data = resolve(raw["data"], "data")
    target = raw.get("target", None if cfg.data else cfg.target)
    if target is not None:
        if not isinstance(target, Mapping) or "task" not in target:
            raise MergelabError(f"{where}: target must be a mapping with a 'task'")
        cfg.target = dict(target)
    if cfg.data and "target" in raw:
        raise MergelabError(f"{where}: give either 'target' (built from the corpora) or 'data' (a bundle), not both")

    aux = raw.get("auxiliary") or {}
    if not isinstance(aux, Mapping):
        raise MergelabError(f"{where}: auxiliary must be a mapping")
    bad = set(aux) - {"tasks", "checkpoints", "runs_per_task", "n_train", "n_val", "hparams"}
    if bad:
        raise MergelabError(f"{where}: auxiliary: unknown key {sorted(bad)[0]!r}")
    tasks = aux.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
        raise MergelabError(f"{where}: auxiliary.tasks must be a list of distinct task names")
    ckpts = aux.get("checkpoints") or {}
    if not isinstance(ckpts, Mapping):
        raise MergelabError(f"{where}: auxiliary.checkpoints must be a mapping name -> path")
    cfg.aux_tasks = list(tasks)
    cfg.aux_checkpoints = {}
    for name, p in ckpts.items():
        if name in cfg.aux_tasks:
            raise MergelabError(f"{where}: auxiliary {name!r} is both a task and a checkpoint")
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise MergelabError(f"{where}: auxiliary checkpoint name {name!r} must be letters, digits, - or _")
        cfg.aux_checkpoints[str(name)] = resolve(p, f"auxiliary.checkpoints.{name}")
        if not Path(cfg.aux_checkpoints[str(name)]).exists():
            raise MergelabError(f"{cfg.aux_checkpoints[name]}: auxiliary checkpoint {name!r} not found")
    if not cfg.aux_names:
        raise MergelabError(f"{where}: Ratatouille needs at least one auxiliary task or checkpoint")
    if not cfg.data:
        _check_no_leak(cfg, where)
    cfg.aux_runs_per_task = _int(aux, "runs_per_task", 1, where + ": auxiliary", 1)
    cfg.aux_n_train = _int(aux, "n_train", cfg.aux_n_train, where + ": auxiliary", 1)
    cfg.aux_n_val = _int(aux, "n_val", cfg.aux_n_val, where + ": auxiliary", 1)
    cfg.aux_hparams = {**DEFAULT_AUX_HPARAMS, **_check_space(aux.get("hparams") or {}, where + ": auxiliary.hparams")}

    cfg.runs = _int(raw, "runs", cfg.runs, where, 1)
    cfg.fusing_runs = _int(raw, "fusing_runs", cfg.fusing_runs, where, 0)
    cfg.lp_steps = _int(raw, "lp_steps", cfg.lp_steps, where, 0)
    cfg.seed = _int(raw, "seed", 0, where, 0)
    cfg.max_length = _int(raw, "max_length", cfg.max_length, where, 2)
    cfg.probe_iters = _int(raw, "probe_iters", cfg.probe_iters, where, 1)
    cfg.cpus_per_run = _int(raw, "cpus_per_run", 1, where, 1)
    if raw.get("num_cpus") is not None:
        cfg.num_cpus = _int(raw, "num_cpus", 2, where, 1)
    fr = raw.get("fusing_range", 0.0)
    if isinstance(fr, bool) or not isinstance(fr, (int, float)) or fr < 0:
        raise MergelabError(f"{where}: fusing_range must be a number >= 0")
    cfg.fusing_range = float(fr)
    fb = raw.get("fusing_base", False)
    if not isinstance(fb, bool):
        raise MergelabError(f"{where}: fusing_base must be true or false")
    cfg.fusing_base = fb
    cfg.hparams = {**DEFAULT_HPARAMS, **_check_space(raw.get("hparams") or {}, where + ": hparams")}
    cfg.soup = raw.get("soup", "greedy")
    if cfg.soup not in ("uniform", "greedy"):
        raise MergelabError(f"{where}: soup must be 'uniform' or 'greedy', got {cfg.soup!r}")
    cfg.executor = raw.get("executor", "ray")
    if cfg.executor not in ("local", "ray"):
        raise MergelabError(f"{where}: executor must be 'local' or 'ray', got {cfg.executor!r}")
    cfg.ray_address = raw.get("ray_address")
    th = raw.get("train_head", True)
    if not isinstance(th, bool):
        raise MergelabError(f"{where}: train_head must be true or false")
    cfg.train_head = th
    return cfg
