"""Output folders: written beside OUT_DIR in a temporary folder and renamed only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mergelab.errors import MergelabError

# files copied from the base folder so that the output loads with transformers like the base
MODEL_SIDE_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")


def copy_model_files(source_folder: Path | None, dest: Path, tokenizer_folder: Path | None = None) -> list[str]:
    """Copy config and tokenizer files so that the output loads like the base model."""
    copied = []
    for folder, names in ((source_folder, MODEL_SIDE_FILES), (tokenizer_folder or source_folder, TOKENIZER_FILES)):
        if folder is None:
            continue
        for name in names:
            if (folder / name).is_file():
                shutil.copy2(folder / name, dest / name)
                copied.append(name)
    return copied


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; rename it to ``out_dir`` only if the block succeeds.

    An existing ``out_dir`` is refused unless ``force``; then it is replaced only after success.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not force:
        raise MergelabError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise MergelabError(f"{out}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)      # mkdtemp makes 0700; the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(src: Path, dest: Path) -> None:
    """Move a finished folder to ``dest``, replacing an existing one only once ``src`` is complete."""
    if dest.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, trash / "old")
        os.replace(src, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dest)
