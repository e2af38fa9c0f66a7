"""The one place that reads and writes checkpoints.

Reading is lazy: a safetensors header is parsed up front and each tensor is read on demand with
``pread``, so a merge holds a few tensors at a time, never a whole model. ``.bin`` files are read with
``torch.load(weights_only=True)`` only. Output shards are planned up front (names, shapes, dtypes are
known from the base), their headers written first, and every tensor is written at its own offset as
soon as it is merged: nothing waits in memory for a shard to fill, and workers may finish in any order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from mergelab.errors import MergelabError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

USER_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
}

# files copied from the base folder so that the output loads with transformers like the base
MODEL_SIDE_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")


def parse_dtype(name: str | None, where: str = "dtype") -> torch.dtype | None:
    if name is None:
        return None
    try:
        return USER_DTYPES[str(name).lower()]
    except KeyError:
        raise MergelabError(f"{where}: unknown dtype {name!r} (use float32, float16 or bfloat16)") from None


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '5GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise MergelabError(f"cannot read size {text!r} (e.g. 2GB, 500MB)")
    unit = m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base ** power)


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


class SafetensorsFile:
    """A memory-mapped safetensors file with a validated header."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise MergelabError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise MergelabError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.infos: dict[str, TensorInfo] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MergelabError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end - begin != numel * itemsize or self.data_start + end > size or begin < 0:
                raise MergelabError(f"{path}: tensor {name!r} has offsets outside the file or of the wrong "
                                    "size (truncated or corrupt file)")
            self.infos[name] = TensorInfo(dtype, shape)
            self.offsets[name] = (begin, end)
        self._fd: int | None = None

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or rows [a, b) of it) with ``pread`` into fresh memory: thread-safe, releases
        the GIL, and the memory is freed with the tensor (a memory map would keep touched pages resident)."""
        info = self.infos[name]
        begin, end = self.offsets[name]
        shape = info.shape
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            view = memoryview(buf.numpy())
            done = 0
            while done < end - begin:
                n = os.preadv(self._fd, [view[done:]], self.data_start + begin + done)
                if n <= 0:
                    raise MergelabError(f"{self.path}: unexpected end of file reading tensor {name!r}")
                done += n
        return buf.view(info.dtype).reshape(shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class PickleFile:
    """A PyTorch ``.bin``/``.pt`` state dict, loaded with ``weights_only=True`` (never arbitrary objects)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises UnpicklingError / RuntimeError with long texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in str(e) or "Unpickl" in type(e).__name__ or "GLOBAL" in str(e):
                raise MergelabError(f"{path}: refused, loading it needs unpickling of arbitrary Python objects "
                                    "(only weights are read; convert it to safetensors)") from None
            raise MergelabError(f"{path}: cannot read PyTorch checkpoint ({first[:200]})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise MergelabError(f"{path}: not a state dict of tensors")
        self.tensors: dict[str, torch.Tensor] = obj
        self.infos = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in obj.items()}

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if rows is None else t[rows[0]:rows[1]]

    def close(self) -> None:
        self.tensors = {}


class Checkpoint:
    """Lazy, read-only access to a model's tensors, wherever and however they are stored."""

    def __init__(self, path: str | Path | None, files: dict[str, object], where: dict[str, str]):
        self.path = Path(path) if path is not None else None
        self._files = files              # file key -> SafetensorsFile | PickleFile | dict
        self._where = where              # tensor name -> file key

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        f = self._files[self._where[name]]
        if isinstance(f, dict):
            t = f[name]
            return TensorInfo(t.dtype, tuple(t.shape))
        return f.infos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its rows [a, b) along the first dimension."""
        f = self._files[self._where[name]]
        if isinstance(f, dict):
            t = f[name]
            return t if rows is None else t[rows[0]:rows[1]]
        return f.get(name, rows)

    @property
    def fresh_tensors(self) -> bool:
        """True when ``get`` returns new memory (safetensors reads), so callers may modify it in place."""
        return all(isinstance(f, SafetensorsFile) for f in self._files.values())

    def file_of(self, name: str) -> str:
        return self._where[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Materialise every tensor (copies): only for small models and tests."""
        return {k: self.get(k).clone() for k in self.keys()}

    def close(self) -> None:
        for f in self._files.values():
            if not isinstance(f, dict):
                f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path or 'in memory'}, {len(self._where)} tensors)"


def from_state_dict(state_dict: Mapping[str, torch.Tensor], label: str = "state dict") -> Checkpoint:
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise MergelabError(f"{label}: entry {bad[0]!r} is not a tensor")
    return Checkpoint(None, {label: dict(state_dict)}, {k: label for k in state_dict})


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: index first, then single files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise MergelabError(f"{index}: not a valid shard index (needs a 'weight_map' object)") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).exists()]
            if missing:
                raise MergelabError(f"{index}: shard {missing[0]} listed in the index is missing")
            return [folder / n for n in names]
    for name in ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors"):
        if (folder / name).exists():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise MergelabError(f"{folder}: no model weights found (expected model.safetensors, sharded *.safetensors "
                        "with model.safetensors.index.json, or pytorch_model.bin)")


def open_checkpoint(source: str | Path | Mapping[str, torch.Tensor] | Checkpoint) -> Checkpoint:
    """Open a HF model folder, a single .safetensors/.bin file, or wrap an in-memory state dict."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return from_state_dict(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise MergelabError(f"{path}: no such file or folder")
    files = _weight_files(path) if path.is_dir() else [path]
    opened: dict[str, object] = {}
    where: dict[str, str] = {}
    for f in files:
        if f.suffix == ".safetensors":
            handle = SafetensorsFile(f)
        elif f.suffix in (".bin", ".pt", ".pth"):
            handle = PickleFile(f)
        else:
            raise MergelabError(f"{f}: unsupported weight file (use .safetensors, or .bin/.pt with weights only)")
        opened[str(f)] = handle
        for name in handle.infos:
            if name in where:
                raise MergelabError(f"{f}: tensor {name!r} also stored in {where[name]}")
            where[name] = str(f)
    return Checkpoint(path, opened, where)


def load_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint into memory (copies); for small models."""
    with open_checkpoint(source) as ckpt:
        return ckpt.state_dict()


def model_folder(source: str | Path) -> Path | None:
    """The folder holding config/tokenizer files of a model path, if any."""
    path = Path(source).expanduser()
    return path if path.is_dir() else None


# ---------------------------------------------------------------- writing

@dataclass
class _Slot:
    shard: int
    offset: int          # absolute offset in the shard file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class ShardedWriter:
    """Writes safetensors shards whose layout is planned before any tensor is merged.

    ``write(name, tensor)`` may be called from several threads in any order; each call writes the
    tensor's bytes at its reserved offset with ``os.pwrite``.
    """

    def __init__(self, folder: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 2 * 1000**3, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in layout:
            nbytes = _itemsize(dtype)
            for s in shape:
                nbytes *= s
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, shape, nbytes))
            used += nbytes
        count = len(shards)
        self.filenames = (["model.safetensors"] if count == 1 else
                          [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self.total_bytes = 0
        for i, entries in enumerate(shards):
            header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
            pos = 0
            for name, dtype, shape, nbytes in entries:
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            for name, dtype, shape, nbytes in entries:
                begin = header[name]["data_offsets"][0]
                self.slots[name] = _Slot(i, start + begin, nbytes, dtype, shape)
            fd = os.open(self.folder / self.filenames[i], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, start + pos)
            self._fds.append(fd)
            self.total_bytes += pos
        self._written: set[str] = set()
        self._rows_written: dict[str, int] = {}
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write a tensor, or a block of its rows starting at ``row`` (blocks may come in any order)."""
        slot = self.slots[name]
        whole = row == 0 and tuple(tensor.shape) == slot.shape
        if tensor.dtype != slot.dtype or (not whole and tuple(tensor.shape[1:]) != slot.shape[1:]):
            raise RuntimeError(f"{name}: planned {slot.dtype}{list(slot.shape)}, got {tensor.dtype}{list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        offset = slot.offset + (row * (slot.nbytes // slot.shape[0]) if row else 0)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fds[slot.shard], view[done:], offset + done)
        with self._lock:
            self._rows_written[name] = self._rows_written.get(name, 0) + (tensor.shape[0] if not whole else 1)
            if whole or self._rows_written[name] >= slot.shape[0]:
                self._written.add(name)

    def close(self) -> None:
        missing = set(self.slots) - self._written
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {sorted(missing)[0]}")
        if len(self.filenames) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {n: self.filenames[s.shard] for n, s in self.slots.items()}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def save_state_dict(state_dict: Mapping[str, torch.Tensor], folder: str | Path,
                    max_shard_bytes: int = 2 * 1000**3) -> None:
    """Write an in-memory state dict as (sharded) safetensors into an existing folder."""
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in state_dict.items()]
    writer = ShardedWriter(Path(folder), layout, max_shard_bytes)
    try:
        for k, v in state_dict.items():
            writer.write(k, v)
    except BaseException:
        writer.abort()
        raise
    writer.close()


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
