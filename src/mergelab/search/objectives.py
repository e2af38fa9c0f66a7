"""What a trial is scored by: a task pool on validation data, perplexity on local text files, a Python
callable or a shell command. Each objective gives one or more named values with a direction.

An evaluator is built once per worker (model skeleton, tokenized data and heads kept) and then scores
an in-memory state dict (``score_state``) or a merged folder (``score_folder``: what the Python and
command objectives always get, and the naive path for the others).
"""
from __future__ import annotations

import importlib
import math
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any, Mapping

from mergelab.errors import MergelabError

DIRECTIONS = ("maximize", "minimize")


def _direction(o: dict, default: str, at: str) -> str:
    d = o.get("direction", default)
    if d not in DIRECTIONS:
        raise MergelabError(f"{at}: direction must be maximize or minimize, got {d!r}")
    return d


def _path(p: Any, base_dir: Path, at: str, what: str) -> str:
    if not isinstance(p, str):
        raise MergelabError(f"{at}: {what} must be a path, got {p!r}")
    q = Path(p).expanduser()
    q = q if q.is_absolute() else base_dir / q
    if not q.exists():
        raise MergelabError(f"{at}: {what} {q} not found")
    return str(q.resolve())


def check_objective(o: dict, at: str, base_dir: Path) -> dict:
    """Validate one objective block and fill ``_outputs`` [(name, direction)]; paths made absolute."""
    kind = o["type"]
    known = {"type", "name", "direction", "weight"} | {
        "perplexity": {"files", "weights", "per_file", "block", "max_tokens", "batch", "tokenizer"},
        "tasks": {"suite", "tasks", "heads", "per_task", "split", "batch"},
        "python": {"function", "names"},
        "command": {"command", "names", "timeout"},
    }[kind]
    unknown = set(o) - known
    if unknown:
        raise MergelabError(f"{at}: unknown key {sorted(unknown)[0]!r} for a {kind} objective "
                            f"(known: {', '.join(sorted(known))})")
    name = str(o.get("name", kind))
    if kind == "perplexity":
        files = o.get("files")
        if isinstance(files, list):
            files = {Path(f).stem: f for f in files}
        if not isinstance(files, dict) or not files:
            raise MergelabError(f"{at}: 'files' must list text files (or map domain -> file)")
        o["files"] = {str(k): _path(v, base_dir, at, f"files.{k}") for k, v in files.items()}
        w = o.get("weights") or {k: 1.0 for k in o["files"]}
        if not isinstance(w, dict) or set(w) != set(o["files"]) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in w.values()):
            raise MergelabError(f"{at}: 'weights' must give a number >= 0 for every domain of 'files'")
        o["weights"] = {k: float(v) for k, v in w.items()}
        if o.get("tokenizer"):
            o["tokenizer"] = _path(o["tokenizer"], base_dir, at, "tokenizer")
        for key, default in (("block", 128), ("max_tokens", 4096), ("batch", 8)):
            v = o.setdefault(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise MergelabError(f"{at}: '{key}' must be an integer >= 2")
        d = _direction(o, "minimize", at)
        o["_outputs"] = ([(f"{name}:{k}", d) for k in o["files"]] if o.get("per_file")
                         else [(name, d)])
    elif kind == "tasks":
        from mergelab.search.bench_adapter import check_tasks_objective
        o["_outputs"] = check_tasks_objective(o, at, base_dir, name, _direction(o, "maximize", at))
    elif kind == "python":
        fn = o.get("function")
        if not isinstance(fn, str) or ":" not in fn:
            raise MergelabError(f"{at}: 'function' must be 'module:function' (called with the merged folder)")
        load_callable(fn, at)
        o["_outputs"] = _named_outputs(o, name, at)
    else:
        if not isinstance(o.get("command"), str) or not o["command"].strip():
            raise MergelabError(f"{at}: 'command' must be a shell command (the merged folder is {{model_dir}}, "
                                "or the last argument)")
        o["_outputs"] = _named_outputs(o, name, at)
    return o


def _named_outputs(o: dict, name: str, at: str) -> list[tuple[str, str]]:
    d = _direction(o, "maximize", at)
    names = o.get("names")
    if names is None:
        return [(name, d)]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise MergelabError(f"{at}: 'names' must be a list of the values' names")
    return [(f"{name}:{n}", d) for n in names]


def load_callable(spec: str, at: str = "objective"):
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise MergelabError(f"{at}: cannot import {spec!r} ({e})") from None
    if not callable(fn):
        raise MergelabError(f"{at}: {spec!r} is not callable")
    return fn


def _numbers(value: Any, n: int, what: str) -> list[float]:
    vals = list(value.values()) if isinstance(value, Mapping) else (
        list(value) if isinstance(value, (list, tuple)) else [value])
    try:
        vals = [float(v) for v in vals]
    except (TypeError, ValueError):
        raise MergelabError(f"{what}: expected {n} number(s), got {value!r}") from None
    if len(vals) != n:
        raise MergelabError(f"{what}: expected {n} number(s), got {len(vals)}")
    return vals


# ----------------------------------------------------------------------------- evaluators
class Evaluator:
    needs_folder = False

    def __init__(self, o: dict, base_folder: str | None):
        try:      # a trial loads models many times: no progress bars from transformers
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:
            pass
        self.o = o
        self.base_folder = base_folder
        self.n = len(o["_outputs"])

    def score_state(self, sd: Mapping[str, Any]) -> list[float]:
        raise NotImplementedError

    def score_folder(self, folder: str) -> list[float]:
        raise NotImplementedError


def _load_into(model, sd: Mapping[str, Any], what: str) -> None:
    missing, unexpected = model.load_state_dict(dict(sd), strict=False)
    if unexpected:
        raise MergelabError(f"{what}: the merged model has tensors the evaluation model lacks: {unexpected[0]}")
    tied = {k for k in missing if "lm_head" in k or k.endswith("position_ids")}
    if set(missing) - tied:
        raise MergelabError(f"{what}: the merged model lacks {sorted(set(missing) - tied)[0]}")


class PerplexityEvaluator(Evaluator):
    """Perplexity exp(mean token NLL) of a causal LM on each text file (blocks of ``block`` tokens, the
    first ``max_tokens`` of a file); the domains averaged with ``weights`` unless ``per_file``."""

    def __init__(self, o: dict, base_folder: str | None):
        super().__init__(o, base_folder)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if base_folder is None:
            raise MergelabError("perplexity objective: the recipe's base model must be a model folder")
        tok = AutoTokenizer.from_pretrained(o.get("tokenizer") or base_folder)
        self.blocks = {}
        for dom, path in o["files"].items():
            ids = tok(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
            ids = ids[:o["max_tokens"]]
            b = o["block"]
            chunks = [ids[i:i + b] for i in range(0, len(ids), b) if len(ids[i:i + b]) >= 2]
            if not chunks:
                raise MergelabError(f"perplexity objective: {path}: fewer than 2 tokens")
            self.blocks[dom] = chunks
        self.model = AutoModelForCausalLM.from_pretrained(base_folder, attn_implementation="eager",
                                                          dtype=torch.float32).eval()

    def _ppl(self, model) -> list[float]:
        import torch
        out = {}
        with torch.no_grad():
            for dom, chunks in self.blocks.items():
                nll, count = 0.0, 0
                for i in range(0, len(chunks), self.o["batch"]):
                    group = chunks[i:i + self.o["batch"]]
                    for length in sorted({len(c) for c in group}):
                        same = [c for c in group if len(c) == length]
                        x = torch.tensor(same, dtype=torch.long)
                        logits = model(input_ids=x).logits[:, :-1].float()
                        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 x[:, 1:].reshape(-1), reduction="sum")
                        nll += float(loss)
                        count += x[:, 1:].numel()
                out[dom] = math.exp(nll / count) if nll / count < 700 else float("inf")
        if self.o.get("per_file"):
            return list(out.values())
        w = self.o["weights"]
        total = sum(w.values()) or 1.0
        return [sum(w[d] * v for d, v in out.items()) / total]

    def score_state(self, sd):
        _load_into(self.model, sd, "perplexity objective")
        return self._ppl(self.model)

    def score_folder(self, folder):
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                     dtype=torch.float32).eval()
        return self._ppl(model)


class PythonEvaluator(Evaluator):
    needs_folder = True

    def __init__(self, o, base_folder):
        super().__init__(o, base_folder)
        self.fn = load_callable(o["function"])

    def score_folder(self, folder):
        return _numbers(self.fn(folder), self.n, self.o["function"])


class CommandEvaluator(Evaluator):
    """Runs the shell command with the merged folder (``{model_dir}``, or appended); the last line of
    its output holds the number(s)."""
    needs_folder = True

    def score_folder(self, folder):
        cmd = self.o["command"]
        q = shlex.quote(folder)
        cmd = cmd.replace("{model_dir}", q) if "{model_dir}" in cmd else f"{cmd} {q}"
        try:
            out = subprocess.run(cmd, shell=True, capture_output=True, text=True,
                                 timeout=self.o.get("timeout", 3600), env={**os.environ, "MODEL_DIR": folder})
        except subprocess.TimeoutExpired:
            raise MergelabError(f"objective command timed out: {self.o['command']}") from None
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or [""])[-1]
            raise MergelabError(f"objective command exited with {out.returncode}: {last}")
        lines = [l for l in out.stdout.strip().splitlines() if l.strip()]
        if not lines:
            raise MergelabError(f"objective command printed no number: {self.o['command']}")
        return _numbers(re.split(r"[\s,]+", lines[-1].strip()), self.n, f"objective command {self.o['command']!r}")


def make_evaluator(o: dict, base_folder: str | None) -> Evaluator:
    if o["type"] == "perplexity":
        return PerplexityEvaluator(o, base_folder)
    if o["type"] == "tasks":
        from mergelab.search.bench_adapter import TasksEvaluator
        return TasksEvaluator(o, base_folder)
    if o["type"] == "python":
        return PythonEvaluator(o, base_folder)
    return CommandEvaluator(o, base_folder)
