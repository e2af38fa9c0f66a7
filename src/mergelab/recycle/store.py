"""The run store: one folder per run, written atomically, finished when it holds ``done.json``.

Resumption rests on it: a run whose ``done.json`` records the same spec is never trained again, and
an interrupted run leaves at most a hidden temporary folder, which the next attempt replaces.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from mergelab.errors import MergelabError

WEIGHTS = "model.safetensors"
DONE = "done.json"


def canonical(obj) -> str:
    """A stable text form of a spec, for equality checks across processes and sessions."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class RunStore:
    """``root/<run_id>/{model.safetensors, done.json}``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise MergelabError(f"invalid run id {run_id!r}")
        return self.root / run_id

    def record(self, run_id: str) -> dict | None:
        """The ``done.json`` of a finished run, else None (missing or unreadable = not finished)."""
        path = self.folder(run_id) / DONE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def finished(self, run_id: str, spec: Mapping) -> dict | None:
        """The record of ``run_id`` if it finished with exactly this ``spec``."""
        rec = self.record(run_id)
        if rec is not None and canonical(rec.get("spec")) == canonical(spec) \
                and (self.folder(run_id) / WEIGHTS).is_file():
            return rec
        return None

    def save(self, run_id: str, state: Mapping[str, torch.Tensor], record: Mapping) -> None:
        """Write weights then ``done.json`` into a temporary folder and rename it into place."""
        final = self.folder(run_id)
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}.tmp-", dir=self.root))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS))
            (tmp / DONE).write_text(json.dumps(dict(record), indent=1, sort_keys=True))
            from mergelab.io import fix_modes
            fix_modes(tmp)      # 0644 as the umask allows (safetensors and mkdtemp write owner-only)
            if final.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{run_id}.old-", dir=self.root))
                os.replace(final, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, run_id: str) -> dict[str, torch.Tensor]:
        path = self.folder(run_id) / WEIGHTS
        if not path.is_file():
            raise MergelabError(f"{path}: run {run_id!r} has no weights (not finished?)")
        return load_file(str(path))

    def clean_temporaries(self) -> None:
        """Remove leftovers of interrupted writes (hidden ``.<id>.tmp-*`` folders)."""
        for p in self.root.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
