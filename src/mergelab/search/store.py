"""The trial store: one JSON line per finished trial, appended and flushed as trials finish, so that a
killed driver loses only the trials that were running. ``--resume`` replays the stored trials instead of
running them again."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mergelab.errors import MergelabError


class TrialStore:
    def __init__(self, folder: Path, digest: str, resume: bool):
        self.path = folder / "trials.jsonl"
        self.state = folder / "search_state.json"
        folder.mkdir(parents=True, exist_ok=True)
        if self.state.exists() and not resume:
            raise MergelabError(f"{folder}: holds a search already (use --resume to continue it, or another OUT_DIR)")
        if resume and self.state.exists():
            old = json.loads(self.state.read_text()).get("digest")
            if old != digest:
                raise MergelabError(f"{folder}: --resume with a different search file (space, objective, "
                                    "algorithm, seed or recipe changed); use another OUT_DIR")
        elif not self.state.exists():
            if any(folder.iterdir()):
                raise MergelabError(f"{folder}: exists and is not empty; give a new or empty OUT_DIR")
            self.state.write_text(json.dumps({"digest": digest}))
        self.records: dict[int, dict] = {}
        text = self.path.read_text() if self.path.exists() else ""
        if text:
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue          # the line a killed run was writing
                if not rec.get("naive"):
                    self.records[int(rec["number"])] = rec
        self._fh = open(self.path, "a")
        if text and not text.endswith("\n"):
            self._fh.write("\n")         # end the partial line so that the next record stands alone

    def add(self, rec: dict) -> None:
        self._fh.write(json.dumps(rec, default=float) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if not rec.get("naive"):
            self.records[int(rec["number"])] = rec

    def close(self) -> None:
        self._fh.close()
