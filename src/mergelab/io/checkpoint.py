"""Reading checkpoints: safetensors (single or sharded), ``.bin`` with ``weights_only=True``, state dicts.

Reading is lazy: a safetensors header is parsed up front and each tensor is mapped on demand
(copy-on-write, unmapped with the tensor), so a merge holds a few tensors at a time, never a whole
model. ``.bin`` files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from mergelab.errors import MergelabError
from mergelab.io.safetensors_format import (ITEMSIZE, USER_DTYPE_NAMES, HeaderEntry, map_range, parse_header,
                                            read_header, user_dtype_name, weight_files)
from mergelab.io.safetensors_format import model_folder  # noqa: F401  (re-exported)

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

USER_DTYPES = {k: SAFETENSORS_DTYPES[v] for k, v in USER_DTYPE_NAMES.items()}


def parse_dtype(name: str | None, where: str = "dtype") -> torch.dtype | None:
    found = user_dtype_name(name, where)
    return None if found is None else SAFETENSORS_DTYPES[found]


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


def parse_safetensors_header(raw: bytes, data_size: int, where: str
                             ) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    """Infos and byte ranges of a safetensors header, checked as strictly as the format says
    (``safetensors_format.parse_header``; a dtype this torch lacks is unknown)."""
    return _infos(parse_header(raw, data_size, where, SAFETENSORS_DTYPES))


def _infos(entries: Mapping[str, HeaderEntry]) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    return ({k: TensorInfo(SAFETENSORS_DTYPES[e.dtype], e.shape) for k, e in entries.items()},
            {k: (e.begin, e.end) for k, e in entries.items()})


def check_finite(tensor: torch.Tensor, where: str, name: str) -> None:
    """One line naming the file and tensor when a floating-point tensor holds NaN or Inf."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    t = tensor.detach()
    low, high = torch.aminmax(t)       # NaN propagates; much cheaper than isfinite().all()
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    what = " and ".join(x for x in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if x)
    raise MergelabError(f"{where}: tensor {name!r} contains {what} value(s); mergelab refuses non-finite weights")


def check_finite_state(state: Mapping[str, torch.Tensor], where: str) -> None:
    """``check_finite`` on every tensor of a state dict."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor):
            check_finite(t, where, name)


class SafetensorsFile:
    """A safetensors file with a validated header, read tensor by tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.data_start, entries = read_header(path, SAFETENSORS_DTYPES)
        self.infos, self.offsets = _infos(entries)
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
            try:      # each live map holds a duplicated descriptor: out of them (EMFILE), read instead
                mapped, at = map_range(self._fd, self.data_start, begin, end, mmap.ACCESS_COPY)
            except OSError:
                mapped = None
            if mapped is not None:
                buf = torch.frombuffer(mapped, dtype=torch.uint8, offset=at, count=end - begin)
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


def itemsize(dtype: torch.dtype) -> int:
    return ITEMSIZE[DTYPE_NAMES[dtype]]


class PickleFile:
    """A PyTorch ``.bin``/``.pt`` state dict, loaded with ``weights_only=True`` (never arbitrary objects)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zipfile" not in str(e):
                    raise
                # the legacy (non-zip) format cannot be mapped: read it into memory, still weights only
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError / RuntimeError with long texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in str(e) or "Unpickl" in type(e).__name__ or "GLOBAL" in str(e):
                raise MergelabError(f"{path}: refused, loading it needs unpickling of arbitrary Python objects "
                                    "(only weights are read; convert it to safetensors)") from None
            raise MergelabError(f"{path}: cannot read PyTorch checkpoint ({first[:200]})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
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


def open_checkpoint(source: str | Path | Mapping[str, torch.Tensor] | Checkpoint) -> Checkpoint:
    """Open a HF model folder, a single .safetensors/.bin file, or wrap an in-memory state dict."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return from_state_dict(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise MergelabError(f"{path}: no such file or folder")
    files = weight_files(path) if path.is_dir() else [path]
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


# ---------------------------------------------------------------- writing
