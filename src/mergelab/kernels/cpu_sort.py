"""Which entries torch's CPU sort puts in a slice of its output, without sorting everything.

mergekit chooses among magnitudes tied at its trim threshold by the order ``torch.argsort`` (CPU, not
stable) leaves them in. That sort is libstdc++'s ``std::sort`` on (value, index) pairs: introsort with a
median-of-three Hoare partition, ranges of at most 16 left to a final insertion sort, heapsort past a
depth of 2 log2 n. The set of entries that lands in positions [lo, hi) is decided by the partitions of
the ranges that contain ``lo`` or ``hi`` alone: every other range keeps its members wherever they end
up. Replaying only those partitions is a quickselect: O(n) instead of the full O(n log n) sort, 3-8x
faster on the 1-4 M-entry tensors the engine merges whole (2-3x at 16 M). A partition is replayed in a few vector passes: the scans of Hoare's loop stop
at the entries not below / not above the pivot, the i-th stop from the left is swapped with the i-th
from the right while the two have not crossed, and the cut is where the left scan stops after that.

``torch_sort_matches`` checks the replay against torch on tied data once per process; callers fall
back to the full sort where it does not match (a future torch or C++ library), where a replayed path
would reach the heapsort depth, and for NaN.
"""

from __future__ import annotations

import functools

import numpy as np

_INSERTION_SORT_SIZE = 16       # libstdc++ _S_threshold


def _median_to_front(keys: np.ndarray, order: np.ndarray) -> None:
    """``__move_median_to_first(first, first + 1, mid, last - 1)``."""
    a, b, c = 1, len(keys) // 2, len(keys) - 1
    ka, kb, kc = keys[a], keys[b], keys[c]
    if ka < kb:
        med = b if kb < kc else (c if ka < kc else a)
    elif ka < kc:
        med = a
    else:
        med = c if kb < kc else b
    keys[0], keys[med] = keys[med], keys[0]
    order[0], order[med] = order[med], order[0]


def _crossing(left: np.ndarray, right: np.ndarray) -> int:
    """How many stops pair up before the scans cross: left rises and right falls, so a bisection."""
    lo, hi = 0, min(len(left), len(right))
    while lo < hi:
        mid = (lo + hi) // 2
        if left[mid] < right[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _partition(keys: np.ndarray, order: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``__unguarded_partition_pivot`` of the whole of ``keys``: the cut and the swapped position pairs.

    Moves the median to the front in place; the swaps are returned, not applied."""
    _median_to_front(keys, order)
    pivot = keys[0]
    # where `while (*first < pivot) ++first` and `while (pivot < *last) --last` stop, the scans
    # starting at 1 and at the end (position 0, the pivot itself, counts for both and is dropped)
    left = np.flatnonzero(keys >= pivot)[1:]
    right = np.flatnonzero(keys <= pivot)[:0:-1]
    swaps = _crossing(left, right)
    cut = int(left[swaps]) if swaps < len(left) else len(keys)
    if swaps:
        cut = min(cut, int(right[swaps - 1]))
    return cut, left[:swaps], right[:swaps]


def sort_slice_mask(keys: np.ndarray, lo: int, hi: int, depth: int | None = None) -> np.ndarray | None:
    """The entries that torch.sort(keys) (CPU, ascending, not stable) places at positions [lo, hi).

    ``keys`` is a 1-D float array without NaN (not modified); None where the replay would need the
    heapsort fallback, past ``depth`` partitions (libstdc++'s 2 floor(log2 n) by default)."""
    n = len(keys)
    mask = np.zeros(n, dtype=bool)
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return mask
    index = np.int32 if n < 2 ** 31 else np.int64
    if depth is None:
        depth = 2 * (n.bit_length() - 1) if n > 1 else 0
    stack = [(0, np.array(keys, copy=True), np.arange(n, dtype=index), depth)]
    while stack:
        first, k, o, depth = stack.pop()
        last = first + len(k)
        if hi <= first or last <= lo:
            continue
        if lo <= first and last <= hi:
            mask[o] = True
            continue
        if len(k) <= _INSERTION_SORT_SIZE:      # the final insertion sort: stable within the range
            o = o[np.argsort(k, kind="stable")]
            mask[o[max(lo - first, 0):hi - first]] = True
            continue
        if depth == 0:
            return None
        cut, left, right = _partition(k, o)
        for start, stop in ((first, first + cut), (first + cut, last)):
            if stop <= lo or hi <= start:
                continue                        # outside the slice: members need not be known
            # the left part's stops receive the right stops' entries, and the other way round
            into, source = (left, right) if start == first else (right - cut, left)
            part_keys, part_order = k[start - first:stop - first].copy(), o[start - first:stop - first].copy()
            part_keys[into], part_order[into] = k[source], o[source]
            stack.append((start, part_keys, part_order, depth - 1))
    return mask


@functools.lru_cache(maxsize=1)
def torch_sort_matches() -> bool:
    """Does the replay give torch's own choice here? Checked on tied data, small and past torch's grain."""
    import torch
    rng = np.random.default_rng(20261201)
    for n, levels in ((997, 7), (40_000, 50), (100_003, 1000)):
        keys = (rng.integers(0, levels, n).astype(np.float32) * np.float32(0.5))
        for lo, hi in ((0, n // 3), (n // 5, n - n // 7)):
            mask = sort_slice_mask(keys, lo, hi)
            if mask is None:
                return False
            expected = np.zeros(n, dtype=bool)
            expected[torch.sort(torch.from_numpy(keys)).indices[lo:hi].numpy()] = True
            if not np.array_equal(mask, expected):
                return False
    return True
