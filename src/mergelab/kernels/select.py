"""Exact selection of the k-th smallest magnitude: whole tensors, streams of blocks, whole models.

Sorting is never needed: a sampled bracket and one counting pass leave a few values to partition
(``BandSelect``); two 16-bit histogram passes (``RadixSelect``) are the exact fallback in bounded memory.
"""

from __future__ import annotations

import numpy as np
import torch

from mergelab.kernels.band_select import SAMPLE, BandSelect, kth_sampled, sample_bracket

__all__ = ["kth_smallest", "kth_smallest_counted", "kth_smallest_magnitude_counted", "sample_bracket", "BandSelect",
           "RadixSelect"]


def kth_smallest(values: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """k-th smallest (1-based) of ``values`` overall or along ``dim`` (keepdim), exactly."""
    if dim is not None:
        return torch.kthvalue(values, k, dim=dim, keepdim=True).values
    flat = values.reshape(-1)
    if _sampled_pays(flat):
        return torch.tensor(kth_sampled(flat.numpy(), k), dtype=flat.dtype)
    return torch.kthvalue(flat, k).values


def kth_smallest_counted(values: torch.Tensor, k: int) -> tuple[float, int, int]:
    """The k-th smallest (1-based) of all ``values``, with how many values are below it and at most it.

    The counts say whether ties straddle the rank (``n_less < k - 1`` or ``n_at_most > k``) without
    another pass over the tensor: on large CPU tensors they come from the selection's own band."""
    flat = values.reshape(-1)
    if _sampled_pays(flat):
        return kth_sampled(flat.numpy(), k, counted=True)
    value = torch.kthvalue(flat, k).values
    return float(value), int((flat < value).sum()), int((flat <= value).sum())


def kth_smallest_magnitude_counted(x: torch.Tensor, k: int, scale: float = 1.0) -> tuple[float, int, int]:
    """``kth_smallest_counted(|scale * x|, k)``, the same value and counts, without the magnitudes in memory:
    on large float CPU tensors they are formed chunk by chunk (in cache) while the sampled band is counted
    and gathered (a 4 M-entry tensor: 13.3 -> 9.7 ms, and no 16 MB array per model)."""
    flat = x.reshape(-1)
    if not _sampled_pays(flat):
        return kth_smallest_counted((flat * scale).abs_() if scale != 1.0 else flat.abs(), k)
    return kth_sampled(flat.numpy(), k, counted=True, magnitudes_of=scale)


def _sampled_pays(flat: torch.Tensor) -> bool:
    """Large float CPU tensors: the sampled band (numpy) beats ``torch.kthvalue``."""
    return flat.device.type == "cpu" and flat.numel() > SAMPLE * 8 and flat.dtype in (torch.float32, torch.float64)


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
