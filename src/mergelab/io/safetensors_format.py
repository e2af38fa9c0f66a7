"""The safetensors format without torch: dtype names, validated headers, a model folder's weight files.

``checkpoint`` builds torch tensors on top of this; the torch-free task-arithmetic lane
(``engine.linear_lane``) reads the same headers as numpy arrays, so a merge that needs no torch kernel
does not pay torch's import (2-3 s of a 1 GB merge's 3 s on the benchmark machine).
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import MergelabError

# bytes per element of every safetensors dtype name
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# the dtypes a recipe may name (``dtype``, ``out_dtype``, ``compute_dtype``) -> safetensors names
USER_DTYPE_NAMES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16", "float64": "F64",
}


def user_dtype_name(name: str | None, where: str = "dtype") -> str | None:
    """The safetensors name of a recipe's dtype (None stays None); one line for an unknown one."""
    if name is None:
        return None
    try:
        return USER_DTYPE_NAMES[str(name).lower()]
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


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str                 # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int                 # byte range in the data section
    end: int


def _no_duplicates(pairs: list) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} appears twice")
        d[k] = v
    return d


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, data_size: int, where: str, known_dtypes=ITEMSIZE) -> dict[str, HeaderEntry]:
    """The entries of a safetensors header, checked as strictly as the format says.

    Types (a dtype name of ``known_dtypes``, non-negative integer shape, two integer offsets), each range
    of exactly the tensor's size inside the data, and no two ranges overlapping; anything else is a
    MergelabError."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MergelabError(f"{where}: corrupt safetensors header ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise MergelabError(f"{where}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise MergelabError(f"{where}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries: dict[str, HeaderEntry] = {}
    for name, entry in header.items():
        bad = f"{where}: corrupt safetensors header entry for tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise MergelabError(f"{bad} (needs exactly dtype, shape, data_offsets)")
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in known_dtypes or dtype not in ITEMSIZE:
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
        if not 0 <= begin <= end or end > data_size or end - begin != numel * ITEMSIZE[dtype]:
            raise MergelabError(f"{where}: tensor {name!r} has offsets outside the file or of the wrong "
                                "size (truncated or corrupt file)")
        entries[name] = HeaderEntry(dtype, tuple(shape), begin, end)
    last_end, last_name = 0, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < last_end:
            raise MergelabError(f"{where}: tensors {last_name!r} and {name!r} overlap in the file (corrupt header)")
        if e.end > e.begin:
            last_end, last_name = e.end, name
    return entries


def read_header(path: Path, known_dtypes=ITEMSIZE) -> tuple[int, dict[str, HeaderEntry]]:
    """(offset of the data section, header entries) of a safetensors file."""
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
    return 8 + n, parse_header(raw, size - 8 - n, str(path), known_dtypes)


def map_range(fd: int, data_start: int, begin: int, end: int, access: int = mmap.ACCESS_READ
              ) -> tuple[mmap.mmap, int]:
    """A map of bytes [begin, end) of a file's data section and the offset of ``begin`` inside it."""
    start = (data_start + begin) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    return mmap.mmap(fd, data_start + end - start, access=access, offset=start), data_start + begin - start


def weight_files(folder: Path) -> list[Path]:
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


def model_folder(source: str | Path) -> Path | None:
    """The folder holding config/tokenizer files of a model path, if any."""
    path = Path(source).expanduser()
    return path if path.is_dir() else None
