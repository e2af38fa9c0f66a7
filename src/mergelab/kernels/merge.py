"""Pure tensor kernels of the data-free merges.

Every function takes and returns plain tensors (float32 for the arithmetic) and has no side effects,
so each step of a method (trim, sign election, disjoint merge, ...) can be tested on its own and
composed differently by the paper and mergekit semantics. Stacked task vectors are ``[T, *shape]``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "task_vectors",
    "keep_count",
    "kth_smallest",
    "ties_trim",
    "ties_trim_rows",
    "trim_by_threshold",
    "zero_below",
    "zero_above",
    "keep_band",
    "topk_exact",
    "elect_sign",
    "disjoint_merge",
    "breadcrumbs_rows",
    "magnitude_band",
    "dare",
    "model_stock",
    "l1_rescale",
    "RadixSelect",
    "BandSelect",
    "sample_bracket",
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


def kth_smallest(values: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """k-th smallest (1-based) of ``values`` overall or along ``dim`` (keepdim), exactly."""
    if dim is not None:
        return torch.kthvalue(values, k, dim=dim, keepdim=True).values
    flat = values.reshape(-1)
    if flat.device.type == "cpu" and flat.numel() > _SAMPLE * 8 and flat.dtype in (torch.float32, torch.float64):
        return torch.tensor(_kth_sampled(flat.numpy(), k), dtype=flat.dtype)
    return torch.kthvalue(flat, k).values


_SAMPLE = 1 << 14


def sample_bracket(sample: np.ndarray, k: int, n: int, slack: float = 4.0) -> tuple[float, float]:
    """Limits ``lo <= hi`` that very likely hold the k-th smallest of n values, from a sorted sample.

    The k-th value sits near position (k - 1/2) / n of the sample; ``slack`` standard deviations of a
    sample quantile on each side (about sqrt(size) positions) make a miss rare. A miss costs time,
    never exactness: ``BandSelect`` reports it and the caller selects another way.
    """
    size = sample.size
    if size == 0:
        return float("-inf"), float("inf")
    pos = (k - 0.5) / n * size
    margin = slack * size ** 0.5 + 8
    i_lo, i_hi = int(pos - margin), int(pos + margin)
    lo = float(sample[i_lo]) if i_lo >= 0 else float("-inf")
    hi = float(sample[i_hi]) if i_hi < size else float("inf")
    return lo, hi


class BandSelect:
    """Exact k-th smallest over a stream of tensors in one pass, given a bracket ``[lo, hi]``.

    Counts the values below ``lo`` and keeps those inside the bracket (a few percent of them); the
    k-th value is then found in what was kept. ``finish`` returns None when the bracket missed it, or
    when more than ``max_kept`` values fell inside it (which bounds the memory), so that the caller
    can fall back to ``RadixSelect``. ``part`` is pure (threads may call it); ``add`` sums.
    """

    def __init__(self, k: int, lo: float, hi: float, max_kept: int | None = None):
        self.k, self.lo, self.hi, self.max_kept = k, lo, hi, max_kept
        self.below = 0
        self.kept = 0
        self.parts: list = []
        self.failed = False

    def part(self, values: torch.Tensor) -> tuple[int, object]:
        """(number of values below the bracket, copy of the values inside it) of one tensor."""
        flat = values.detach().reshape(-1)
        if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
            a = flat.numpy()
            return int(np.count_nonzero(a < self.lo)), a[(a >= self.lo) & (a <= self.hi)]
        return int((flat < self.lo).sum()), flat[(flat >= self.lo) & (flat <= self.hi)]

    def add(self, values: torch.Tensor | None = None, part: tuple[int, object] | None = None) -> None:
        if self.failed:
            return
        below, band = part if part is not None else self.part(values)
        self.below += below
        self.kept += int(band.size if isinstance(band, np.ndarray) else band.numel())
        self.parts.append(band)
        if self.max_kept is not None and self.kept > self.max_kept:
            self.failed, self.parts = True, []

    def finish(self) -> float | None:
        rank = self.k - self.below
        if self.failed or not 1 <= rank <= self.kept:
            return None
        if isinstance(self.parts[0], np.ndarray):
            band = np.concatenate(self.parts)
            return float(np.partition(band, rank - 1)[rank - 1])
        return float(torch.kthvalue(torch.cat(self.parts), rank).values)


def _kth_sampled(values: np.ndarray, k: int) -> float:
    """Exact k-th smallest by sampling a narrow band that contains it (Floyd-Rivest style).

    A sorted random sample brackets the k-th value; one counting pass and one band extraction
    then leave a small array to partition. 5-7x faster than ``torch.kthvalue`` on large CPU tensors.
    The result is exact whatever the sample: if the band misses, it falls back to a full partition.
    """
    n = values.size
    rng = np.random.default_rng(n * 1_000_003 + k)
    lo, hi = sample_bracket(np.sort(values[rng.integers(0, n, _SAMPLE)]), k, n)
    if lo != float("-inf") or hi != float("inf"):
        band = BandSelect(k, lo, hi)
        band.add(torch.from_numpy(values))
        found = band.finish()
        if found is not None:
            return found
    return float(np.partition(values, k - 1)[k - 1])


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


def elect_sign(stacked: torch.Tensor, zero: str = "majority") -> torch.Tensor:
    """TIES sign election by mass: sign of the summed (trimmed) task vectors.

    ``zero="majority"``: coordinates with zero sum take the sign of the sum of all elected signs (TIES
    code, here over the tensor given); ``zero="positive"``: they take +1 (mergekit).
    """
    sign = torch.sign(stacked.sum(dim=0))
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


def dare(delta: torch.Tensor, drop_rate: float, generator: torch.Generator | None = None,
         rescale: str = "inverse") -> torch.Tensor:
    """DARE: drop each entry with probability ``drop_rate`` and rescale the survivors.

    ``rescale="inverse"`` multiplies by 1/(1-p) (the paper, keeps the expectation), ``"l1"`` matches the
    L1 norm of the original tensor (mergekit's ``rescale``), ``"none"`` keeps the raw values.
    """
    if drop_rate <= 0:
        return delta.clone()
    if drop_rate >= 1:
        return torch.zeros_like(delta)
    # keep where u >= p, as a float mask: sign(u - p) + 1 is 0 below p and >= 1 from p on (a boolean
    # mask costs ~5x more on CPU)
    mask = torch.rand(delta.shape, generator=generator, device=delta.device).sub_(drop_rate).sign_()
    kept = delta * mask.add_(1).clamp_(max=1)
    if rescale == "inverse":
        return kept / (1.0 - drop_rate)
    if rescale == "l1":
        return l1_rescale(delta, kept)
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


def _bincount(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Histogram of small non-negative ints; numpy's bincount is ~5x faster than torch's on CPU."""
    if values.device.type != "cpu":
        return torch.bincount(values.long(), minlength=bins).cpu()
    return torch.from_numpy(np.bincount(values.numpy(), minlength=bins).astype(np.int64))


class RadixSelect:
    """Exact k-th smallest magnitude over a stream of tensors, in bounded memory.

    Non-negative float32 values order like their int32 bit patterns, so the k-th smallest is found by
    two histogram passes: the top 16 bits (65,536 bins), then the low 16 bits inside the one bin that
    holds the k-th value. Memory: two histograms, whatever the model size. Usage::

        sel = RadixSelect(k)            # k is 1-based over all values of all tensors
        for t in tensors: sel.add_high(t)
        sel.finish_high()
        for t in tensors: sel.add_low(t)
        threshold = sel.finish_low()    # a float, equal to torch.kthvalue over the concatenation
    """

    BINS = 1 << 16

    def __init__(self, k: int):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.total = 0
        self.high = torch.zeros(self.BINS, dtype=torch.int64)
        self.low = torch.zeros(self.BINS, dtype=torch.int64)
        self.bin: int | None = None
        self.rank_in_bin = 0

    @staticmethod
    def _bits(values: torch.Tensor) -> torch.Tensor:
        return values.detach().abs().to(torch.float32).reshape(-1).contiguous().view(torch.int32)

    def high_histogram(self, values: torch.Tensor) -> torch.Tensor:
        """Histogram of the top 16 bits; pure, so threads can compute it and ``add_high`` sums."""
        return _bincount(self._bits(values) >> 16, self.BINS)

    def add_high(self, values: torch.Tensor | None = None, histogram: torch.Tensor | None = None) -> None:
        if histogram is None:
            histogram = self.high_histogram(values)
        self.total += int(histogram.sum())
        self.high += histogram

    def finish_high(self) -> None:
        if self.k > self.total:
            raise ValueError(f"k={self.k} exceeds the number of values ({self.total})")
        cumulative = torch.cumsum(self.high, 0)
        self.bin = int(torch.searchsorted(cumulative, torch.tensor(self.k)).item())
        before = int(cumulative[self.bin - 1]) if self.bin > 0 else 0
        self.rank_in_bin = self.k - before

    def low_histogram(self, values: torch.Tensor) -> torch.Tensor:
        """Histogram of the low 16 bits of the values that fall in the selected high bin."""
        bits = self._bits(values)
        inside = bits[(bits >> 16) == self.bin]
        return _bincount(inside & 0xFFFF, self.BINS)

    def add_low(self, values: torch.Tensor | None = None, histogram: torch.Tensor | None = None) -> None:
        self.low += self.low_histogram(values) if histogram is None else histogram

    def finish_low(self) -> float:
        cumulative = torch.cumsum(self.low, 0)
        low = int(torch.searchsorted(cumulative, torch.tensor(self.rank_in_bin)).item())
        bits = torch.tensor([(self.bin << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32).item())
