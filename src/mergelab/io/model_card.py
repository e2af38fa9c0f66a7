"""The model card every output folder gets: ``README.md`` with the YAML front-matter hub users rely on.

The front-matter names the base model, the merged models, the method, ``library_name`` and tags (as
mergekit's cards do, so hub tooling that reads them keeps working); the body says what was done and
gives the resolved recipe, which ``mergelab merge`` reproduces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CARD_NAME = "README.md"


def _label(path: str | None) -> str | None:
    """A model as the card names it: the folder's name for local paths, the hub id as given otherwise."""
    if path is None:
        return None
    p = Path(str(path))
    return p.name if p.is_absolute() or p.exists() else str(path)


def model_card(*, method: str, base_model: str | None, models: Sequence[str], recipe: Mapping[str, Any] | None,
               kind: str = "merge", tags: Sequence[str] = (), extra: str = "",
               library_name: str = "transformers") -> str:
    base = _label(base_model)
    names = [_label(m) for m in models]
    front = {"base_model": ([base] if base else []) + [n for n in names if n != base],
             "library_name": library_name,
             "tags": ["mergelab", "merge", *tags]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {kind}", ""]
    using = f" using {base} as the base" if base else ""
    lines += [f"This model was made with [mergelab](https://pypi.org/project/mergelab/): "
              f"the **{method}** {kind}{using}.", ""]
    if names:
        lines += ["## Models", ""] + [f"* {n}" for n in names] + [""]
    if extra:
        lines += [extra.rstrip(), ""]
    if recipe:
        lines += ["## Configuration", "", "The resolved recipe (`mergelab merge` reproduces this model from it):", "",
                  "```yaml", yaml.safe_dump(dict(recipe), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, **kwargs: Any) -> Path:
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(**kwargs), encoding="utf-8")
    return path


def read_front_matter(folder: Path) -> dict:
    """The YAML front-matter of a folder's card ({} when there is none)."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    if end < 0:
        return {}
    data = yaml.safe_load(text[4:end])
    return data if isinstance(data, dict) else {}
