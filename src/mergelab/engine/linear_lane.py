"""mergekit's task arithmetic, TIES, DARE and breadcrumbs on numpy, in a process that never imports torch.

A 1 GB task-arithmetic merge reads 4 GB and writes 1 GB: about 1.6 s here, the time of a plain copy.
Importing torch takes 1-3 s more on the benchmark machine, longer than the merge itself, so the CLI
runs the recipes that need no torch kernel here: mergekit semantics, ``task_arithmetic`` (float32 /
bfloat16 / float16 arithmetic), ``ties`` (float32 arithmetic, per-tensor trim), ``dare_ties`` or
``dare_linear`` (float32 arithmetic, mergekit's L1 rescale), ``breadcrumbs`` or ``breadcrumbs_ties`` (float32
arithmetic) of 1-4 models on a base, safetensors inputs
with one tensor layout, one set of parameters. ``plan_lane`` says whether a
recipe qualifies (else the torch engine runs it, with its own checks and errors).

The result is the torch engine's bit for bit, and so is the folder around it (``output_folder``; the
tests compare every byte of the two, and the weights with mergekit's): float32 arithmetic in the order
of ``kernels.fused_task_arithmetic`` (each model's difference, times its weight, added in model order,
divided, scaled, plus the base; one IEEE operation per element, which numpy and torch round alike);
bfloat16 / float16 arithmetic as ``methods.common._mergekit_mix`` (each operation computed in float32
and rounded, the sum of the task vectors accumulated in float32 and rounded once, as torch's CPU
kernels of these dtypes). TIES: the engine's exact thresholds (``kernels.band_select``), mergekit's
choice among magnitudes tied at a cut in the tensors the engine merges whole (``kernels.cpu_sort``, whose
check against torch's sort is read from the user's cache when it was stored there, so that torch stays
unimported), and ``kernels.numpy_consensus`` for the trim and the mix. DARE: the engine's seeded masks and
fixed-order L1 norms (``kernels.numpy_dare``), then the same mix (TIES) or the weighted sum (linear).
Breadcrumbs: the engine's exact band limits, mergekit's choice where magnitudes tie across one (the same
replay), ``numpy_consensus.keep_band_``, then the weighted sum or the mix.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mergelab.engine.output_folder import MergeSummary, finish_folder, parameter_count
from mergelab.engine.pool import BLOCK_ELEMENTS, Progress, default_threads, numel, row_blocks, run_pool
from mergelab.errors import MergelabError
from mergelab.kernels import band_select as BS
from mergelab.kernels import cpu_sort as CS
from mergelab.kernels import numpy_dare as ND
from mergelab.kernels.numpy_consensus import consensus_mix, keep_band_
from mergelab.kernels.numpy_mergekit_stream import NumpyMergekitStream, bernoulli_replay_trusted, mergekit_draw_order
from mergelab.io.output import atomic_output_dir
from mergelab.io.safetensors_format import (FLOAT_NAMES, ITEMSIZE, HeaderEntry, map_range, parse_size, read_header,
                                            user_dtype_name, weight_files)
from mergelab.io.writer import ShardedWriter

MAX_MODELS = 4            # kernels.SEQUENTIAL_ROWS: mergekit's sum of more task vectors is torch's reduction
CHUNK = 1 << 17           # kernels.FUSED_CHUNK: one chunk of every input stays in cache
INPUT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
RAW_BY_ITEMSIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# Rows of at most this many entries per step: every result is elementwise, so any split gives the same
# bits. A quarter of the engine's blocks (``pool.BLOCK_ELEMENTS``) keeps what is in flight (threads x
# mapped inputs, the writer's queue) small whatever the tensors' sizes: peak RSS of the 1 GB / 4 GB task
# arithmetic 124-132 / 129-131 MB against 262-297 / 348-407 MB with 4 M entries, in the same time
# (256 K entries: slower).
LANE_BLOCK_ELEMENTS = 1 << 20
ADAPTER_CONFIG = "adapter_config.json"      # io.lora.CONFIG: a PEFT adapter folder, read by the torch engine


class _Inputs:
    """One model's safetensors files, read block by block as numpy arrays of mapped memory."""

    def __init__(self, path: str, label: str):
        self.label = label
        self.files: list[tuple[Path, int]] = []          # (file, data offset)
        self.entries: dict[str, tuple[int, HeaderEntry]] = {}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        for f in _safetensors_files(Path(path).expanduser()):
            start, entries = read_header(f)
            self.files.append((f, start))
            for name, e in entries.items():
                if name in self.entries:
                    raise MergelabError(f"{f}: tensor {name!r} also stored in {self.files[self.entries[name][0]][0]}")
                self.entries[name] = (len(self.files) - 1, e)

    def raw(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        """The bytes of a tensor (or of rows [a, b) of it) as a flat array of its dtype's width
        (BF16 as uint16), read-only and mapped: nothing is copied until a chunk is computed."""
        index, e = self.entries[name]
        begin, end = e.begin, e.end
        if rows is not None:
            row_bytes = (end - begin) // e.shape[0]
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        dtype = INPUT_DTYPES.get(e.dtype) or RAW_BY_ITEMSIZE[ITEMSIZE[e.dtype]]
        if end <= begin:
            return np.empty(0, dtype=dtype)
        path, data_start = self.files[index]
        with self._lock:
            fd = self._fds.get(index)
            if fd is None:
                fd = self._fds[index] = os.open(path, os.O_RDONLY)
        mapped, at = map_range(fd, data_start, begin, end, mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize, offset=at)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            raise _NotEligible("a PEFT adapter folder")
        files = weight_files(path)
    elif path.is_file():
        files = [path]
    else:
        raise _NotEligible("not a local path")
    if any(f.suffix != ".safetensors" for f in files):
        raise _NotEligible("not safetensors")
    return files


class _NotEligible(Exception):
    """The recipe needs the torch engine (which then gives the errors and warnings of its own checks)."""


@dataclass
class LanePlan:
    recipe: object
    base: _Inputs
    models: list[_Inputs]
    names: list[str]                 # the base's tensors, in its order
    coefficients: dict[str, tuple]   # arithmetic dtype -> (weights or None, divisor or None), see _coefficients
    lam: float
    compute: dict[str, str]          # float tensor -> its arithmetic dtype (F32, BF16, F16)
    out_dtypes: dict[str, str]       # tensor -> safetensors dtype written
    out_dtype_name: str | None       # for config.json
    params: dict
    model_params: list[dict]
    notes: list[str]
    method: str = "task_arithmetic"  # or "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"
    densities: list[float] | None = None     # ties, DARE: per model
    exact_ties: bool = True
    seed: int = 0                    # DARE: the masks' seed
    bands: list[tuple[float, float]] | None = None     # breadcrumbs: (keep, top_remove) per model
    random_seed: int | None = None   # DARE: mergekit's own masks (``--random-seed``), drawn from ``mask_stream``
    mask_stream: object | None = None

    def close(self) -> None:
        for inputs in [self.base, *self.models]:
            inputs.close()


LANE_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties")
DARE_METHODS = ("dare_ties", "dare_linear")
BREADCRUMBS_METHODS = ("breadcrumbs", "breadcrumbs_ties")
# the parameters each method may carry here (shared, per model); anything else goes to the torch engine
_LANE_PARAMS = {"task_arithmetic": ({"weight", "lambda", "normalize"}, {"weight"}),
                "ties": ({"weight", "density", "lambda", "normalize", "trim_scope", "exact_ties"}, {"weight", "density"}),
                **{m: ({"weight", "density", "lambda", "normalize", "seed", "rescale"}, {"weight", "density"})
                   for m in DARE_METHODS},
                **{m: ({"weight", "keep", "top_remove", "lambda", "normalize", "exact_ties"},
                       {"weight", "keep", "top_remove"}) for m in BREADCRUMBS_METHODS}}
# methods whose arithmetic here is float32 only
_FLOAT32_ONLY = ("ties", *DARE_METHODS, *BREADCRUMBS_METHODS)


def plan_lane(recipe, device: str | None = None) -> LanePlan | None:
    """A plan when the recipe is task arithmetic, TIES, DARE or breadcrumbs (each with or without TIES' mix) this
    lane computes exactly as the torch engine; else None.

    Reads the recipe and the inputs' headers only. Anything it does not handle (another method or
    semantics, LoRA, slices, a tokenizer section, per-layer parameters, LiNeS, float64 arithmetic, an
    explicit ``compute_dtype``, ``.bin`` files, tensors that differ between the inputs, another device, more
    than 4 models; for TIES, DARE and breadcrumbs also arithmetic other than float32; for TIES a trim other than
    mergekit's per tensor, a density of 0; for DARE ``rescale: false``) returns None."""
    from mergelab.methods import get_method
    if device not in (None, "cpu") or recipe.compat != "mergekit" or recipe.slices is not None:
        return None
    method = get_method(recipe.method)
    if (method.name not in LANE_METHODS or method.float32_result or not recipe.base_model
            or recipe.tokenizer is not None or recipe.lines is not None or "compute_dtype" in recipe.raw
            or not 1 <= len(recipe.models) <= MAX_MODELS or any(m.lora is not None for m in recipe.models)):
        return None
    resolver = recipe.resolver()
    if not resolver.static:
        return None
    params, model_params = resolver.resolve("", 0.0)
    shared, per_model = _LANE_PARAMS[method.name]
    if set(params) - shared or any(set(p) - per_model for p in model_params):
        return None
    densities = None
    if method.name == "ties":
        densities = [float(p.get("density", params["density"])) for p in model_params]
        if params.get("trim_scope") != "per_tensor" or not all(d > 0 for d in densities):
            return None      # the paper's whole-model trim; a density of 0 (the engine checks inputs first)
    if method.name in DARE_METHODS:
        densities = [float(p.get("density", params["density"])) for p in model_params]
        if not params.get("rescale"):
            return None      # without mergekit's L1 rescale the engine checks every input first
    bands = None
    if method.name in BREADCRUMBS_METHODS:
        bands = [(float(p.get("keep", params["keep"])), float(p.get("top_remove", params["top_remove"])))
                 for p in model_params]
    round_name = user_dtype_name(recipe.dtype)
    out_name = user_dtype_name(recipe.out_dtype or recipe.dtype)
    opened: list[_Inputs] = []
    try:
        base = _Inputs(recipe.base_model, recipe.base_model)
        opened.append(base)
        for m in recipe.models:
            opened.append(_Inputs(m.path, m.label))
        models = opened[1:]
        out_dtypes, compute = {}, {}
        for name, (_, e) in base.entries.items():
            for other in models:
                o = other.entries.get(name)
                if o is None or o[1].dtype != e.dtype or o[1].shape != e.shape:
                    raise _NotEligible("the inputs' tensors differ")
            if e.dtype in FLOAT_NAMES:
                # the arithmetic dtype: mergekit's ``dtype`` (inputs cast to it), else the inputs' own
                compute[name] = round_name or e.dtype
                if compute[name] not in ROUNDERS or e.dtype not in INPUT_DTYPES:
                    raise _NotEligible("float64 or float8 arithmetic")
                if e.dtype == "F64" and compute[name] != "F32":
                    raise _NotEligible("float64 rounded to half precision at once (not through float32)")
                if method.name in _FLOAT32_ONLY and compute[name] != "F32":
                    raise _NotEligible("TIES or DARE in half-precision arithmetic")
                out_dtypes[name] = out_name or e.dtype
            else:
                out_dtypes[name] = e.dtype
        if any(set(m.entries) != set(base.entries) for m in models):
            raise _NotEligible("the inputs' tensors differ")
        w = [float(p.get("weight", 1.0)) for p in model_params]
        coefficients = {c: _coefficients(w, bool(params["normalize"]), c) for c in set(compute.values())}
        if method.name == "task_arithmetic" and any(divisor == 0 for _, divisor in coefficients.values()):
            # float16 weights summing to 0 under normalize: the engine divides by 0 and writes its NaN / Inf bits
            raise _NotEligible("a division by zero")
    except BaseException as e:
        for inputs in opened:
            inputs.close()
        if isinstance(e, _NotEligible):
            return None
        raise
    return LanePlan(recipe, base, models, list(base.entries), coefficients, float(params["lambda"]), compute,
                    out_dtypes, out_name, params, model_params, list(resolver.ignored), method.name, densities,
                    bool(params.get("exact_ties", True)), int(params.get("seed", 0)), bands)


def _coefficients(w: list[float], normalize: bool, dtype: str) -> tuple[np.ndarray | None, np.float32 | None]:
    """The weights (None when all are 1: nothing is multiplied) and mergekit's divisor (their sum, 1 below
    1e-8 in size; None without ``normalize``), as the engine makes them: a tensor of the arithmetic dtype
    (values here in float32, rounded to it), summed in float32 in model order and rounded, compared with
    1e-8 in that dtype (torch casts the scalar: in float16 it is 0, so a zero sum stays 0)."""
    values = np.array(w, dtype=np.float32)
    ROUNDERS[dtype](values)
    divisor = None
    if normalize:
        total = np.zeros(1, dtype=np.float32)
        for x in values:
            total += x
        ROUNDERS[dtype](total)
        tiny = ROUNDERS[dtype](np.array([1e-8], dtype=np.float32))[0]
        divisor = np.float32(1) if abs(total[0]) < tiny else total[0]
    return (values if any(x != 1 for x in w) else None), divisor


def _as_float32(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """A chunk of an input in float32 (a view when it already is)."""
    if dtype == "F32":
        return raw
    if dtype == "BF16":
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    np.copyto(out, raw, casting="unsafe")            # F16 exact; F64 rounded to nearest, as torch's .to()
    return out


def _from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the bytes of ``dtype``, rounded to nearest even as torch's ``.to()``."""
    if dtype == "F32":
        return x
    if dtype == "BF16":
        out = (_round_bfloat16_(x.copy()).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            out[nan] = 0x7FC0
        return out
    with np.errstate(over="ignore"):                  # to +-inf, as torch (which does not warn)
        return x.astype({"F16": np.float16, "F64": np.float64}[dtype])


def _keep(x: np.ndarray) -> np.ndarray:
    return x


def _round_bfloat16_(x: np.ndarray) -> np.ndarray:
    """In place: float32 values rounded to the nearest bfloat16 (ties to even), as torch rounds each
    bfloat16 operation's float result."""
    bits = x.view(np.uint32)
    lsb = bits >> np.uint32(16)
    lsb &= np.uint32(1)
    lsb += np.uint32(0x7FFF)
    bits += lsb
    bits &= np.uint32(0xFFFF0000)
    return x


def _round_float16_(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        np.copyto(x, x.astype(np.float16))
    return x


ROUNDERS = {"F32": _keep, "BF16": _round_bfloat16_, "F16": _round_float16_}


def task_arithmetic_block(base: np.ndarray, base_dtype: str, models: Sequence[np.ndarray], weights: np.ndarray | None,
                          lam: float, divisor: np.float32 | None, chunk: int = CHUNK) -> tuple[np.ndarray, bool]:
    """``base + lam * (sum_i w_i (m_i - base)) [/ divisor]`` in float32, chunk by chunk, in the order of
    ``kernels.fused_task_arithmetic``. Returns the result and whether it is all finite."""
    n = base.size
    out = np.empty(n, dtype=np.float32)
    size = min(chunk, n)
    scratch = np.empty(size, dtype=np.float32)
    conv = [np.empty(size, dtype=np.float32) for _ in range(len(models) + 1)] if base_dtype != "F32" else None
    lam32 = np.float32(lam)
    finite = True
    with np.errstate(all="ignore"):        # an overflow gives +-inf as in torch, which does not warn
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            k = stop - start
            acc, tmp = out[start:stop], scratch[:k]
            b = _as_float32(base[start:stop], base_dtype, conv[0][:k] if conv else None)
            for i, m in enumerate(models):
                step = acc if i == 0 else tmp
                np.subtract(_as_float32(m[start:stop], base_dtype, conv[i + 1][:k] if conv else None), b, out=step)
                if weights is not None:
                    np.multiply(step, weights[i], out=step)
                if i:
                    np.add(acc, tmp, out=acc)
            if divisor is not None:
                np.divide(acc, divisor, out=acc)
            if lam != 1:
                np.multiply(acc, lam32, out=acc)
            np.add(acc, b, out=acc)
            if finite and not np.isfinite(np.add.reduce(acc)):    # NaN/Inf reach the sum; its overflow is rare
                finite = bool(np.isfinite(acc).all())
    return out, finite


def reduced_task_arithmetic_block(base: np.ndarray, base_dtype: str, models: Sequence[np.ndarray], compute: str,
                                  weights: np.ndarray | None, lam: float, divisor: np.float32 | None,
                                  chunk: int = CHUNK) -> tuple[np.ndarray, bool]:
    """The engine's mergekit task arithmetic in bfloat16 / float16 arithmetic (``methods.common._mergekit_mix``
    without consensus): every operation computed in float32 and rounded to ``compute``, as torch's CPU kernels
    of these dtypes do, the task vectors' sum accumulated in float32 (torch's ``sum``) and rounded once.
    Returns float32 values (each exactly a ``compute`` value) and whether all are finite."""
    rnd = ROUNDERS[compute]
    n = base.size
    out = np.empty(n, dtype=np.float32)
    size = min(chunk, n)
    b_buf, m_buf, tmp_buf = (np.empty(size, dtype=np.float32) for _ in range(3))
    lam32 = np.float32(lam)
    finite = True
    with np.errstate(all="ignore"):
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            k = stop - start
            acc, tmp = out[start:stop], tmp_buf[:k]
            b = rnd(_copy_float32(base[start:stop], base_dtype, b_buf[:k]))       # inputs cast to ``compute``
            for i, m in enumerate(models):
                step = acc if i == 0 else tmp
                np.subtract(rnd(_copy_float32(m[start:stop], base_dtype, m_buf[:k])), b, out=step)
                rnd(step)
                if weights is not None:
                    np.multiply(step, weights[i], out=step)
                    rnd(step)
                if i:
                    np.add(acc, tmp, out=acc)
            rnd(acc)
            if divisor is not None:
                np.divide(acc, divisor, out=acc)
                rnd(acc)
            if lam != 1:
                np.multiply(acc, lam32, out=acc)
                rnd(acc)
            np.add(acc, b, out=acc)
            rnd(acc)
            if finite and not np.isfinite(np.add.reduce(acc)):
                finite = bool(np.isfinite(acc).all())
    return out, finite


def _copy_float32(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """A chunk of an input in float32, in ``out`` (writable, unlike the mapped input)."""
    if dtype == "F32":
        np.copyto(out, raw)
        return out
    return _as_float32(raw, dtype, out)



# ---------------------------------------------------------------------------------------------- TIES
# mergekit's TIES (``methods.ties`` under mergekit semantics, per-tensor trim) as the torch engine computes
# it: a tensor the engine merges whole (at most ``pool.BLOCK_ELEMENTS`` entries, or one row) keeps exactly
# mergekit's top ``max(1, int(d n))`` magnitudes of each task vector, ties at the cut chosen as its sort
# chooses them (``kernels.cpu_sort``); a larger tensor, merged in blocks, keeps every magnitude at least its
# exact threshold; then the consensus mix (``kernels.numpy_consensus``).
TIES_SAMPLE = 1 << 16        # streaming.TENSOR_SAMPLE: entries sampled to bracket a blocked tensor's threshold
BAND_CAP = 1 << 22           # streaming.BAND_CAP: most values a bracket may hold
# entries per step of the lane's TIES passes (any split gives the same bits): 64 K beat 128 K by 15 % in the
# mix here (32 K-64 K fastest: the chunk's rows and buffers stay in L2)
TIES_CHUNK = 1 << 16


# Task vectors of a tensor held in memory at most (per worker). A larger tensor takes two passes, the second over
# pieces of ``LANE_BLOCK_ELEMENTS`` entries: TIES and breadcrumbs find each trim with one task vector at a time,
# DARE its norms,
# so that the peak does not follow the tensors' sizes (for one more read of their inputs from the page cache).
HOLD_BYTES = 40 << 20


def _pieces(span: tuple[int, int], shape: tuple, elements: int) -> list[tuple[int, int]]:
    """Row blocks of at most ``elements`` entries inside the rows ``span``."""
    inner = row_blocks((span[1] - span[0], *shape[1:]), elements)
    return [span] if inner is None else [(span[0] + a, span[0] + b) for a, b in inner]


def _kept_counts(densities: Sequence[float], n: int) -> list[int | None]:
    """mergekit's kept entries per model (``max(1, int(d n))``), None where nothing is trimmed."""
    return [None if d >= 1 or n == 0 else max(1, int(d * n)) for d in densities]


def _kth_magnitude_counted(delta: np.ndarray, rank: int) -> tuple[float, int, int]:
    """(rank-th smallest ``|delta|``, how many are below it, how many at most it), exactly (``band_select``).
    Computing the magnitudes while the task vector is formed, chunk by chunk, was no faster (the tensors fit
    in cache)."""
    if delta.size > BS.SAMPLE * 8:
        return BS.kth_sampled(delta, rank, counted=True, magnitudes_of=1.0)
    mag = np.abs(delta)
    value = np.partition(mag, rank - 1)[rank - 1]
    return float(value), int(np.count_nonzero(mag < value)), int(np.count_nonzero(mag <= value))


def _mergekit_top(delta: np.ndarray, kept: int, check) -> np.ndarray:
    """mergekit's mask of the ``kept`` largest magnitudes (``argsort(descending)[:kept]`` of float32 ``|delta|``,
    ties as that sort leaves them): replayed (``cpu_sort``), or torch's own sort where the replay does not
    apply. NaN (only from a NaN or Inf input) calls ``check``, which names the input."""
    keys = np.negative(np.abs(delta))
    if np.isnan(keys.sum()):
        check()
    if CS.replay_trusted():
        mask = CS.sort_slice_mask(keys, 0, kept, overwrite=True)
        if mask is not None:
            return mask
    import torch         # a replay past the heapsort depth, or a torch whose sort it does not match
    mask = np.zeros(delta.size, dtype=bool)
    mask[torch.argsort(torch.from_numpy(np.abs(delta)), descending=True)[:kept].numpy()] = True   # keys moved
    return mask


def _trim_of(plan: LanePlan, delta: np.ndarray, kept: int, check) -> float | np.ndarray:
    """mergekit's trim of one task vector of a tensor merged whole: its exact threshold, or the mask of its
    ``kept`` largest magnitudes where magnitudes tie across the cut (and ``exact_ties``)."""
    n = delta.size
    value, less, _ = _kth_magnitude_counted(delta, n - kept + 1)
    if plan.exact_ties and value and n - less != kept:       # magnitudes tied across the cut
        return _mergekit_top(delta, kept, check)
    return value


def _ties_whole(plan: LanePlan, name: str, dtype: str, check) -> tuple[np.ndarray, bool]:
    """A tensor the engine merges whole: its task vectors, mergekit's exact trim, the consensus mix."""
    b, deltas = _block_deltas(plan, name, dtype, None, range(len(plan.models)))
    trims = [None if kept is None else _trim_of(plan, deltas[i], kept, check)
             for i, kept in enumerate(_kept_counts(plan.densities, b.size))]
    return consensus_mix(b, deltas, _weights(plan), bool(plan.params["normalize"]), plan.lam, trims=trims,
                         chunk=TIES_CHUNK)


def _ties_whole_in_pieces(plan: LanePlan, name: str, dtype: str, shape: tuple, elements: int, check, write) -> None:
    """A tensor the engine merges whole but too large to hold every task vector (``HOLD_BYTES``): the trims one
    task vector at a time, then the mix piece by piece (the same bits: every step after the trim is
    elementwise). ``write(merged, rows)``."""
    n = numel(shape)
    trims = []
    for i, kept in enumerate(_kept_counts(plan.densities, n)):
        if kept is None:
            trims.append(None)
            continue
        _, deltas = _block_deltas(plan, name, dtype, None, [i])
        trims.append(_trim_of(plan, deltas[0], kept, check))
        deltas = None
    per_row = numel(shape[1:])
    for piece in _pieces((0, shape[0]), shape, elements):
        b, deltas = _block_deltas(plan, name, dtype, piece, range(len(plan.models)))
        start, stop = piece[0] * per_row, piece[1] * per_row
        merged, finite = consensus_mix(b, deltas, _weights(plan), bool(plan.params["normalize"]), plan.lam,
                                       trims=[t[start:stop] if isinstance(t, np.ndarray) else t for t in trims],
                                       chunk=TIES_CHUNK)
        if not finite:
            check()
        write(merged, piece)


def _weights(plan: LanePlan) -> list[float]:
    return [float(p.get("weight", 1.0)) for p in plan.model_params]


def _block_deltas(plan: LanePlan, name: str, dtype: str, rows: tuple[int, int] | None, which: Sequence[int],
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(the base's block in float32, ``[len(which), block]`` task vectors of those models)."""
    raw = plan.base.raw(name, rows)
    b = _as_float32(raw, dtype, None if dtype == "F32" else np.empty(raw.size, dtype=np.float32))   # read only
    deltas = np.empty((len(which), raw.size), dtype=np.float32)
    conv = None if dtype == "F32" else np.empty(raw.size, dtype=np.float32)
    with np.errstate(all="ignore"):
        for j, i in enumerate(which):
            np.subtract(_as_float32(plan.models[i].raw(name, rows), dtype, conv), b, out=deltas[j])
    return b, deltas


def _streamed_values(plan: LanePlan, name: str, dtype: str, shape: tuple, blocks: list[tuple[int, int]],
                     wanted: dict) -> dict:
    """Exact magnitude ranks of task vectors over a tensor merged in blocks (``streaming._block_selections``):
    ``wanted`` maps a key to (model, rank); whole sampled rows bracket each, one pass over the blocks counts and
    keeps the brackets, two histogram passes find the ones a bracket missed. Returns key -> value."""
    if not wanted:
        return {}
    n = numel(shape)
    which = sorted({i for i, _ in wanted.values()})
    per_row = numel(shape[1:])
    rng = np.random.default_rng(n * 1_000_003 + len(shape))
    rows = np.sort(rng.choice(shape[0], min(shape[0], -(-TIES_SAMPLE // per_row)), replace=False))
    parts: dict[int, list[np.ndarray]] = {i: [] for i in which}
    for r in rows:
        _, deltas = _block_deltas(plan, name, dtype, (int(r), int(r) + 1), which)
        for j, i in enumerate(which):
            parts[i].append(np.abs(deltas[j]))
    samples = {i: np.sort(np.concatenate(parts[i])) for i in which}
    bands = {key: BS.BandSelect(rank, *BS.sample_bracket(samples[i], rank, n), max_kept=BAND_CAP)
             for key, (i, rank) in wanted.items()}
    row_of = {i: j for j, i in enumerate(which)}
    for rows_ in blocks:
        _, deltas = _block_deltas(plan, name, dtype, rows_, which)
        for key, (i, _) in wanted.items():
            bands[key].add(part=bands[key].part_of_magnitudes(deltas[row_of[i]]))
    found = {key: band.finish() for key, band in bands.items()}
    missed = {key: BS.RadixSelect32(wanted[key][1]) for key in wanted if found[key] is None}
    models = sorted({wanted[key][0] for key in missed})
    for stage in ("high", "low") if missed else ():
        for rows_ in blocks:
            _, deltas = _block_deltas(plan, name, dtype, rows_, models)
            for key, sel in missed.items():
                getattr(sel, f"add_{stage}")(np.abs(deltas[models.index(wanted[key][0])]))
        for sel in missed.values():
            if stage == "high":
                sel.finish_high()
    found.update({key: sel.finish_low() for key, sel in missed.items()})
    return found


def _streamed_thresholds(plan: LanePlan, name: str, dtype: str, shape: tuple, blocks: list[tuple[int, int]],
                         ) -> list[float | None]:
    """Each model's exact TIES threshold over a tensor merged in blocks."""
    n = numel(shape)
    wanted = {i: (i, n - k + 1) for i, k in enumerate(_kept_counts(plan.densities, n)) if k is not None}
    found = _streamed_values(plan, name, dtype, shape, blocks, wanted)
    return [found.get(i) for i in range(len(plan.models))]


# ---------------------------------------------------------------------------------------------- breadcrumbs
# mergekit's breadcrumbs and breadcrumbs_ties (``methods.breadcrumbs`` under mergekit semantics) as the torch
# engine computes them: per model the band of magnitude ranks (n_bot, n_bot + int(keep n)] of its task vector
# (n_bot = n - int(keep n) - int(top_remove n)): in a tensor the engine merges whole, its exact limits, or
# where magnitudes tie across a limit (and ``exact_ties``) the members mergekit's sort gives that slice; in a
# blocked tensor the exact limits; then the weighted sum or the consensus mix. The result is checked for NaN /
# Inf (the band keeps NaN, and turns an Inf above it into NaN), and so are the inputs of a tensor where a model's
# band is empty (nothing of it reaches the result).
_DROP_ALL = "drop all"


def _band_of(band: tuple[float, float], n: int) -> tuple[int, int, int | None, int | None] | None:
    """(kept, n_bot, low rank, high rank) of ``breadcrumbs._breadcrumbs_select``; None: the task vector is whole."""
    keep, top_remove = band
    target = int(keep * n)
    if keep >= 1:
        return None
    n_bot = max(0, n - target - int(top_remove * n))
    return (target, n_bot, n_bot + 1 if n_bot > 0 else None,
            n_bot + target if n_bot + target < n else None)


def _mergekit_band(delta: np.ndarray, lo: int, hi: int, check) -> np.ndarray:
    """mergekit's mask of the entries ``torch.sort(|delta|)`` (ascending) puts at [lo, hi): replayed, or torch's sort."""
    keys = np.abs(delta)
    nan = bool(np.isnan(keys.sum()))
    if nan:
        check()                # names a NaN / Inf input; NaN from finite inputs (Inf - Inf) sorts as torch sorts it
    if not nan and CS.replay_trusted():
        mask = CS.sort_slice_mask(keys, lo, hi, overwrite=True)
        if mask is not None:
            return mask
    import torch         # a replay past the heapsort depth, or a torch whose sort it does not match
    mask = np.zeros(delta.size, dtype=bool)
    mask[torch.sort(torch.from_numpy(np.abs(delta)), descending=False).indices[lo:hi].numpy()] = True
    return mask


def _band_trim_of(plan: LanePlan, delta: np.ndarray, index: int, check):
    """Model ``index``'s band in a tensor merged whole: None (whole), ``_DROP_ALL``, (low, high) or a mask."""
    found = _band_of(plan.bands[index], delta.size)
    if found is None:
        return None
    target, n_bot, low_rank, high_rank = found
    if target <= 0:
        return _DROP_ALL
    low, below = (None, 0) if low_rank is None else _kth_magnitude_counted(delta, low_rank)[:2]
    high, at_most = (None, delta.size) if high_rank is None else _kth_magnitude_counted(delta, high_rank)[::2]
    if plan.exact_ties and at_most - below != target:          # magnitudes tie across a limit
        return _mergekit_band(delta, n_bot, n_bot + target, check)
    return low, high


def _apply_band_(delta: np.ndarray, trim, start: int = 0) -> None:
    """In place: a band from ``_band_trim_of`` (a mask: its entries from ``start``) on a task vector or a piece."""
    if trim is None:
        return
    with np.errstate(all="ignore"):          # Inf * 0 and Inf - Inf are NaN, as in torch (which does not warn)
        if isinstance(trim, str):
            delta.fill(0)
        elif isinstance(trim, np.ndarray):
            np.multiply(delta, trim[start:start + delta.size], out=delta)      # mergekit's delta * mask
        else:
            keep_band_(delta, *trim)


def _band_mix(plan: LanePlan, base: np.ndarray, deltas: np.ndarray) -> tuple[np.ndarray, bool]:
    if plan.method == "breadcrumbs":
        return _linear_mix(base, deltas, *plan.coefficients["F32"], plan.lam)
    return consensus_mix(base, deltas, _weights(plan), bool(plan.params["normalize"]), plan.lam, chunk=TIES_CHUNK)


def _breadcrumbs_tensor(plan: LanePlan, name: str, dtype: str, shape: tuple, whole_limit: int, elements: int,
                        check_inputs, write) -> None:
    """One tensor: whole in memory when it is small enough, else the bands one task vector at a time and the
    mix in pieces; a tensor the engine merges in blocks: the exact limits streamed, then the blocks."""
    n = numel(shape)
    spans = row_blocks(shape, whole_limit)
    empty = any(b is not None and b[0] <= 0 for b in (_band_of(band, n) for band in plan.bands))
    per_row = numel(shape[1:])
    if spans is None:
        check = lambda: check_inputs(name, None)           # noqa: E731
        if empty:
            check()
        if 4 * len(plan.models) * n <= HOLD_BYTES:
            b, deltas = _block_deltas(plan, name, dtype, None, range(len(plan.models)))
            for i in range(len(plan.models)):
                _apply_band_(deltas[i], _band_trim_of(plan, deltas[i], i, check))
            merged, finite = _band_mix(plan, b, deltas)
            if not finite:
                check()
            write(merged, None)
            return
        trims = []
        for i in range(len(plan.models)):
            _, deltas = _block_deltas(plan, name, dtype, None, [i])
            trims.append(_band_trim_of(plan, deltas[0], i, check))
            deltas = None
        for piece in _pieces((0, shape[0]), shape, elements):
            b, deltas = _block_deltas(plan, name, dtype, piece, range(len(plan.models)))
            for i, trim in enumerate(trims):
                _apply_band_(deltas[i], trim, piece[0] * per_row)
            merged, finite = _band_mix(plan, b, deltas)
            if not finite:
                check()
            write(merged, piece)
        return
    wanted = {}
    for i, band in enumerate(plan.bands):
        found = _band_of(band, n)
        if found is not None and found[0] > 0:
            for j, rank in enumerate(found[2:]):
                if rank is not None:
                    wanted[i, j] = (i, rank)
    values = _streamed_values(plan, name, dtype, shape, [p for span in spans for p in _pieces(span, shape, elements)],
                              wanted)
    trims = []
    for i, band in enumerate(plan.bands):
        found = _band_of(band, n)
        trims.append(None if found is None else _DROP_ALL if found[0] <= 0 else (values.get((i, 0)), values.get((i, 1))))
    for span in spans:
        if empty:
            check_inputs(name, span)
        for piece in _pieces(span, shape, elements):
            b, deltas = _block_deltas(plan, name, dtype, piece, range(len(plan.models)))
            for i, trim in enumerate(trims):
                _apply_band_(deltas[i], trim)
            merged, finite = _band_mix(plan, b, deltas)
            if not finite:
                check_inputs(name, span)
            write(merged, piece)


# ---------------------------------------------------------------------------------------------- DARE
# mergekit's DARE-TIES and DARE linear (``methods.dare`` under mergekit semantics, L1 rescale) as the torch
# engine computes them: per tensor (or per engine block of a larger one: the masks are seeded per block)
# each model's task vector dropped at random (``numpy_dare``) and rescaled to its L1 norm before the drop
# (norms in float32 in the engine's fixed order, a blocked tensor's added over its blocks in float64 first),
# then the consensus mix (TIES) or the weighted sum (linear). A task vector's norm that is not finite sends
# the engine, and this lane, to the inputs' NaN / Inf check.


def _dare_drop_(plan: LanePlan, name: str, index: int, span_row: int, delta: np.ndarray, offset: int = 0) -> None:
    """In place: ``kernels.dare(delta, 1 - density, job.generator(index), rescale="none")`` on entries
    [offset, offset + delta.size) of the engine's block (or whole tensor) starting at row ``span_row``; with
    ``--random-seed``, ``methods.dare.dare_mask_``'s product with mergekit's own mask."""
    density = plan.densities[index]
    if plan.mask_stream is not None and (name, index) in plan.mask_stream:
        start = span_row * numel(plan.base.entries[name][1].shape[1:]) + offset
        plan.mask_stream.apply_((name, index), start, delta, density)
        return
    drop = 1.0 - density
    if drop >= 1:
        delta.fill(0)
    elif drop > 0:
        ND.dare_mask_(delta, drop, ND.torch_seed_draw(ND.mask_seed(plan.seed, name, index, span_row)), offset)


def _dare_rescale_(delta: np.ndarray, density: float, before: float, after: float) -> None:
    """mergekit's L1 rescale of a dropped task vector, as ``methods.dare``: times float32(before / after)."""
    if 0 < density < 1 and before >= 1e-7 and after >= 1e-7:
        np.multiply(delta, np.float32(before / after), out=delta)


def _dare_norms(plan: LanePlan, name: str, dtype: str, shape: tuple, span: tuple[int, int], span_row: int,
                elements: int) -> list[float]:
    """``dare._dare_stats`` of the engine's block (or whole tensor) ``span``: each model's L1 norm before and after
    its drop, [before_0, after_0, before_1, ...], read in pieces of at most ``elements`` entries."""
    per_row = numel(shape[1:])
    sums = [ND.OrderedL1() for _ in range(2 * len(plan.models))]
    for piece in _pieces(span, shape, elements):
        _, deltas = _block_deltas(plan, name, dtype, piece, range(len(plan.models)))
        for i in range(len(plan.models)):
            sums[2 * i].add(deltas[i])
            _dare_drop_(plan, name, i, span_row, deltas[i], (piece[0] - span[0]) * per_row)
            sums[2 * i + 1].add(deltas[i])
    return [float(total.result()) for total in sums]


def _linear_mix(base: np.ndarray, deltas: np.ndarray, weights: np.ndarray | None, divisor: np.float32 | None,
                lam: float) -> tuple[np.ndarray, bool]:
    """``methods.common._mergekit_mix`` without consensus, on float32 ``deltas`` (overwritten): times the weights,
    added in model order, divided by the weights' sum (``normalize``), times ``lam``, plus the base."""
    with np.errstate(all="ignore"):
        if weights is not None:
            np.multiply(deltas, weights.reshape(-1, 1), out=deltas)
        out = deltas[0] if len(deltas) == 1 else np.add(deltas[0], deltas[1])
        for row in deltas[2:]:
            np.add(out, row, out=out)
        if divisor is not None:
            np.divide(out, divisor, out=out)
        if lam != 1:
            np.multiply(out, np.float32(lam), out=out)
        np.add(out, base, out=out)
        finite = bool(np.isfinite(np.add.reduce(out))) or bool(np.isfinite(out).all())
    return out, finite


def _dare_piece(plan: LanePlan, name: str, dtype: str, rows: tuple[int, int] | None, span_row: int, offset: int,
                norms: list[float] | None, check) -> tuple[np.ndarray, bool]:
    """Rows ``rows`` (None: the whole tensor), entry ``offset`` of the engine's block starting at ``span_row``:
    drops, rescales to ``norms`` (None: this piece is the whole block, its own norms), the consensus mix or the
    weighted sum."""
    b, deltas = _block_deltas(plan, name, dtype, rows, range(len(plan.models)))
    for i, density in enumerate(plan.densities):
        before = norms[2 * i] if norms is not None else float(ND.ordered_l1(deltas[i]))
        if not np.isfinite(before):
            check()
        _dare_drop_(plan, name, i, span_row, deltas[i], offset)
        after = norms[2 * i + 1] if norms is not None else float(ND.ordered_l1(deltas[i]))
        _dare_rescale_(deltas[i], density, before, after)
    if plan.method == "dare_linear":
        return _linear_mix(b, deltas, *plan.coefficients["F32"], plan.lam)
    return consensus_mix(b, deltas, _weights(plan), bool(plan.params["normalize"]), plan.lam, chunk=TIES_CHUNK)


def _dare_tensor(plan: LanePlan, name: str, dtype: str, shape: tuple, whole_limit: int, elements: int, check_inputs,
                 write) -> None:
    """One tensor: whole in memory when it is small enough, else norms over the engine's blocks first (added
    over them in float64, as the engine's stats pass), then the merge, piece by piece. ``write(merged, rows)``."""
    spans = row_blocks(shape, whole_limit)
    if spans is None and 4 * len(plan.models) * numel(shape) <= HOLD_BYTES:
        merged, finite = _dare_piece(plan, name, dtype, None, 0, 0, None, lambda: check_inputs(name, None))
        if not finite:
            check_inputs(name, None)
        write(merged, None)
        return
    per_row = numel(shape[1:])
    blocked = spans is not None
    spans = spans or [(0, shape[0])]
    norms = None
    for span in spans:                   # a whole tensor: one span, its norms as computed (no float64 sum)
        part = _dare_norms(plan, name, dtype, shape, span, span[0], elements)
        norms = part if norms is None else [a + b for a, b in zip(norms, part)]
    for span in spans:
        check_rows = span if blocked else None
        for piece in _pieces(span, shape, elements):
            merged, finite = _dare_piece(plan, name, dtype, piece, span[0], (piece[0] - span[0]) * per_row, norms,
                                         lambda: check_inputs(name, check_rows))
            if not finite:
                check_inputs(name, piece)
            write(merged, piece)
            merged = None


def run_lane(plan: LanePlan, out_dir: str | Path, *, force: bool = False, threads: int | None = None,
             progress: Progress | None = None, shard_size: str | int | None = None,
             block_elements: int | None = None) -> MergeSummary:
    """Merge as planned into ``out_dir`` (written beside it and renamed when complete), as ``merge`` does."""
    started = time.perf_counter()
    # TIES: which tensors the engine merges whole (exact ties) is decided by its block size
    whole_limit = block_elements or BLOCK_ELEMENTS
    block_elements = block_elements or LANE_BLOCK_ELEMENTS
    recipe = plan.recipe
    threads = threads or default_threads()
    max_shard = parse_size(shard_size if shard_size is not None else recipe.shard_size)
    shapes = {n: plan.base.entries[n][1].shape for n in plan.names}
    layout = [(n, plan.out_dtypes[n], shapes[n]) for n in plan.names]

    def check_inputs(name: str, rows: tuple[int, int] | None) -> None:
        """The torch engine's NaN/Inf check of every input cast to the arithmetic dtype, naming the first bad one."""
        for inputs in [plan.base, *plan.models]:
            e = inputs.entries[name][1]
            raw = inputs.raw(name, rows)
            values = ROUNDERS[plan.compute[name]](_copy_float32(raw, e.dtype, np.empty(raw.size, dtype=np.float32)))
            if values.size and not np.isfinite(values).all():
                raise MergelabError(f"{inputs.label}: tensor {name!r} contains NaN or Inf")

    try:
        with atomic_output_dir(out_dir, force=force, inputs=recipe.input_paths(), command="merge") as tmp:
            writer = ShardedWriter(tmp, layout, max_shard, metadata={"mergelab_method": plan.method})

            def work(name: str) -> None:
                e = plan.base.entries[name][1]
                if e.dtype not in FLOAT_NAMES:
                    writer.write(name, np.array(plan.base.raw(name, None)).reshape(e.shape))
                    return
                shape = shapes[name]
                out = plan.out_dtypes[name]

                def write(merged: np.ndarray, rows: tuple[int, int] | None) -> None:
                    block_shape = shape if rows is None else (rows[1] - rows[0], *shape[1:])
                    writer.write(name, _from_float32(merged, out).reshape(block_shape), rows[0] if rows else 0)
                if plan.method in DARE_METHODS:     # the engine's blocks seed the masks
                    _dare_tensor(plan, name, e.dtype, shape, whole_limit, block_elements, check_inputs, write)
                    return
                if plan.method in BREADCRUMBS_METHODS:
                    _breadcrumbs_tensor(plan, name, e.dtype, shape, whole_limit, block_elements, check_inputs, write)
                    return
                blocks = row_blocks(shape, block_elements)
                if plan.method == "ties":
                    if row_blocks(shape, whole_limit) is None and 4 * len(plan.models) * numel(shape) > HOLD_BYTES:
                        _ties_whole_in_pieces(plan, name, e.dtype, shape, block_elements,
                                              lambda: check_inputs(name, None), write)
                        return
                    if row_blocks(shape, whole_limit) is None:        # merged whole by the engine: exact trim
                        merged, finite = _ties_whole(plan, name, e.dtype, lambda: check_inputs(name, None))
                        if not finite:
                            check_inputs(name, None)
                        writer.write(name, _from_float32(merged, out).reshape(shape))
                        return
                    thresholds = _streamed_thresholds(plan, name, e.dtype, shape, blocks)
                for rows in blocks or [None]:
                    block_shape = shape if rows is None else (rows[1] - rows[0], *shape[1:])
                    compute = plan.compute[name]
                    if plan.method == "ties":
                        base, deltas = _block_deltas(plan, name, e.dtype, rows, range(len(plan.models)))
                        merged, finite = consensus_mix(base, deltas, _weights(plan), bool(plan.params["normalize"]),
                                                       plan.lam, trims=thresholds, chunk=TIES_CHUNK)
                        base = deltas = None
                    else:
                        weights, divisor = plan.coefficients[compute]
                        base, models = plan.base.raw(name, rows), [m.raw(name, rows) for m in plan.models]
                        if compute == "F32":
                            merged, finite = task_arithmetic_block(base, e.dtype, models, weights, plan.lam, divisor)
                        else:
                            merged, finite = reduced_task_arithmetic_block(base, e.dtype, models, compute, weights,
                                                                           plan.lam, divisor)
                        base = models = None
                    if not finite:
                        check_inputs(name, rows)
                    writer.write(name, _from_float32(merged, out).reshape(block_shape), rows[0] if rows else 0)

            stages = {}
            if plan.random_seed is not None:       # mergekit's masks: its one stream
                t0 = time.perf_counter()
                floats = [n for n in plan.names if plan.base.entries[n][1].dtype in FLOAT_NAMES]
                plan.mask_stream = NumpyMergekitStream(plan.random_seed, mergekit_draw_order(
                    floats, lambda n: numel(shapes[n]), len(plan.models), lambda n, i: plan.densities[i] < 1))
                stages["mergekit mask stream"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            order = sorted(plan.names, key=lambda n: numel(shapes[n]), reverse=True)
            try:
                run_pool(order, work, threads, lambda name, _: None, "merge", progress)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            stages["merge"] = time.perf_counter() - t0
            finish_folder(tmp, recipe, plan.method, plan.params, plan.model_params, True, plan.out_dtype_name)
    finally:
        plan.close()
    merged = sum(1 for n in plan.names if plan.base.entries[n][1].dtype in FLOAT_NAMES)
    return MergeSummary(method=plan.method, compat=recipe.compat, tensors=len(plan.names), merged=merged,
                        copied=len(plan.names) - merged, parameters=parameter_count(list(shapes.values())),
                        seconds=time.perf_counter() - started, out_dir=Path(out_dir).expanduser().resolve(),
                        bytes_written=writer.total_bytes, shards=len(writer.filenames), stages=stages,
                        notes=plan.notes, engine="numpy")


def merge_recipe(recipe, out_dir: str | Path, *, compat: str | None = None, device: str | None = None,
                 before_engine=None, **options) -> MergeSummary:
    """A recipe (path, mapping or ``Recipe``) merged by this lane when it takes it, else by the torch engine
    (``streaming.merge``; ``before_engine()`` runs first, e.g. the CLI's torch thread settings).
    ``options``: ``force``, ``threads``, ``progress``, ``shard_size``, ``random_seed`` (DARE / DELLA draw
    mergekit's own masks for ``mergekit-yaml --random-seed``: here for DARE, else the torch engine)."""
    from mergelab.engine.recipe import Recipe, check_random_seed, load_recipe
    from mergelab.methods import get_method
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, compat=compat)
    elif compat is not None and compat != recipe.compat:
        recipe.compat = compat
    random_seed = options.get("random_seed")
    if random_seed is not None:
        check_random_seed(recipe, random_seed)
    options = {k: v for k, v in options.items() if k != "random_seed"}
    plan = plan_lane(recipe, device)
    if random_seed is not None and get_method(recipe.method).mergekit_draws is not None and plan is not None:
        # mergekit's masks: here for DARE where numpy's Mersenne Twister gives torch.bernoulli's (checked once)
        if plan.method in DARE_METHODS and bernoulli_replay_trusted():
            plan.random_seed = random_seed
        else:
            plan.close()
            plan = None
    if plan is not None:
        return run_lane(plan, out_dir, **options)
    if before_engine is not None:
        before_engine()
    from mergelab.engine.streaming import merge
    return merge(recipe, out_dir, device=device, random_seed=random_seed, **options)
