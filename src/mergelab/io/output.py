"""Output folders: checked, claimed, written beside OUT_DIR in a temporary folder and renamed only when complete.

The one place where every writing command (merge, lora-merge, upscale smile, adapt, recycle, bench) decides
whether OUT_DIR may be written:

- ``check_output_dir``: OUT_DIR must not be empty, a symbolic link, ``/``, the home folder, the working
  directory or one of their parents, and must not be, contain or lie inside any input. An existing OUT_DIR
  is replaced only with ``force`` and only when mergelab wrote it (``MARKER`` inside) or it is empty.
- ``claim_output``: an exclusive lock beside OUT_DIR (``.NAME.lock``, ``flock``), held until the rename,
  so that a second run into the same OUT_DIR fails at once.
- ``atomic_output_dir``: the temporary folder ``.NAME.tmp-PID-XXXX`` (stale ones of dead processes are
  removed), files made 0644 (as the umask allows), renamed over OUT_DIR only on success; on failure
  the temporary folder and the parent folders this run created are removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from mergelab.errors import MergelabError

# files copied from the base folder so that the output loads with transformers like the base
MODEL_SIDE_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")

# written into every output folder: --force replaces only folders that hold it
MARKER = ".mergelab-output"
_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[^/]*$")

# environment failures that are the user's to fix (full disk, read-only, permissions, ...): one line
_ENV_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
               errno.EISDIR, errno.EIO, errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EEXIST,
               errno.ENOENT, errno.EXDEV, errno.ELOOP, errno.ENOTEMPTY, errno.EBUSY}

_held: dict[Path, int] = {}          # OUT_DIR -> lock fd held by this process
_held_lock = threading.Lock()


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


# ---------------------------------------------------------------- checks

def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path)))))


def _inside(a: Path, b: Path) -> bool:
    """True when ``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def environment_error(exc: OSError, what: str) -> MergelabError:
    """One line for an OSError the user can fix: the path, the cause."""
    where = exc.filename or what
    cause = exc.strerror or os.strerror(exc.errno or 0) or type(exc).__name__
    return MergelabError(f"{where}: {cause} (while {'writing ' + what if what else 'working'})")


def check_output_dir(out_dir: str | os.PathLike | None, inputs: Iterable[str | os.PathLike | None] = (),
                     *, force: bool = False, label: str = "OUT_DIR") -> Path:
    """The real path of OUT_DIR, or one line saying why it may not be written (nothing is changed)."""
    if out_dir is None or not str(os.fspath(out_dir)).strip():
        raise MergelabError(f"{label} is empty: give the folder to write")
    given = Path(os.path.abspath(os.path.expanduser(os.fspath(out_dir))))
    if given.is_symlink():
        raise MergelabError(f"{given}: {label} is a symbolic link (to {os.path.realpath(given)}); "
                            "give a real folder path")
    out = _real(given)
    cwd, home = _real(os.getcwd()), _real(Path.home())
    if out == Path(out.anchor):
        raise MergelabError(f"{out}: {label} is the root folder")
    for what, protected in (("the working directory", cwd), ("the home folder", home)):
        if _inside(protected, out):
            rel = "is" if out == protected else "contains"
            raise MergelabError(f"{out}: {label} {rel} {what}; writing there would replace it")
    for inp in inputs:
        if inp is None or not str(os.fspath(inp)).strip():
            continue
        real_in = _real(inp)
        if out == real_in:
            raise MergelabError(f"{out}: {label} is an input of this run ({inp}); choose another folder")
        if _inside(real_in, out):
            raise MergelabError(f"{out}: {label} contains an input of this run ({real_in}); choose another folder")
        if _inside(out, real_in):
            raise MergelabError(f"{out}: {label} lies inside an input of this run ({real_in}); "
                                "choose another folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise MergelabError(f"{out}: exists and is not a folder")
        if not force:
            raise MergelabError(f"{out}: already exists (use --force to replace it)")
        try:
            entries = os.listdir(out)
        except OSError as e:
            raise environment_error(e, str(out)) from None
        if entries and MARKER not in entries:
            raise MergelabError(f"{out}: exists and was not written by mergelab (no {MARKER} file); refusing to "
                                "replace it even with --force: remove it yourself or choose another folder")
    anc = out.parent
    while not anc.exists():
        if anc.is_symlink():
            raise MergelabError(f"{anc}: a broken symbolic link on the way to {label} {out}")
        anc = anc.parent
    if not anc.is_dir():
        raise MergelabError(f"{anc}: is a file, so {label} {out} cannot be created inside it")
    if not os.access(anc, os.W_OK | os.X_OK):
        ro = _read_only(anc)
        raise MergelabError(f"{anc}: {'read-only file system' if ro else 'permission denied'} "
                            f"(cannot create {label} {out})")
    return out


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ---------------------------------------------------------------- claiming

def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def claim_output(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *,
                 force: bool = False, label: str = "OUT_DIR") -> Iterator[Path]:
    """Check OUT_DIR and hold an exclusive lock beside it for the block; a second run fails at once.

    Re-entrant within a process: ``atomic_output_dir`` inside the block reuses the claim. Parent
    folders created for the lock are removed again if the block fails.
    """
    inputs = list(inputs)
    out = check_output_dir(out_dir, inputs, force=force, label=label)
    with _held_lock:
        if out in _held:
            yield out
            return
    created = _make_parents(out.parent)
    lock = _lock_path(out)
    ok = False
    try:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise environment_error(e, f"the lock of {out}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise MergelabError(f"{out}: another mergelab run (pid {other}) is writing this folder; "
                                f"wait for it or choose another OUT_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _held_lock:
            _held[out] = fd
        try:
            check_output_dir(out_dir, inputs, force=force, label=label)   # a run that finished meanwhile
            clean_stale_temporaries(out.parent)
            yield out
            ok = True
        finally:
            with _held_lock:
                _held.pop(out, None)
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)
    finally:
        if not ok:
            _remove_created(created)


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove mergelab's temporary folders (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``) of dead processes."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if m is None or not e.is_dir(follow_symlinks=False) or _pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders created (deepest last)."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            _remove_created(created)
            raise environment_error(e, str(folder)) from None
        created.append(p)
    return created


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


# ---------------------------------------------------------------- writing

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_modes(folder: str | os.PathLike) -> None:
    """Files 0666 and folders 0777 less the umask (safetensors and mkdtemp create owner-only modes)."""
    mask = _umask()
    root = Path(folder)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.chmod(p, 0o666 & ~mask)


def write_marker(folder: str | os.PathLike, command: str = "mergelab") -> None:
    """The file that lets a later ``--force`` replace this folder."""
    from mergelab import __version__
    Path(folder, MARKER).write_text(json.dumps({"written_by": "mergelab", "version": __version__,
                                                "command": command, "pid": os.getpid()}) + "\n")


def make_temp_dir(out: Path, kind: str = "tmp") -> Path:
    """``.NAME.tmp-PID-XXXX`` beside ``out``: the pid lets a later run remove it if this one dies."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise environment_error(e, str(out)) from None


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, force: bool = False,
                      inputs: Iterable[str | os.PathLike | None] = (), command: str = "mergelab") -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; rename it to ``out_dir`` only if the block succeeds.

    ``out_dir`` is checked and claimed (``claim_output``); OSErrors of the environment (disk full,
    read-only, permissions) become one-line ``MergelabError``s; nothing is left behind on failure.
    """
    with claim_output(out_dir, inputs, force=force) as out:
        # a signal between mkdtemp and the try below would leak the folder: it waits until tmp is known
        main_thread = threading.current_thread() is threading.main_thread()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED) if main_thread else None
        tmp = None
        try:
            try:
                tmp = make_temp_dir(out)
            finally:
                if old_mask is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            write_marker(tmp, command)
            yield tmp
            fix_modes(tmp)
            replace_dir(tmp, out)
        except BaseException as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in _ENV_ERRNOS:
                raise environment_error(exc, str(out)) from None
            if type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):   # safetensors' own writes
                cause = str(exc).split("I/O error:", 1)[1].split("(os error")[0].strip()
                raise MergelabError(f"{out}: {cause} (while writing {out})") from None
            raise


def finish_output(src: str | os.PathLike, out_dir: str | os.PathLike, command: str = "mergelab") -> None:
    """Mark a finished folder as mergelab's, make its modes ordinary and rename it over ``out_dir``."""
    write_marker(src, command)
    fix_modes(src)
    replace_dir(Path(src), _real(out_dir))


_BLOCKED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def replace_dir(src: Path, dest: Path) -> None:
    """Move a finished folder to ``dest``, replacing an existing one only once ``src`` is complete.

    Signals wait for the renames (they are delivered right after), so an interrupted replace never
    leaves OUT_DIR missing with the old and the new output both in temporary folders."""
    main_thread = threading.current_thread() is threading.main_thread()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED) if main_thread else None
    try:
        if dest.exists():
            trash = make_temp_dir(dest, "old")
            os.replace(dest, trash / "old")
            os.replace(src, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(src, dest)
    finally:
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
