"""Pure tensor kernels of the data-free merges.

Every function takes and returns plain tensors (float32 for the arithmetic) and has no side effects,
so each step of a method (trim, sign election, disjoint merge, ...) can be tested on its own and
composed differently by the paper and mergekit semantics. Stacked task vectors are ``[T, *shape]``.
"""

from __future__ import annotations

import torch

from mergelab.kernels.numpy_dare import DARE_BITS, L1_LANES
from mergelab.kernels.select import kth_smallest

__all__ = [
    "task_vectors",
    "keep_count",
    "ties_trim",
    "ties_trim_rows",
    "trim_by_threshold",
    "zero_below",
    "zero_above",
    "keep_band",
    "topk_exact",
    "stack_sum",
    "SEQUENTIAL_ROWS",
    "l1_norm",
    "ordered_sum_",
    "elect_sign",
    "disjoint_merge",
    "breadcrumbs_rows",
    "magnitude_band",
    "dare",
    "fused_task_arithmetic",
    "fused_consensus_mix",
    "fused_linear_combination",
    "one_where_nothing_kept_",
    "dare_mask_",
    "dare_keep_bits",
    "keep_with_probabilities_",
    "model_stock",
    "l1_rescale",
]


def task_vectors(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """``[T, *shape]`` stacked ``models[t] - base``, written straight into one buffer."""
    out = torch.empty((len(models), *base.shape), dtype=base.dtype, device=base.device)
    for i, m in enumerate(models):
        torch.sub(m, base, out=out[i])
    return out


def keep_count(n: int, density: float) -> int:
    """TIES-code index of the threshold: the (n - int(n*density))-th smallest magnitude (1-based)."""
    return n - int(n * density)


def trim_by_threshold(delta: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Keep entries with ``|delta| >= threshold`` (ties at the threshold are kept, as in the TIES code)."""
    if not isinstance(threshold, torch.Tensor) or threshold.numel() == 1:
        return zero_below(delta.clone(), float(threshold))
    return delta * (delta.abs() >= threshold)


# ``hardshrink`` is a vectorised select on CPU; ``masked_fill_``/``where`` with a boolean mask are
# 10-15x slower there. The fast paths below are exact: they only ever keep a value or write a zero.
_SHRINK_DTYPES = (torch.float32, torch.float64)


def _below(threshold: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below ``threshold``: ``|x| > below`` is ``|x| >= threshold``."""
    t = torch.tensor(threshold, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype)))


def zero_below(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place: zero the entries with ``|x| < threshold`` (entries at the threshold are kept)."""
    if not threshold > 0:          # |x| >= 0 everywhere (NaN thresholds keep everything, as the mask would)
        return x
    if x.dtype in _SHRINK_DTYPES and threshold != float("inf"):
        return torch.hardshrink(x, _below(threshold, x.dtype), out=x)
    return x.masked_fill_(x.abs() < threshold, 0.0)


def zero_above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place: zero the entries with ``|x| > threshold``."""
    if x.dtype in _SHRINK_DTYPES and 0 <= threshold < float("inf"):
        return x.sub_(torch.hardshrink(x, threshold))     # x - x where |x| > threshold, x - 0 elsewhere
    return x.masked_fill_(x.abs() > threshold, 0.0)


def keep_band(x: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    """In place: keep the entries with ``low <= |x| <= high`` (a missing limit is open)."""
    if low is not None:
        zero_below(x, low)
    if high is not None:
        zero_above(x, high)
    return x


def ties_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim of one tensor (or one flattened task vector): keep the top-``density`` magnitudes.

    TIES-code semantics: threshold = kthvalue(|x|, n - int(n*density)); keeps int(n*density)+1 entries
    plus ties. ``density <= 0`` keeps nothing, ``density >= 1`` keeps everything.
    """
    if density >= 1 or delta.numel() == 0:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    k = keep_count(delta.numel(), density)
    return trim_by_threshold(delta, kth_smallest(delta.abs(), k))


def ties_trim_rows(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim applied to each row along the last dimension (0-D tensors: whole tensor)."""
    if delta.dim() == 0:
        return ties_trim(delta, density)
    if density >= 1 or delta.numel() == 0:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    k = keep_count(delta.shape[-1], density)
    return trim_by_threshold(delta, kth_smallest(delta.abs(), k, dim=-1))


def topk_exact(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's ``magnitude`` sparsification: keep exactly max(1, int(n*density)) largest magnitudes.

    Selected with kthvalue instead of mergekit's full argsort; identical unless magnitudes tie at the
    threshold (then all tied entries are kept).
    """
    n = delta.numel()
    if density >= 1:
        return delta.clone()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    return trim_by_threshold(delta, kth_smallest(delta.abs(), n - k + 1))


def magnitude_band(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's ``magnitude_outliers`` (breadcrumbs over the whole tensor).

    Ranks magnitudes ascending, drops the ``n_bot`` smallest and keeps the next ``int(density*n)``;
    what lies above is the ``gamma`` outlier band. Uses an explicit end index, so ``n_top == 0`` does
    not zero the tensor (pitfall of the ``[n_bot:-n_top]`` slice).
    """
    n = delta.numel()
    if density >= 1:
        return delta.clone()
    target = int(density * n)
    if target <= 0:
        return torch.zeros_like(delta)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    mag = delta.abs().reshape(-1)
    low = float(torch.kthvalue(mag, n_bot + 1).values) if n_bot > 0 else None
    high = float(torch.kthvalue(mag, n_bot + target).values) if n_bot + target < n else None
    return keep_band(delta.clone(), low, high)


def breadcrumbs_rows(delta: torch.Tensor, keep: float, top_remove: float) -> torch.Tensor:
    """Model Breadcrumbs mask (authors' ``TaskVectorMiddleKeep``), per row along the last dimension.

    In each row of length n, drop the int(n*top_remove) largest magnitudes, then keep the int(n*keep)
    largest of what remains: the kept set is ranks (top_remove*n, top_remove*n + keep*n] of the original
    magnitudes. 0-D tensors are returned unchanged.
    """
    if delta.dim() == 0 or delta.numel() == 0:
        return delta.clone()
    n = delta.shape[-1]
    n_top = int(n * top_remove)
    n_keep = int(n * keep)
    if n_keep <= 0 or n_top >= n:
        return torch.zeros_like(delta)
    last = min(n, n_top + n_keep)
    idx = torch.topk(delta.abs(), last, dim=-1, sorted=True).indices[..., n_top:last]
    mask = torch.zeros_like(delta, dtype=torch.bool).scatter_(-1, idx, True)
    return delta * mask


# Up to this many rows, ``stack_sum`` adds them one by one: bit-identical to ``sum(dim=0)`` (torch reduces up
# to 4 outer rows in order; from 5 rows on it regroups them, tests check 1-8 rows) and cheaper on CPU.
SEQUENTIAL_ROWS = 4


def stack_sum(stacked: torch.Tensor) -> torch.Tensor:
    """``stacked.sum(dim=0)`` of ``[T, *shape]`` as a new tensor (rows added in order for small T)."""
    if stacked.shape[0] == 0 or stacked.shape[0] > SEQUENTIAL_ROWS or stacked.dtype not in _SHRINK_DTYPES:
        return stacked.sum(dim=0)
    if stacked.shape[0] == 1:
        return stacked[0].clone(memory_format=torch.contiguous_format)
    out = torch.add(stacked[0], stacked[1])
    for row in stacked[2:]:
        out.add_(row)
    return out


# Entries per step of the one-pass kernels: a chunk of each input, the scratch and the result's chunk stay in
# cache between the steps (on the 2-core benchmark machine 128 K entries took a 3-model task arithmetic of a
# 16 M-entry tensor from 238 ms in whole-tensor passes to 80 ms; 16 K entries pay the per-step overhead, 1 M
# spill out of L2). A multiple of every vector width, so that no chunk boundary changes an element's code path.
FUSED_CHUNK = 1 << 17


def one_where_nothing_kept_(kept_weights: torch.Tensor, low: float) -> torch.Tensor:
    """In place: mergekit's divisor of a consensus mix, the sum of the kept weights with 1 where nothing is
    kept. ``low`` is the smallest weight: when positive, every kept sum is >= it, so clamping to it changes
    only the zeros (where the mix is +-0, and +-0 / low == +-0 / 1) without a boolean mask."""
    if low > 0:
        return kept_weights.clamp_(min=low)
    kept_weights[kept_weights == 0] = 1
    return kept_weights


def _chunks(n: int, chunk: int, device: torch.device):
    """(start, stop) of each step of a one-pass kernel: chunks on CPU, one step elsewhere (no cache to stay in)."""
    step = chunk if device.type == "cpu" else max(n, 1)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _all_finite(extremes: list[torch.Tensor]) -> bool:
    """Whether the (min, max) pairs of every chunk are finite: the one-pass kernels' NaN/Inf check."""
    return not extremes or bool(torch.isfinite(torch.stack(extremes)).all())


def fused_task_arithmetic(base: torch.Tensor, models: list[torch.Tensor], weights: torch.Tensor | None,
                          lam: float, divisor: torch.Tensor | None = None,
                          chunk: int = FUSED_CHUNK) -> tuple[torch.Tensor, bool]:
    """``base + lam * (sum_i w_i (m_i - base)) [/ divisor]`` in one pass over the inputs, chunk by chunk,
    with mergekit's order of operations (each model's difference, times its weight, added in model order,
    divided, scaled, plus the base): every step is one IEEE operation per element, so the result is
    bit-identical to the whole-tensor passes, without T task vectors in memory. ``weights`` (one per model,
    in the inputs' dtype) None multiplies by nothing. Returns the result and whether it is all finite (the
    caller's NaN/Inf check, done on each chunk while it is in cache)."""
    if not models:
        raise ValueError("task arithmetic of no models")
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    n = base.numel()
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_models = [m.reshape(-1) for m in models]
    scratch = torch.empty(min(chunk, n) if base.device.type == "cpu" else n, dtype=base.dtype, device=base.device)
    extremes = []
    for start, stop in _chunks(n, chunk, base.device):
        acc, b, tmp = flat_out[start:stop], flat_base[start:stop], scratch[:stop - start]
        for i, m in enumerate(flat_models):
            step = acc if i == 0 else tmp
            torch.sub(m[start:stop], b, out=step)
            if weights is not None:
                step.mul_(weights[i])
            if i:
                acc.add_(tmp)
        if divisor is not None:
            acc.div_(divisor)
        if lam != 1:
            acc.mul_(lam)
        acc.add_(b)
        extremes.extend(torch.aminmax(acc))
    return out, _all_finite(extremes)


def fused_linear_combination(tensors: list[torch.Tensor], coefficients: list[float],
                             chunk: int = FUSED_CHUNK) -> tuple[torch.Tensor, bool]:
    """``sum_i c_i * t_i`` in float32, in one chunked pass over the inputs (any float dtype, read as they
    are): the first scaled, the others added with ``alpha`` in order, the same operations chunk by chunk
    as over the whole tensors. Returns the result and whether it is all finite."""
    if not tensors:
        raise ValueError("a linear combination of no tensors")
    first = tensors[0]
    out = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    n = first.numel()
    flat_out, flat = out.view(-1), [t.reshape(-1) for t in tensors]
    extremes = []
    for start, stop in _chunks(n, chunk, first.device):
        acc = flat_out[start:stop]
        for i, (t, c) in enumerate(zip(flat, coefficients)):
            piece = t[start:stop]
            if i == 0:
                torch.mul(piece.to(torch.float32), c, out=acc)
            else:
                acc.add_(piece, alpha=c)
        extremes.extend(torch.aminmax(acc))
    return out, _all_finite(extremes)


def _sum_rows_into(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``stack_sum(rows)`` (at most ``SEQUENTIAL_ROWS`` rows, added in order) written into ``out``."""
    if rows.shape[0] == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out.add_(row)
    return out


def fused_consensus_mix(base: torch.Tensor, deltas: torch.Tensor, weights: list[float], normalize: bool,
                        lam: float, chunk: int = FUSED_CHUNK) -> torch.Tensor:
    """mergekit's consensus mix (``generalized_task_arithmetic``, TIES sign) of ``[T, *shape]`` sparsified
    task vectors, column chunk by column chunk: times the weights, the sign of their sum (0 -> +1), the
    agreeing entries summed [and divided by the sum of their weights], times ``lam``, plus the base. Each
    step is elementwise or a sum over the (at most ``SEQUENTIAL_ROWS``) models in order, so the chunks give
    mergekit's bits, with the dozen steps in cache instead of a dozen passes over memory (a 1 GB TIES
    merge: 30 % less CPU in the mix; a plain sum's three passes gain nothing and stay whole). ``deltas`` is
    overwritten."""
    t = deltas.shape[0]
    if t == 0 or t > SEQUENTIAL_ROWS:
        raise ValueError(f"the fused mix takes 1 to {SEQUENTIAL_ROWS} task vectors, got {t}")
    rows = deltas.reshape(t, -1)
    n = rows.shape[1]
    out = torch.empty(base.shape, dtype=deltas.dtype, device=deltas.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    scale = w.reshape(-1, 1) if any(x != 1 for x in weights) else None
    low = float(w.min())                                    # as mergekit's weights: in the deltas' dtype
    for start, stop in _chunks(n, chunk, deltas.device):
        d, acc = rows[:, start:stop], flat_out[start:stop]
        if scale is not None:
            d.mul_(scale)
        sign = stack_sum(d).sign_().add_(0.5).sign_()          # +1 -> +1, -1 -> -1, 0 -> +1
        agreeing = d.mul_(sign).clamp_(min=0)                    # |w delta| where signs agree, else 0
        _sum_rows_into(agreeing, acc).mul_(sign)
        if normalize:
            kept = agreeing.sign_()                              # 1 where kept
            if scale is not None:
                kept.mul_(scale)                                 # times 1 changes no bit: skipped
            acc.div_(one_where_nothing_kept_(stack_sum(kept), low))    # kept weights added in model order
        if lam != 1:
            acc.mul_(lam)
        acc.add_(flat_base[start:stop])
    return out


def l1_norm(x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``sum |x|`` in float32 (a 0-dim tensor) in the fixed order of ``numpy_dare.ordered_l1``: entry i added
    to lane i mod 65536 in index order, the lanes folded in halves. The same bits from numpy, on every
    device and with any number of threads (torch's ``sum`` depends on both), as accurate as ``sum``.
    ``|x|`` is written into ``scratch`` (a tensor like ``x``) when given, and overwritten by the sum.
    Half-precision ``x`` is summed in float32 lanes too (as ``sum`` accumulates it in float32)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return ordered_sum_(torch.abs(x).to(torch.float32).reshape(-1))
    mag = torch.abs(x, out=scratch if scratch is not None else torch.empty_like(x)).reshape(-1)
    return ordered_sum_(mag)


def ordered_sum_(values: torch.Tensor) -> torch.Tensor:
    """The sum of a 1-D tensor of magnitudes (no -0) in ``l1_norm``'s order, computed in its own memory."""
    n = values.numel()
    if n == 0:
        return values.new_zeros(())
    width = min(n, L1_LANES)
    lanes = values[:width]                  # +0 plus the first row: the first row itself
    rows = n // L1_LANES
    for r in range(1, rows):
        lanes.add_(values[r * L1_LANES:(r + 1) * L1_LANES])
    tail = n - rows * L1_LANES
    if rows and tail:
        lanes[:tail].add_(values[rows * L1_LANES:])
    while width > 1:
        half = 1 << ((width - 1).bit_length() - 1)      # the largest power of two below width
        lanes[:width - half].add_(lanes[half:width])
        width = half
    return lanes[0].clone()


def elect_sign(stacked: torch.Tensor, zero: str = "majority") -> torch.Tensor:
    """TIES sign election by mass: sign of the summed (trimmed) task vectors.

    ``zero="majority"``: coordinates with zero sum take the sign of the sum of all elected signs (TIES
    code, here over the tensor given); ``zero="positive"``: they take +1 (mergekit).
    """
    sign = stack_sum(stacked).sign_()
    if zero == "positive":
        return sign.add_(0.5).sign_()                   # +1 -> +1, -1 -> -1, 0 -> +1 (no boolean mask)
    majority = float(torch.sign(sign.sum()))
    if majority == 0:
        return sign
    return sign.add_(1 - sign.abs(), alpha=majority)    # only the zeros change, to the majority sign


def disjoint_merge(stacked: torch.Tensor, sign: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """TIES disjoint merge: combine only the entries whose sign agrees with the elected sign.

    ``mean`` divides by the number of agreeing non-zero entries (at least 1), ``sum`` adds them,
    ``max`` takes the largest agreeing magnitude with the elected sign.
    """
    # TIES code keeps negatives where the elected sign is 0 (possible only if the majority sign is 0)
    select = sign.sub(1 - sign.abs())                   # 0 -> -1, +-1 unchanged
    agreeing = (stacked * select).clamp_(min=0)          # |x| where the sign agrees, else 0
    if mode == "max":
        return agreeing.amax(dim=0).mul_(sign)
    total = agreeing.sum(dim=0).mul_(select)
    if mode == "sum":
        return total
    if mode == "mean":
        count = agreeing.sign_().sum(dim=0).clamp_(min=1)   # agreeing entries are > 0, the rest 0
        return total.div_(count)
    raise ValueError(f"unknown disjoint merge mode {mode!r}")


# DARE's drop decisions come from raw 31-bit random integers r (uniform in [0, 2^31)): an entry is kept
# when r >= round(p * 2^31). The bits are numpy PCG64's ``random_raw`` (two 31-bit draws per 64-bit
# word; ~4x cheaper than torch.rand's floats on CPU) seeded from the torch generator, and the mask is
# applied to float32 deltas with integer ops only: (T - 1 - r) >> 31 is all ones where r >= T, else 0,
# and AND-ing it with the float's bits keeps it or writes +0.0. Three in-place passes over one int32
# buffer, no float mask, no boolean tensor; results are bit-identical on every device (and in numpy:
# ``numpy_dare``).


def dare_keep_bits(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random integers uniform in [0, 2^31) as an int32 CPU tensor (the DARE mask source).

    Seeded by one draw from ``generator`` (torch's default generator when None), so that a seeded
    generator gives the same bits every time and advances as a torch draw would."""
    import numpy as np

    seed = int(torch.randint(0, 2**62, (), generator=generator))
    raw = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 1) // 2)
    bits = torch.from_numpy(raw.view(np.int32))[:n]
    return bits.bitwise_and_(0x7FFFFFFF)


def dare_mask_(delta: torch.Tensor, drop_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """In place: zero each entry of ``delta`` with probability ``drop_rate`` (no rescale); returns ``delta``.

    Kept fraction 1 - round(p * 2^31) / 2^31 in expectation (torch.rand's floats resolve p to 2^-24)."""
    threshold = int(round(drop_rate * 2**DARE_BITS))
    bits = dare_keep_bits(delta.numel(), generator)
    if delta.device != bits.device:
        bits = bits.to(delta.device)
    flat = delta.view(-1) if delta.is_contiguous() else None
    if flat is not None and delta.dtype == torch.float32:
        keep = bits.neg_().add_(threshold - 1).bitwise_right_shift_(31)   # -1 keep, 0 drop (no overflow)
        flat.view(torch.int32).bitwise_and_(keep)
        return delta
    mask = (bits >= threshold).reshape(delta.shape)
    return delta.mul_(mask)


def keep_with_probabilities_(delta: torch.Tensor, probabilities: torch.Tensor,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """In place: keep each entry of ``delta`` with its own probability (``probabilities``, same shape, values in
    [0, 1]), zero it otherwise; returns ``delta``. DARE's integer path with a threshold per entry: entry j is
    kept when r_j < round(p_j * 2^31), r_j the same 31-bit bits ``dare_keep_bits`` gives, so a seeded
    generator gives the same mask on every device and the keep probability is p_j to 2^-31."""
    if delta.numel() == 0:
        return delta
    limit = probabilities.to(torch.float64 if probabilities.dtype == torch.float64 else torch.float32)
    thresholds = limit.clamp(0, 1).mul(2**DARE_BITS).round_().clamp_(max=2**DARE_BITS - 1).to(torch.int32)
    bits = dare_keep_bits(delta.numel(), generator)
    if thresholds.device != bits.device:
        bits = bits.to(thresholds.device)
    flat = delta.view(-1) if delta.is_contiguous() else None
    if flat is not None and delta.dtype == torch.float32:
        # r - t < 0 exactly where r < t (no overflow: both in [0, 2^31)); the sign, spread: -1 keep, 0 drop
        keep = bits.sub_(thresholds.view(-1)).bitwise_right_shift_(31)
        flat.view(torch.int32).bitwise_and_(keep)
        return delta
    return delta.mul_((bits < thresholds.reshape(-1)).reshape(delta.shape))


def dare(delta: torch.Tensor, drop_rate: float, generator: torch.Generator | None = None,
         rescale: str = "inverse", inplace: bool = False) -> torch.Tensor:
    """DARE: drop each entry with probability ``drop_rate`` and rescale the survivors.

    ``rescale="inverse"`` multiplies by 1/(1-p) (the paper, keeps the expectation), ``"l1"`` matches the
    L1 norm of the original tensor (mergekit's ``rescale``), ``"none"`` keeps the raw values.
    ``inplace`` overwrites ``delta`` (saves a copy when the caller owns it).
    """
    if drop_rate <= 0:
        return delta if inplace else delta.clone()
    if drop_rate >= 1:
        return delta.zero_() if inplace else torch.zeros_like(delta)
    before = delta.abs().sum() if rescale == "l1" else None
    kept = dare_mask_(delta if inplace else delta.clone(memory_format=torch.contiguous_format),
                      drop_rate, generator)
    if rescale == "inverse":
        return kept.div_(1.0 - drop_rate)
    if rescale == "l1":
        after = kept.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept.mul_(before / after)
    return kept


def l1_rescale(original: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Rescale ``masked`` to the L1 norm of ``original`` (mergekit's ``rescale_norm=l1``)."""
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def model_stock(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool = False,
                cos: torch.Tensor | None = None) -> torch.Tensor:
    """Model Stock: interpolate between the base and the average by t = N cos / (1 + (N-1) cos).

    cos is the mean pairwise cosine of the fine-tuning deltas (per tensor, or per row if ``filter_wise``).
    Where 1 + (N-1) cos vanishes the base is kept. ``cos`` may be given (e.g. computed over a whole
    tensor of which ``base`` and ``models`` are a block).
    """
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() <= 1 else base
        ws = [m.reshape(w0.shape) for m in models]
    else:
        w0 = base.reshape(-1)
        ws = [m.reshape(-1) for m in models]
    if cos is None:
        offsets = [w - w0 for w in ws]
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1:]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)
