"""Reading checkpoints: safetensors (single or sharded), ``.bin`` with ``weights_only=True``, state dicts.

Reading is lazy: a safetensors header is parsed up front and each tensor is mapped on demand
(copy-on-write, unmapped with the tensor), so a merge holds a few tensors at a time, never a whole
model. ``.bin`` files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

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


def _no_duplicates(pairs: list) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} appears twice")
        d[k] = v
    return d


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_safetensors_header(raw: bytes, data_size: int, where: str
                             ) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    """Infos and byte ranges of a safetensors header, checked as strictly as the format says.

    Types (dtype name, non-negative integer shape, two integer offsets), each range of exactly the
    tensor's size inside the data, and no two ranges overlapping; anything else is a MergelabError."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MergelabError(f"{where}: corrupt safetensors header ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise MergelabError(f"{where}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise MergelabError(f"{where}: corrupt safetensors header (__metadata__ must map strings to strings)")
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        bad = f"{where}: corrupt safetensors header entry for tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise MergelabError(f"{bad} (needs exactly dtype, shape, data_offsets)")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise MergelabError(f"{bad} (unknown dtype {entry['dtype']!r})")
        shape, offs = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise MergelabError(f"{bad} (shape must be a list of non-negative integers, got {shape!r:.80})")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(x) for x in offs):
            raise MergelabError(f"{bad} (data_offsets must be two integers, got {offs!r:.80})")
        begin, end = offs
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= begin <= end or end > data_size or end - begin != numel * itemsize(dtype):
            raise MergelabError(f"{where}: tensor {name!r} has offsets outside the file or of the wrong "
                                "size (truncated or corrupt file)")
        infos[name] = TensorInfo(dtype, tuple(shape))
        offsets[name] = (begin, end)
    last_end, last_name = 0, None
    for name, (begin, end) in sorted(offsets.items(), key=lambda kv: kv[1]):
        if begin < last_end:
            raise MergelabError(f"{where}: tensors {last_name!r} and {name!r} overlap in the file (corrupt header)")
        if end > begin:
            last_end, last_name = end, name
    return infos, offsets


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
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                raw = f.read(n)
        except OSError as e:
            raise MergelabError(f"{path}: cannot read ({e.strerror})") from None
        except (ValueError, struct.error) as e:
            raise MergelabError(f"{path}: corrupt safetensors header ({e})") from None
        self.data_start = 8 + n
        self.infos, self.offsets = parse_safetensors_header(raw, size - self.data_start, str(path))
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


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: index first, then single files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                raise MergelabError(f"{index}: not a valid shard index (needs a 'weight_map' object)") from None
            except OSError as e:
                raise MergelabError(f"{index}: cannot read ({e.strerror})") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise MergelabError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
            for tensor, shard in weight_map.items():
                if not isinstance(shard, str):
                    raise MergelabError(f"{index}: weight_map[{tensor!r}] must be a shard file name, got {shard!r:.60}")
                if (not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\x00" in shard
                        or Path(shard).name != shard):
                    raise MergelabError(f"{index}: weight_map[{tensor!r}] = {shard!r}: a shard must be a plain file "
                                        "name inside the model folder")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
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
