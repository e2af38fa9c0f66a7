"""Orchestration of a merge: validate, plan, stream tensor by tensor, write atomically.

Peak memory is bounded by the tensors in flight (``threads`` x the inputs of one tensor), never by
model size. TIES with the paper's whole-model trim first finds each task's exact global threshold with
one counting pass inside a sampled bracket (``kernels.BandSelect``; two exact histogram passes,
``kernels.RadixSelect``, where the sample misses), then merges in a second pass.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from mergelab import kernels as K
from mergelab.errors import MergelabError
from mergelab.io import (DTYPE_NAMES, Checkpoint, ShardedWriter, atomic_output_dir, open_checkpoint, parse_dtype,
                         parse_size)
from mergelab.methods import Method, TensorJob, get_method, resolve_params
from mergelab.methods.lines import LinesConfig, layer_scales, multitask_alpha, resolve_lines
from mergelab.engine.output_folder import MergeSummary, finish_folder, parameter_count
from mergelab.engine.pool import (BLOCK_ELEMENTS, CUDA_BLOCK_ELEMENTS, Progress, default_threads as _default_threads,
                                  numel as _numel, row_blocks, run_pool as _run_pool)
from mergelab.engine.recipe import Recipe, check_random_seed, load_recipe
from mergelab.io.lora import open_model   # PEFT LoRA adapter folders read as base + B @ A
from mergelab.io.vocab import align_checkpoints, plan_vocabulary

def _mergeable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def check_structure(reference: Checkpoint, others: Sequence[Checkpoint], ref_label: str,
                    labels: Sequence[str], limit: int = 3) -> list[str]:
    """Same tensor names, shapes and dtypes everywhere; else one error listing the first mismatches.

    Integer/bool tensors of the reference may be missing from the others: they are never merged."""
    names = reference.keys()
    problems: list[str] = []
    ref_set = set(names)
    for ckpt, label in zip(others, labels):
        keys = set(ckpt.keys())
        for name in names:
            if name not in keys:
                if not _mergeable(reference.dtype(name)):
                    continue    # integer buffers (position ids) that save_pretrained drops: copied from the base
                problems.append(f"{label}: tensor {name!r} missing")
            elif ckpt.shape(name) != reference.shape(name):
                problems.append(f"{label}: tensor {name!r} has shape {list(ckpt.shape(name))}, "
                                f"{ref_label} has {list(reference.shape(name))}")
            elif ckpt.dtype(name) != reference.dtype(name):
                problems.append(f"{label}: tensor {name!r} is {str(ckpt.dtype(name)).replace('torch.', '')}, "
                                f"{ref_label} has {str(reference.dtype(name)).replace('torch.', '')}")
            if len(problems) >= limit:
                break
        for name in sorted(keys - ref_set)[:limit]:
            problems.append(f"{label}: tensor {name!r} not in {ref_label}")
        if len(problems) >= limit:
            break
    if problems:
        more = "" if len(problems) < limit else " ..."
        raise MergelabError("inputs do not match: " + "; ".join(problems[:limit]) + more)
    return names


class _Inputs:
    """Reads one tensor (or block of rows) of every input as float32 on the compute device."""

    def __init__(self, base: Checkpoint | None, models: Sequence[Checkpoint], labels: Sequence[str],
                 base_label: str, device: torch.device, compute_dtype: torch.dtype | None,
                 round_dtype: torch.dtype | None = None):
        self.base, self.models, self.labels, self.base_label = base, list(models), list(labels), base_label
        self.device, self.compute_dtype, self.round_dtype = device, compute_dtype, round_dtype

    def _load(self, ckpt: Checkpoint, name: str, label: str, rows: tuple[int, int] | None,
              check: bool) -> torch.Tensor:
        """A tensor owned by the merge (never a view of a caller's state dict), so kernels may work in place."""
        src = ckpt.get(name, rows)
        t = src.to(self.device, non_blocking=True)
        if self.round_dtype is not None:
            t = t.to(self.round_dtype)
        if self.compute_dtype is not None:
            t = t.to(self.compute_dtype)
        if t.data_ptr() == src.data_ptr() and not ckpt.fresh_tensors:
            t = t.clone()
        if check and t.numel():
            low, high = torch.aminmax(t)       # NaN propagates; 7x cheaper than isfinite().all()
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                raise MergelabError(f"{label}: tensor {name!r} contains NaN or Inf")
        return t

    def read(self, name: str, rows: tuple[int, int] | None = None,
             check: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Inputs of one tensor; ``check=False`` skips the NaN/Inf check (pre-passes: the merge checks)."""
        return self.base_tensor(name, rows, check), [self._load(m, name, lbl, rows, check)
                                                     for m, lbl in zip(self.models, self.labels)]

    def base_tensor(self, name: str, rows: tuple[int, int] | None = None, check: bool = True) -> torch.Tensor | None:
        """The base's tensor (or block), None without a base."""
        return self._load(self.base, name, self.base_label, rows, check) if self.base is not None else None

    def task_vectors(self, name: str, rows: tuple[int, int] | None, base: torch.Tensor,
                     check: bool = True) -> torch.Tensor:
        """``[T, *shape]`` task vectors ``model_i - base``, each model read and subtracted in turn (one
        model's input alive at a time, not all of them next to the stacked result)."""
        out = torch.empty((len(self.models), *base.shape), dtype=base.dtype, device=base.device)
        for i, (m, lbl) in enumerate(zip(self.models, self.labels)):
            torch.sub(self._load(m, name, lbl, rows, check), base, out=out[i])
        return out

    def check(self, name: str, rows: tuple[int, int] | None) -> None:
        """The NaN/Inf check of every input of one tensor (or block): raises, naming the first bad one."""
        self.read(name, rows, check=True)

    def deltas(self, name: str, rows: tuple[int, int] | None, which: Sequence[int],
               weights: Sequence[float] | None) -> dict[int, torch.Tensor]:
        """(Weighted) task vectors of the models in ``which``, for selection passes."""
        base, models = self.read(name, rows, check=False)
        out = {}
        for i in which:
            delta = torch.sub(models[i], base)
            out[i] = delta.mul_(weights[i]) if weights is not None and weights[i] != 1.0 else delta
        return out


def _largest_first(names: Iterable[str], ckpt: Checkpoint) -> list[str]:
    return sorted(names, key=lambda n: _numel(ckpt.shape(n)), reverse=True)


# A one-pass selection keeps the values inside its sampled bracket: at most this many per model
# (16 MB in float32), so that memory does not grow with the model.
BAND_CAP = 1 << 22
MAX_SAMPLE = 1 << 22
TENSOR_SAMPLE = 1 << 16
SLACK = 4.0

Deltas = dict[int, torch.Tensor]          # model index -> its task vector (a tensor or block of rows)
PassRunner = Callable[[Callable[[Deltas], None], str], None]   # calls back with every block, once


def _streaming_select(ranks: Mapping[object, tuple[int, int]], n: int, sample: dict[int, "np.ndarray"] | None,
                      run_pass: PassRunner) -> dict[object, float]:
    """Exact k-th smallest magnitudes over a stream of task-vector blocks, in bounded memory.

    ``ranks`` maps a key to (model index, k) over ``n`` values per model. With a ``sample``, each
    value is bracketed and one pass counts what lies below the bracket and keeps what lies inside
    (``BandSelect``); two histogram passes (``RadixSelect``) find those the sample missed, or all of
    them without a sample. ``run_pass(consume, label)`` must call ``consume`` with every block once
    (possibly from several threads).
    """
    lock = threading.Lock()
    found: dict[object, float | None] = {key: None for key in ranks}
    if sample is not None:
        bands = {key: K.BandSelect(k, *K.sample_bracket(sample[i], k, n, SLACK), max_kept=BAND_CAP)
                 for key, (i, k) in ranks.items()}

        def count(deltas: Deltas) -> None:
            mags = {i: d.abs_() for i, d in deltas.items()}
            parts = {key: band.part(mags[ranks[key][0]]) for key, band in bands.items()}
            with lock:
                for key, part in parts.items():
                    bands[key].add(part=part)
        run_pass(count, "trim threshold")
        found = {key: band.finish() for key, band in bands.items()}
    missed = {key: K.RadixSelect(ranks[key][1]) for key, value in found.items() if value is None}
    for kind in ("high", "low") if missed else ():
        def histogram(deltas: Deltas) -> None:
            hists = {key: getattr(sel, f"{kind}_histogram")(deltas[ranks[key][0]]) for key, sel in missed.items()}
            with lock:
                for key, h in hists.items():
                    getattr(missed[key], f"add_{kind}")(histogram=h)
        run_pass(histogram, f"trim pass {1 if kind == 'high' else 2}/2")
        if kind == "high":
            for sel in missed.values():
                sel.finish_high()
    found.update({key: sel.finish_low() for key, sel in missed.items()})
    return found


def _global_thresholds(densities: list[float], inputs: _Inputs, names: list[str], weights: list[float],
                       threads: int, progress: Progress | None) -> list[float | None]:
    """Exact whole-model TIES thresholds per model: the paper's top-k over the flattened task vector.

    A sample of rows from every tensor brackets each threshold and one pass over the model finds it
    (``_streaming_select``); a model too large for a bracket of ``BAND_CAP`` values goes straight to
    the two histogram passes.
    """
    total = sum(_numel(inputs.base.shape(n)) for n in names)
    ranks = {i: (i, K.keep_count(total, d)) for i, d in enumerate(densities) if 0 < d < 1 and total > 0}
    if not ranks:
        return [None] * len(densities)
    which = sorted(ranks)
    # a sample of s values brackets about 2 * SLACK / sqrt(s) of the values: aim at half the cap
    size = max(1 << 16, int((4 * SLACK * total / BAND_CAP) ** 2) + 1)
    sample = _sample_magnitudes(inputs, names, which, weights, size, total) if size <= MAX_SAMPLE else None

    def run_pass(consume: Callable[[Deltas], None], label: str) -> None:
        def work(name: str) -> None:
            for rows in row_blocks(inputs.base.shape(name)) or [None]:
                consume(inputs.deltas(name, rows, which, weights))
        _run_pool(names, work, threads, lambda name, _: None, label, progress)
    found = _streaming_select(ranks, total, sample, run_pass)
    return [found.get(i) for i in range(len(densities))]


def _block_selections(ranks: list[list[int | None]], inputs: _Inputs, name: str, blocks: list[tuple[int, int]],
                      weights: Sequence[float] | None) -> list[list[float | None]]:
    """Values of the requested magnitude ranks of each model's delta over a whole tensor merged in
    blocks, exactly, without holding more than a block (``_streaming_select`` over its blocks)."""
    keyed = {(i, j): (i, r) for i, rs in enumerate(ranks) for j, r in enumerate(rs) if r is not None}
    if not keyed:
        return [[None] * len(rs) for rs in ranks]
    which = sorted({i for i, _ in keyed.values()})
    n = _numel(inputs.base.shape(name))
    sample = _sample_magnitudes(inputs, [name], which, weights, TENSOR_SAMPLE, n)

    def run_pass(consume: Callable[[Deltas], None], label: str) -> None:
        for rows in blocks:
            consume(inputs.deltas(name, rows, which, weights))
    found = _streaming_select(keyed, n, sample, run_pass)
    return [[found.get((i, j)) for j in range(len(rs))] for i, rs in enumerate(ranks)]


def _sample_magnitudes(inputs: _Inputs, names: list[str], which: Sequence[int], weights: Sequence[float] | None,
                       size: int, total: int) -> dict[int, "np.ndarray"]:
    """Sorted magnitudes of about ``size`` task-vector entries, drawn from every tensor in proportion
    to its size (whole rows of large tensors, random entries of small ones), per model."""
    import zlib

    import numpy as np
    parts: dict[int, list] = {i: [] for i in which}
    for name in names:
        shape = inputs.base.shape(name)
        numel = _numel(shape)
        want = size * numel / total
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        count = int(want) + int(rng.random() < want - int(want))      # unbiased rounding
        if count == 0:
            continue
        per_row = _numel(shape[1:]) if len(shape) >= 2 else numel
        if len(shape) < 2 or numel <= (1 << 16) or count * 4 >= numel:
            deltas = inputs.deltas(name, None, which, weights)
            picks = torch.from_numpy(rng.integers(0, numel, count))
            for i in which:
                parts[i].append(deltas[i].reshape(-1)[picks.to(deltas[i].device)].abs().cpu().numpy())
            continue
        rows = np.sort(rng.choice(shape[0], min(shape[0], -(-count // per_row)), replace=False))
        for row in rows:
            deltas = inputs.deltas(name, (int(row), int(row) + 1), which, weights)
            for i in which:
                parts[i].append(deltas[i].abs_().reshape(-1).cpu().numpy())
    return {i: np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.float32) for i, p in parts.items()}


Selections = list[list[float | None]]       # per model, the values of the requested magnitude ranks
SelectionCounts = list[list[tuple[int, int] | None]]     # per value: (magnitudes below it, at most it)


def _selections_of(ranks: list[list[int | None]], deltas: Mapping[int, torch.Tensor] | torch.Tensor,
                   weights: Sequence[float] | None) -> tuple[Selections, SelectionCounts]:
    """Exact values of the requested magnitude ranks of whole-tensor deltas (``deltas[i]``: model i), and
    per value how many magnitudes are below it and at most it (``TensorJob.selection_counts``)."""
    values, counts = [], []
    for i, rs in enumerate(ranks):
        if all(r is None for r in rs):
            values.append([None] * len(rs))
            counts.append([None] * len(rs))
            continue
        delta = deltas[i]
        w = 1.0 if weights is None else weights[i]
        found = [None if r is None else K.kth_smallest_magnitude_counted(delta, r, w) for r in rs]
        values.append([None if f is None else f[0] for f in found])
        counts.append([None if f is None else f[1:] for f in found])
    return values, counts


def _fused_combination(method: Method, params: dict, model_params: list[dict], compat: str, device: torch.device,
                       compute_dtype: torch.dtype) -> tuple[float | None, list[float]] | None:
    """The method's fixed coefficients where the fused pass applies (CPU, float32 arithmetic, no zero
    coefficient: every input then reaches the output, so a NaN/Inf in any of them shows in it). Paper
    semantics only: under mergekit's, results must be bit-identical to mergekit's own order of operations,
    which the fused sum does not keep (it differs by an ulp)."""
    if (method.linear_combination is None or device.type != "cpu" or compute_dtype != torch.float32
            or compat == "mergekit"):
        return None
    found = method.linear_combination(params, model_params, compat)
    if found is None or any(c == 0 for c in [*found[1], *([] if found[0] is None else [found[0]])]):
        return None
    return found


def _linear_combination(inputs: _Inputs, name: str, rows: tuple[int, int] | None, c_base: float | None,
                        coefficients: Sequence[float]) -> torch.Tensor:
    """``c_base * base + sum_i c_i * model_i`` in float32, in one chunked pass over the inputs as read (views
    of the mapped files: no copy, no task vectors); the NaN/Inf check runs on the result, and only when it
    fails are the inputs checked one by one to name the culprit."""
    sources = ([(inputs.base, inputs.base_label, c_base)] if c_base is not None else []) + \
        list(zip(inputs.models, inputs.labels, coefficients))
    out, finite = K.fused_linear_combination([ckpt.get(name, rows) for ckpt, _, _ in sources],
                                             [c for _, _, c in sources])
    if not finite:
        for ckpt, label, _ in sources:
            inputs._load(ckpt, name, label, rows, check=True)     # raises, naming the input
    return out


Sink = Callable[[str, torch.Tensor, int], None]   # (name, tensor or block of rows, first row)


def run_merge(method: Method, base: Checkpoint | None, models: Sequence[Checkpoint], params: dict,
              model_params: list[dict], compat: str, sink: Sink,
              out_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              compute_dtype: torch.dtype | None = torch.float32, threads: int | None = None,
              progress: Progress | None = None, labels: Sequence[str] | None = None,
              base_label: str = "base", block_elements: int = BLOCK_ELEMENTS,
              resolve: Callable[[str], tuple[dict, list[dict]]] | None = None,
              round_dtype: torch.dtype | None = None, round_results: bool = True,
              lines: LinesConfig | None = None, random_seed: int | None = None) -> dict[str, float]:
    """Merge every tensor and hand each result (whole, or block by block) to ``sink``.

    ``resolve(name)`` gives a tensor's own (shared, per-model) parameters where they vary over layers or
    tensors (gradients, filters); without it every tensor gets ``params``/``model_params``.
    ``round_dtype``: inputs are first cast to it and results rounded to it (mergekit's ``dtype``);
    ``compute_dtype`` None: the kernels compute in each tensor's (rounded) input dtype.
    ``lines``: LiNeS post-processing (``methods.lines``): each merged task vector scaled by its block's
    depth; with ``alpha: auto`` a first pass runs the merge once only to sum the L1 norms it needs.
    ``random_seed``: the masks of random-drop methods (DARE, DELLA) are the ones ``mergekit-yaml --random-seed``
    draws on CPU (``kernels.mergekit_stream``), not mergelab's seeded per-tensor ones.
    Returns the seconds spent per stage. ``sink`` is called from worker threads.
    """
    labels = list(labels or [f"model {i}" for i in range(len(models))])
    if method.needs_base and base is None:
        raise MergelabError(f"method {method.name!r} needs a base model")
    reference, ref_label = (base, base_label) if base is not None else (models[0], labels[0])
    others = [m for m in models if m is not reference]
    other_labels = [l for m, l in zip(models, labels) if m is not reference]
    names = check_structure(reference, others, ref_label, other_labels)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergelabError("device cuda requested but no CUDA GPU is available")
    if device.type == "cuda" and block_elements == BLOCK_ELEMENTS:
        block_elements = CUDA_BLOCK_ELEMENTS
    threads = threads or _default_threads()
    inputs = _Inputs(base if method.needs_base or method.optional_base else None, models, labels, base_label, device,
                     compute_dtype, round_dtype)
    mergeable = [n for n in names if _mergeable(reference.dtype(n))]
    weights = [p.get("weight", 1.0) for p in model_params]
    stages: dict[str, float] = {}

    thresholds = None
    densities = method.global_trim(params, model_params, compat) if method.global_trim else None
    if densities is not None and resolve is not None:
        raise MergelabError(f"{method.name}: a whole-model trim needs one density per model, not values per "
                            "layer or tensor")
    if densities is not None:
        t0 = time.perf_counter()
        thresholds = _global_thresholds(densities, inputs, _largest_first(mergeable, reference),
                                        weights if method.select_weighted(compat) else [1.0] * len(weights),
                                        threads, progress)
        stages["global trim thresholds"] = time.perf_counter() - t0
    if lines is not None and (not method.needs_base or base is None):
        raise MergelabError(f"LiNeS scales task vectors: method {method.name!r} does not merge them against a base")
    scales: dict[str, float] | None = None
    norms: list[float] | None = None     # set during the "auto" alpha pass: [||sum tau||_1, ||tau_merged||_1]
    norms_lock = threading.Lock()
    defaults = (params, model_params)
    # one fused pass for fixed linear combinations (average, task arithmetic) with one set of parameters
    # (LiNeS scales each tensor's merged task vector: the general path)
    combination = (_fused_combination(method, params, model_params, compat, device, compute_dtype)
                   if resolve is None and lines is None else None)
    job_kwargs: dict = {}
    if random_seed is not None and compat != "mergekit":
        raise MergelabError("random seed: it reproduces mergekit's masks, so it needs mergekit semantics")
    if random_seed is not None and method.mergekit_draws is not None:
        from mergelab.kernels.mergekit_stream import MergekitMaskStream
        from mergelab.kernels.numpy_mergekit_stream import mergekit_draw_order
        t0 = time.perf_counter()
        draws = mergekit_draw_order(
            mergeable, lambda name: _numel(reference.shape(name)), len(models),
            lambda name, i: method.mergekit_draws((resolve(name) if resolve is not None else defaults)[1][i]))
        job_kwargs["mask_stream"] = MergekitMaskStream(random_seed, draws, progress)
        stages["mergekit mask stream"] = time.perf_counter() - t0

    def job_of(*args, **kwargs) -> TensorJob:
        """A job of this merge (with mergekit's mask stream, when it has one)."""
        return TensorJob(*args, **kwargs, **job_kwargs)

    def work(name: str) -> None:
        if not _mergeable(reference.dtype(name)):
            sink(name, reference.get(name).clone(), 0)
            return
        params, model_params = resolve(name) if resolve is not None else defaults
        chunkable = method.chunkable(params, compat)
        weights = [p.get("weight", 1.0) for p in model_params]
        select_weights = weights if method.select_weighted(compat) else None
        shape = reference.shape(name)
        blocks = row_blocks(shape, block_elements) if chunkable else None
        if combination is not None:
            for rows in blocks or [None]:
                merged = _linear_combination(inputs, name, rows, *combination)
                sink(name, merged.to(out_dtype or reference.dtype(name)), rows[0] if rows else 0)
            return
        # a kernel whose own sums see every input checks them itself (and calls ``check_inputs`` when one
        # is not finite); a kernel of task vectors only gets them built one model at a time
        own_check = method.checks_inputs is not None and method.checks_inputs(params, compat)
        ranks = method.select(params, model_params, compat, _numel(shape)) if method.select else None
        selections = None
        if ranks and blocks:
            selections = _block_selections(ranks, inputs, name, blocks, select_weights)
        elif ranks and inputs.base is not None and any(r is not None for rs in ranks for r in rs):
            # a whole tensor: read once, select from its task vectors, and merge from the same ones
            if method.task_vectors_only and norms is None:     # one model's input at a time
                b, ms = inputs.base_tensor(name, None, not own_check), []
                deltas = inputs.task_vectors(name, None, b, not own_check)
            else:
                b, ms = inputs.read(name, check=not own_check)
                deltas = K.task_vectors(b, ms)
            selections, counts = _selections_of(ranks, deltas, select_weights)
            recheck = functools.partial(inputs.check, name, None) if own_check else None
            _merge_and_sink(name, job_of(name, b, ms, params, model_params, compat, thresholds, selections,
                                            None, _numel(shape), None, deltas, recheck, counts), None)
            return
        elif ranks:
            selections = [[None] * len(rs) for rs in ranks]
        stats = None
        if method.stats is not None and blocks is not None:    # a whole tensor's kernel sums for itself
            for rows in blocks:
                b, ms = inputs.read(name, rows, check=False)
                part = method.stats(job_of(name, b, ms, params, model_params, compat, thresholds,
                                              selections, rows, _numel(shape)))
                if part is None:
                    break
                stats = part if stats is None else stats + part
                b = ms = None
        streamed = (method.task_vectors_only and norms is None and inputs.base is not None
                    and not method.reads_inputs(params, model_params, compat))
        for rows in blocks or [None]:
            recheck = functools.partial(inputs.check, name, rows) if own_check else None
            if streamed:
                b = inputs.base_tensor(name, rows, not own_check)
                job = job_of(name, b, [], params, model_params, compat, thresholds, selections, rows,
                                _numel(shape), stats, inputs.task_vectors(name, rows, b, not own_check), recheck)
            else:
                b, ms = inputs.read(name, rows, check=not own_check)
                job = job_of(name, b, ms, params, model_params, compat, thresholds, selections, rows,
                                _numel(shape), stats, check_inputs=recheck)
            _merge_and_sink(name, job, rows)
            job = b = ms = None      # before the next block is read (not two blocks alive at once)

    def _merge_and_sink(name: str, job: TensorJob, rows: tuple[int, int] | None) -> None:
        summed = None
        if norms is not None:
            summed = float(torch.stack(job.models).sum(dim=0).sub_(job.base, alpha=len(job.models)).abs().sum())
        try:
            merged = method.merge_tensor(job)
        except MergelabError:
            raise
        except (RuntimeError, ValueError) as e:
            raise MergelabError(f"{name}: {method.name} failed: {str(e).splitlines()[0]}") from e
        if norms is not None:
            with norms_lock:
                norms[0] += summed
                norms[1] += float((merged - job.base).abs().sum())
            return
        if scales is not None and scales[name] != 1.0:
            merged = job.base + scales[name] * (merged - job.base)
        if round_dtype is not None and round_results:
            merged = merged.to(round_dtype)
        sink(name, merged.to(out_dtype or reference.dtype(name)), rows[0] if rows else 0)

    order = _largest_first(names, reference)
    if lines is not None:
        alpha = lines.alpha
        if alpha is None:
            t0 = time.perf_counter()
            norms = [0.0, 0.0]
            _run_pool([n for n in order if _mergeable(reference.dtype(n))], work, threads, lambda name, _: None,
                      "LiNeS norms", progress)
            alpha = multitask_alpha(norms[0], norms[1], len(models))
            norms = None
            stages["lines norms"] = time.perf_counter() - t0
        scales = layer_scales(lines, mergeable, alpha)
    t0 = time.perf_counter()
    _run_pool(order, work, threads, lambda name, _: None, "merge", progress)
    stages["merge"] = time.perf_counter() - t0
    return stages


def merge_state_dicts(base: Mapping[str, torch.Tensor] | None, models: Sequence[Mapping[str, torch.Tensor]],
                      method: str, params: dict | None = None, model_params: Sequence[dict | None] | None = None,
                      compat: str = "paper", device: str = "cpu", threads: int | None = 1,
                      out_dtype: torch.dtype | None = None,
                      block_elements: int = BLOCK_ELEMENTS,
                      lines: Mapping | None = None, random_seed: int | None = None) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts; the result keeps the base's tensor order and dtypes.

    ``random_seed``: DARE / DELLA masks as ``mergekit-yaml --random-seed`` draws them (``compat="mergekit"``).

    ``lines``: LiNeS post-processing, e.g. ``{"beta": 0.5}`` (``alpha`` "auto" or a number; see
    ``methods.lines``)."""
    m = get_method(method)
    lines_cfg = resolve_lines(lines, "lines")
    model_params = list(model_params or [{} for _ in models])
    if len(model_params) != len(models):
        raise MergelabError(f"model_params has {len(model_params)} entries for {len(models)} models")
    g, per = resolve_params(m, params, model_params, compat, where=f"{method}")
    base_ckpt = open_checkpoint(base) if base is not None else None
    ckpts = [open_checkpoint(sd) for sd in models]
    result: dict[str, torch.Tensor] = {}
    lock = threading.Lock()
    reference = base_ckpt or ckpts[0]

    def sink(name: str, tensor: torch.Tensor, row: int) -> None:
        shape = reference.shape(name)
        if row == 0 and tuple(tensor.shape) == tuple(shape):
            result[name] = tensor.cpu()
            return
        with lock:
            if name not in result:
                result[name] = torch.empty(shape, dtype=tensor.dtype)
        result[name][row:row + tensor.shape[0]] = tensor.cpu()
    run_merge(m, base_ckpt, ckpts, g, per, compat, sink, out_dtype=out_dtype, device=device, threads=threads,
              labels=[f"models[{i}]" for i in range(len(models))], block_elements=block_elements,
              lines=lines_cfg, random_seed=random_seed)
    order = reference.keys()
    return {k: result[k] for k in order}


def merge(recipe: str | Path | Mapping | Recipe, out_dir: str | Path, *, force: bool = False,
          compat: str | None = None, device: str | None = None, threads: int | None = None,
          progress: Progress | None = None, shard_size: str | int | None = None,
          block_elements: int = BLOCK_ELEMENTS, random_seed: int | None = None) -> MergeSummary:
    """Merge the checkpoints a recipe names into ``out_dir`` (a Hugging Face folder), streaming.

    ``random_seed``: DARE and DELLA draw the masks ``mergekit-yaml --random-seed N`` draws on CPU."""
    started = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, compat=compat)
    elif compat is not None and compat != recipe.compat:
        recipe.compat = compat
    method = get_method(recipe.method)
    if random_seed is not None:
        check_random_seed(recipe, random_seed)       # before any tensor is read
    if recipe.slices is not None:
        from mergelab.engine.slices import merge_slices
        return merge_slices(recipe, out_dir, force=force, device=device, threads=threads, progress=progress,
                            shard_size=shard_size, block_elements=block_elements)
    resolver = recipe.resolver()
    g, per = resolver.resolve("", 0.0)
    out_dtype = parse_dtype(recipe.out_dtype or recipe.dtype)
    round_dtype, compute_dtype = merge_dtypes(recipe, method)
    round_results = True
    if recipe.compat == "mergekit" and method.float32_result and recipe.out_dtype is None:
        out_dtype, round_results = torch.float32, False     # mergekit writes this method's float32 results
    max_shard = parse_size(shard_size if shard_size is not None else recipe.shard_size)

    base = open_checkpoint(recipe.base_model) if recipe.base_model else None
    models = [open_model(m.path, base, m.lora) for m in recipe.models]
    labels = [m.label for m in recipe.models]
    paths = [m.path for m in recipe.models]
    vocab = None
    if recipe.tokenizer is not None:   # the output tokenizer first; embeddings re-indexed to it
        vocab = plan_vocabulary(recipe.tokenizer, recipe.base_model, paths)
        if not vocab.identity:
            keys = ([recipe.base_model] if base is not None else []) + paths
            aligned = align_checkpoints(vocab, dict(zip(keys, ([base] if base is not None else []) + models)))
            base = aligned[recipe.base_model] if base is not None else None
            models = [aligned[k] for k in paths]
    reference = base if base is not None else models[0]
    try:
        check_structure(reference, [m for m in models if m is not reference],
                        recipe.base_model or labels[0], [l for m, l in zip(models, labels) if m is not reference])
        names = reference.keys()
        resolve = None if resolver.static else depth_resolver(resolver, names)

        def dtype_of(name: str) -> torch.dtype:
            d = reference.dtype(name)
            return out_dtype if out_dtype is not None and _mergeable(d) else d
        layout = [(n, dtype_of(n), reference.shape(n)) for n in names]
        with atomic_output_dir(out_dir, force=force, inputs=recipe.input_paths(), command="merge") as tmp:
            writer = ShardedWriter(tmp, layout, max_shard, metadata={"mergelab_method": method.name})
            try:
                stages = run_merge(method, base, models, g, per, recipe.compat, writer.write, out_dtype=out_dtype,
                                   device=device or "cpu", compute_dtype=compute_dtype, threads=threads,
                                   progress=progress, labels=labels, base_label=recipe.base_model or "base",
                                   block_elements=block_elements, resolve=resolve, round_dtype=round_dtype,
                                   round_results=round_results, lines=recipe.lines, random_seed=random_seed)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            finish_folder(tmp, recipe, method.name, g, per, resolver.static,
                          None if out_dtype is None else DTYPE_NAMES[out_dtype], vocab)
        parameters = parameter_count([shape for _, _, shape in layout])
        merged = sum(1 for n in names if _mergeable(reference.dtype(n)))
        return MergeSummary(method=method.name, compat=recipe.compat, tensors=len(names), merged=merged,
                            copied=len(names) - merged, parameters=parameters,
                            seconds=time.perf_counter() - started, out_dir=Path(out_dir).expanduser().resolve(),
                            bytes_written=writer.total_bytes, shards=len(writer.filenames), stages=stages,
                            notes=list(resolver.ignored))
    finally:
        for c in [base, *models]:
            if c is not None:
                c.close()


def merge_dtypes(recipe: Recipe, method: Method) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(round_dtype, compute_dtype) of a recipe.

    Paper semantics: every kernel computes in ``compute_dtype`` (float32 by default), results are cast to
    ``out_dtype``/``dtype``. mergekit semantics (0.1.5 ``GatherTensors(dtype=...)``): inputs are cast to
    the recipe's ``dtype`` first; the kernels compute in that dtype (or in the inputs' own dtype when it is
    unset) except mergekit's float32 kernels (slerp, linear), and results are rounded to it before
    ``out_dtype``. An explicit ``compute_dtype`` in the recipe wins."""
    from mergelab.methods.registry import float32_kernel
    explicit = parse_dtype(recipe.compute_dtype) if "compute_dtype" in recipe.raw else None
    if recipe.compat != "mergekit":
        return None, explicit or parse_dtype(recipe.compute_dtype) or torch.float32
    if explicit is not None:
        return parse_dtype(recipe.dtype), explicit
    return parse_dtype(recipe.dtype), torch.float32 if float32_kernel(method) else None


def depth_resolver(resolver, names: Sequence[str]) -> Callable[[str], tuple[dict, list[dict]]]:
    """Per-tensor parameters of a ``models:`` recipe: layer i of L at depth t = i / (L-1), others at t = 0;
    every value is resolved (and checked) here, before any tensor is read."""
    from mergelab.methods.settings import depth_t, layer_count, layer_index
    n_layers = layer_count(names)
    table = {}
    for name in names:
        i = layer_index(name)
        table[name] = resolver.resolve(name, 0.0 if i is None else depth_t(i, n_layers))
    return table.__getitem__
