"""The one place that reads and writes checkpoints.

Reading is lazy: a safetensors header is parsed up front and each tensor is mapped on demand
(copy-on-write, unmapped with the tensor), so a merge holds a few tensors at a time, never a whole
model. ``.bin`` files are read with ``torch.load(weights_only=True)`` only. Output shards are planned
up front (names, shapes, dtypes are known from the base), their headers written first, and every
tensor is written at its own offset as soon as it is merged (by a background thread, with
``O_DIRECT`` where possible): nothing waits in memory for a shard to fill, and workers may finish in
any order.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import queue
import re
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
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
    """A safetensors file with a validated header, read tensor by tensor."""

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

    # Map each read copy-on-write instead of copying it with pread: the tensor then reads the page
    # cache directly (on the benchmark machine this took a 1 GB model's merge from 3.5 s to 1.0 s of
    # kernel time), a write into it copies only the pages written, and the mapping goes away with the
    # tensor, so a merge still holds only the tensors in flight. False: pread into fresh memory.
    memory_map = True
    MAP_MIN_BYTES = 1 << 20     # smaller reads: one pread is cheaper than map + unmap

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor (or rows [a, b) of it) in memory of its own: thread-safe, and writable without
        touching the file."""
        info = self.infos[name]
        begin, end = self.offsets[name]
        shape = info.shape
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        if end <= begin:
            return torch.empty(shape, dtype=info.dtype)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        if self.memory_map and end - begin >= self.MAP_MIN_BYTES:
            start = (self.data_start + begin) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
            try:      # each live map holds a duplicated descriptor: out of them (EMFILE), read instead
                mapped = mmap.mmap(self._fd, self.data_start + end - start, access=mmap.ACCESS_COPY, offset=start)
            except OSError:
                mapped = None
            if mapped is not None:
                buf = torch.frombuffer(mapped, dtype=torch.uint8, offset=self.data_start + begin - start,
                                       count=end - begin)
                return buf.view(info.dtype).reshape(shape)
        buf = torch.empty(end - begin, dtype=torch.uint8)
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


class _ShardFile:
    """One output file, written at given offsets with ``O_DIRECT`` where the filesystem allows it.

    Buffered writes of a large new file cost a page-cache page allocation and copy per 4 KiB, which is
    CPU time a merge on few cores does not have (on the 2-core benchmark machine, writing 1 GB buffered
    took 2.5-2.9 s of CPU, direct 0.15 s). Direct I/O needs page-aligned offsets, lengths and memory:
    the page-aligned middle of each piece is copied into an aligned staging buffer and written
    directly; the partial pages at its ends are gathered in memory (a few per tensor) and written when
    the file is closed, when every byte of them is known.
    """

    PAGE = 4096
    STAGING = 16 << 20

    def __init__(self, path: Path, size: int, direct: bool, staging: Callable[[], mmap.mmap]):
        self.path, self.size, self._get_staging = path, size, staging
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct_fd: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self.direct_fd = None      # tmpfs and some network filesystems refuse O_DIRECT
        self.pages: dict[int, bytearray] = {}
        os.ftruncate(self.fd, size)

    def _buffered(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def _direct(self, data: memoryview, offset: int) -> bool:
        """Write page-aligned ``data`` at page-aligned ``offset``; False if the filesystem refuses."""
        staging = memoryview(self._get_staging())
        try:
            for start in range(0, len(data), len(staging)):
                chunk = data[start:start + len(staging)]
                # numpy's copy releases the GIL (a memoryview assignment holds it for the whole memcpy)
                np.copyto(np.frombuffer(staging, dtype=np.uint8, count=len(chunk)),
                          np.frombuffer(chunk, dtype=np.uint8))
                done = 0
                while done < len(chunk):
                    done += os.pwrite(self.direct_fd, staging[done:len(chunk)], offset + start + done)
        except OSError:
            os.close(self.direct_fd)
            self.direct_fd = None
            return False
        finally:
            staging.release()
        return True

    def write(self, data: memoryview, offset: int) -> None:
        page = self.PAGE
        end = offset + len(data)
        first = -(-offset // page) * page                       # aligned middle [first, last)
        last = end // page * page
        middle = data[first - offset:last - offset] if last > first else None
        if self.direct_fd is None or (middle is not None and not self._direct(middle, first)):
            self._buffered(data, offset)
            # pages gathered before a fallback are written at close: they must hold these bytes too
            self._gather(data, offset, offset, end, only_known=True)
            return
        if last <= first:
            first = last = end                                   # no aligned middle: all of it is edge
        self._gather(data, offset, offset, min(first, end))
        self._gather(data, offset, max(last, offset), end)

    def _gather(self, data: memoryview, offset: int, lo: int, hi: int, only_known: bool = False) -> None:
        """Copy bytes [lo, hi) of a piece starting at ``offset`` into the pages kept for ``close``
        (``only_known``: into those already kept, which can only be the piece's first and last)."""
        page = self.PAGE
        if hi <= lo:
            return
        first, last = lo // page * page, (hi - 1) // page * page
        bases = sorted({first, last}) if only_known else range(first, hi, page)
        for base in bases:
            if only_known and base not in self.pages:
                continue
            a, b = max(lo, base), min(hi, base + page)
            self.pages.setdefault(base, bytearray(page))[a - base:b - base] = data[a - offset:b - offset]

    def close(self) -> None:
        """Write the gathered edge pages (whole pages, then cut the file back to its size)."""
        try:
            for base in sorted(self.pages):
                page = memoryview(self.pages[base])
                if self.direct_fd is None or not self._direct(page, base):
                    self._buffered(page[:max(0, min(self.PAGE, self.size - base))], base)
            if self.pages:
                os.ftruncate(self.fd, self.size)        # the last page may have been written whole
            self.pages.clear()
        finally:
            self.abort()

    def abort(self) -> None:
        for fd in (self.direct_fd, self.fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.direct_fd = None
        self.fd = -1


class ShardedWriter:
    """Writes safetensors shards whose layout is planned before any tensor is merged.

    ``write(name, tensor)`` may be called from several threads in any order. With ``background`` (the
    default) a single writer thread does the file I/O while the callers go on merging; a bounded queue
    keeps memory bounded (``queue`` pieces at most). ``direct`` writes with ``O_DIRECT`` where the
    filesystem supports it (see ``_ShardFile``).
    """

    def __init__(self, folder: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 2 * 1000**3, metadata: dict[str, str] | None = None,
                 background: bool = True, direct: bool = True, queue_size: int = 4):
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
        self._files: list[_ShardFile] = []
        self._staging: mmap.mmap | None = None
        self._thread: threading.Thread | None = None
        self.total_bytes = 0
        try:
            for i, entries in enumerate(shards):
                header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
                pos = 0
                for name, dtype, shape, nbytes in entries:
                    header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                    "data_offsets": [pos, pos + nbytes]}
                    pos += nbytes
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)
                start = 8 + len(raw)
                for name, dtype, shape, nbytes in entries:
                    begin = header[name]["data_offsets"][0]
                    self.slots[name] = _Slot(i, start + begin, nbytes, dtype, shape)
                file = _ShardFile(self.folder / self.filenames[i], start + pos, direct, self._staging_buffer)
                self._files.append(file)
                file.write(memoryview(struct.pack("<Q", len(raw)) + raw), 0)
                self.total_bytes += pos
        except BaseException:
            self.abort()
            raise
        self._written: set[str] = set()
        self._rows_written: dict[str, int] = {}
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        if background:
            self._queue = queue.Queue(maxsize=max(1, queue_size))
            self._thread = threading.Thread(target=self._drain, name="mergelab-writer", daemon=True)
            self._thread.start()

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write a tensor, or a block of its rows starting at ``row`` (blocks may come in any order)."""
        slot = self.slots[name]
        whole = row == 0 and tuple(tensor.shape) == slot.shape
        if tensor.dtype != slot.dtype or (not whole and tuple(tensor.shape[1:]) != slot.shape[1:]):
            raise RuntimeError(f"{name}: planned {slot.dtype}{list(slot.shape)}, got {tensor.dtype}{list(tensor.shape)}")
        if self._error is not None:
            raise self._error
        tensor = tensor.detach().to("cpu").contiguous()
        if self._queue is None:
            self._write(name, slot, tensor, row, whole)
            return
        while True:          # put, unless the writer has died (then its error is raised here)
            try:
                self._queue.put((name, slot, tensor, row, whole), timeout=0.1)
                return
            except queue.Full:
                if self._error is not None:
                    raise self._error from None

    def _staging_buffer(self) -> mmap.mmap:
        """One page-aligned buffer for the direct writes of all shards (writes are serialised)."""
        if self._staging is None:
            self._staging = mmap.mmap(-1, _ShardFile.STAGING)      # anonymous maps are page-aligned
        return self._staging

    def _write(self, name: str, slot: _Slot, tensor: torch.Tensor, row: int, whole: bool) -> None:
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        offset = slot.offset + (row * (slot.nbytes // slot.shape[0]) if row else 0)
        file = self._files[slot.shard]
        with self._lock:
            file.write(data, offset)
            self._rows_written[name] = self._rows_written.get(name, 0) + (tensor.shape[0] if not whole else 1)
            if whole or self._rows_written[name] >= slot.shape[0]:
                self._written.add(name)

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as e:      # re-raised in the merging threads
                    self._error = e

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self._stop()
        if self._error is not None:
            self.abort()
            raise self._error
        missing = set(self.slots) - self._written
        try:
            for file in self._files:
                file.close()
        finally:
            self._files = []
            self._release_staging()
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {sorted(missing)[0]}")
        if len(self.filenames) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {n: self.filenames[s.shard] for n, s in self.slots.items()}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        if self._thread is not None:
            while True:                         # unblock the writer and let it finish
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._error = self._error or RuntimeError("writer aborted")
            self._stop()
        for file in self._files:
            file.abort()
        self._files = []
        self._release_staging()

    def _release_staging(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None


def save_state_dict(state_dict: Mapping[str, torch.Tensor], folder: str | Path,
                    max_shard_bytes: int = 2 * 1000**3, metadata: dict[str, str] | None = None) -> int:
    """Write an in-memory state dict as (sharded) safetensors into an existing folder; returns the
    bytes of tensor data written."""
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in state_dict.items()]
    writer = ShardedWriter(Path(folder), layout, max_shard_bytes, metadata=metadata)
    try:
        for k, v in state_dict.items():
            writer.write(k, v)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.total_bytes


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
