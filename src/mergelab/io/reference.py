"""Model references as mergekit writes them: ``path``, ``org/name``, ``ref@revision`` and ``model+lora``.

A reference that is not a local path is looked up in the local Hugging Face cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``): ``@revision`` may be a
branch or tag (``refs/<name>``) or a commit hash (or its prefix); no revision means ``main``.
Nothing is ever downloaded: a reference that is not there is one clear error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import MergelabError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    path: str                 # a local folder or file
    lora: str | None = None   # a PEFT adapter folder applied on the fly

    def __str__(self) -> str:
        return f"{self.path}+{self.lora}" if self.lora else self.path


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def cached_snapshot(repo: str, revision: str | None, where: str) -> Path:
    """The local snapshot folder of a hub repository at a revision."""
    root = hub_cache() / ("models--" + repo.replace("/", "--"))
    rev = revision or "main"
    if not root.is_dir():
        raise MergelabError(f"{where}: {repo!r} is neither a local path nor in the Hugging Face cache at "
                            f"{hub_cache()} (nothing is downloaded; fetch it with huggingface-cli first)")
    ref = root / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snapshots = root / "snapshots"
    found = sorted(p for p in snapshots.glob(f"{commit}*") if p.is_dir()) if snapshots.is_dir() else []
    if len(found) != 1:
        have = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
        why = "is ambiguous" if len(found) > 1 else "is not in the cache"
        raise MergelabError(f"{where}: revision {rev!r} of {repo!r} {why} (cached: {', '.join(have) or 'none'}; "
                            "nothing is downloaded)")
    return found[0]


def _one(text: str, relative_to: Path | None, where: str) -> str:
    path, _, revision = text.partition("@") if text.count("@") == 1 and not Path(text).exists() else (text, "", "")
    if text.count("@") > 1 and not Path(text).exists():
        raise MergelabError(f"{where}: invalid model reference {text!r} (more than one '@')")
    p = Path(path).expanduser()
    if not revision:
        if p.exists():
            return str(p)
        if not p.is_absolute() and relative_to is not None and (relative_to / p).exists():
            return str(relative_to / p)
    if _HUB_ID.match(path) and not p.exists():
        return str(cached_snapshot(path, revision or None, where))
    if revision:
        raise MergelabError(f"{where}: {path!r} is a local path: a revision ('@{revision}') applies to hub ids only")
    raise MergelabError(f"{where}: {text!r} does not exist")


def resolve_reference(text: str, relative_to: Path | None, where: str) -> ModelRef:
    """``model[@rev][+lora[@rev]]`` to local paths (the whole string first, if it exists as it is)."""
    if not isinstance(text, str) or not text.strip():
        raise MergelabError(f"{where}: expected a model path, got {text!r}")
    whole = Path(text).expanduser()
    if whole.exists() or (relative_to is not None and not whole.is_absolute() and (relative_to / whole).exists()):
        return ModelRef(_one(text, relative_to, where))
    if "+" in text:
        model, _, lora = text.partition("+")
        return ModelRef(_one(model, relative_to, where), _one(lora, relative_to, f"{where} (LoRA)"))
    return ModelRef(_one(text, relative_to, where))
