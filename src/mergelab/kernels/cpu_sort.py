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
would reach the heapsort depth, and for NaN. The verdict is kept in the user's cache, keyed by torch's
version and CPU library, so that ``replay_trusted`` answers in a process that has not imported torch (the
torch-free lane) without importing it.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from pathlib import Path

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


_SCAN = 1 << 16                 # entries compared per step of a scan


def _scan(keys: np.ndarray, pivot, start: int, stop: int, forward: bool, index) -> np.ndarray:
    """The stops of one of Hoare's scans in keys[start:stop): ascending positions of keys >= pivot (the left
    scan, ``forward``) or descending positions of keys <= pivot (the right scan)."""
    part = keys[start:stop]
    found = np.flatnonzero(part >= pivot) if forward else np.flatnonzero(part <= pivot)[::-1]
    return (found + start).astype(index)


def _extend(stops: list[np.ndarray], have: int, want: int, keys: np.ndarray, pivot, at: int, end: int,
            forward: bool, index) -> np.ndarray:
    """``stops`` continued by the scan from ``at`` towards ``end`` until it holds ``want`` stops (or the range ends)."""
    while have < want and at != end:
        nxt = min(end, at + _SCAN) if forward else max(end, at - _SCAN)
        found = _scan(keys, pivot, *((at, nxt) if forward else (nxt, at)), forward, index)
        stops.append(found)
        have += len(found)
        at = nxt
    joined = np.concatenate(stops) if len(stops) != 1 else stops[0]
    stops.clear()
    return joined


def _partition(keys: np.ndarray, order: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``__unguarded_partition_pivot`` of the whole of ``keys``: the cut and the swapped position pairs.

    Moves the median to the front in place; the swaps are returned, not applied. The i-th stop of the left
    scan pairs with the i-th of the right scan while it lies before it: both scans run a chunk at a time
    from their ends, the one with fewer stops next, until they meet at m. The left stops before m and the
    right stops after it pair up (all of them but the surplus of one side), so only stops near m are
    looked for beyond it, and only about as many stops as swaps are kept."""
    _median_to_front(keys, order)
    pivot = keys[0]
    n = len(keys)
    index = np.intp           # what fancy indexing takes without a conversion
    # position 0 holds the pivot, a stop of both scans: the left scan starts at 1, the right one stops there
    front, back = 1, n
    lefts: list[np.ndarray] = []
    rights: list[np.ndarray] = []
    nl = nr = 0
    while front < back:
        if nl <= nr:
            stop = min(back, front + _SCAN)
            found = _scan(keys, pivot, front, stop, True, index)
            lefts.append(found)
            nl += len(found)
            front = stop
        else:
            start = max(front, back - _SCAN)
            found = _scan(keys, pivot, start, back, False, index)
            rights.append(found)
            nr += len(found)
            back = start
    m = front
    # no more than max(nl, nr) swaps; left[swaps] is the cut's candidate
    if nl >= nr:
        right = _extend(rights or [np.empty(0, index)], nr, nl, keys, pivot, m, 1, False, index)
    else:
        right = np.concatenate(rights)
    left = _extend(lefts or [np.empty(0, index)], nl, max(nl, nr) + 1, keys, pivot, m, n, True, index)
    swaps = _crossing(left, right)
    cut = int(left[swaps]) if swaps < len(left) else len(keys)
    if swaps:
        cut = min(cut, int(right[swaps - 1]))
    return cut, left[:swaps], right[:swaps]


def _mark(mask: np.ndarray, positions: np.ndarray) -> None:
    """``mask[positions] = True`` a chunk at a time (a large int32 index would be converted whole)."""
    for start in range(0, len(positions), 1 << 18):
        mask[positions[start:start + (1 << 18)]] = True


def _split(k: np.ndarray, o: np.ndarray, first: int, lo: int, hi: int, depth: int, mask: np.ndarray,
           stack: list) -> None:
    """One partition of the range at ``first``: the left part's stops receive the right stops' entries and the
    other way round, in place (the parts are disjoint views of one buffer); a part inside the slice [lo, hi)
    marks its members, one across an end of it goes on ``stack``, one outside is left alone."""
    cut, left, right = _partition(k, o)
    last = first + len(k)
    parts = [(start, stop, into, source, lo <= start and stop <= hi)
             for start, stop, into, source in ((first, first + cut, left, right), (first + cut, last, right, left))
             if not (stop <= lo or hi <= start)]
    moved = [(o[source], None if inside else k[source]) for _, _, _, source, inside in parts]   # before any write
    for (start, stop, into, _, inside), (orders, values) in zip(parts, moved):
        o[into] = orders
        if inside:
            _mark(mask, o[start - first:stop - first])
            continue
        k[into] = values
        stack.append((start, k[start - first:stop - first], o[start - first:stop - first], depth - 1))


def sort_slice_mask(keys: np.ndarray, lo: int, hi: int, depth: int | None = None,
                    overwrite: bool = False) -> np.ndarray | None:
    """The entries that torch.sort(keys) (CPU, ascending, not stable) places at positions [lo, hi).

    ``keys`` is a 1-D float array without NaN, not modified unless ``overwrite`` (a caller's own temporary:
    no copy); None where the replay would need the heapsort fallback, past ``depth`` partitions
    (libstdc++'s 2 floor(log2 n) by default)."""
    n = len(keys)
    mask = np.zeros(n, dtype=bool)
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return mask
    index = np.int32 if n < 2 ** 31 else np.int64
    if depth is None:
        depth = 2 * (n.bit_length() - 1) if n > 1 else 0
    stack = [(0, keys if overwrite else np.array(keys, copy=True), np.arange(n, dtype=index), depth)]
    while stack:
        first, k, o, depth = stack.pop()
        last = first + len(k)
        if hi <= first or last <= lo:
            continue
        if lo <= first and last <= hi:
            _mark(mask, o)
            continue
        if len(k) <= _INSERTION_SORT_SIZE:      # the final insertion sort: stable within the range
            o = o[np.argsort(k, kind="stable")]
            mask[o[max(lo - first, 0):hi - first]] = True
            continue
        if depth == 0:
            return None
        _split(k, o, first, lo, hi, depth, mask, stack)
    return mask


@functools.lru_cache(maxsize=1)
def torch_sort_matches() -> bool:
    """Does the replay give torch's own choice here? Checked on tied data, small and past torch's grain;
    the verdict is stored for ``replay_trusted``."""
    verdict = _check_against_torch()
    store_verdict("", verdict)
    return verdict


@functools.lru_cache(maxsize=1)
def replay_trusted() -> bool:
    """``torch_sort_matches()``, from the stored verdict for the installed torch when there is one (no
    torch import), else checked now (importing torch once)."""
    stored = stored_verdict("")
    return stored if stored is not None else torch_sort_matches()


def _verdict_key(check: str) -> str | None:
    build = _torch_build_key()
    if build is None:
        return None
    return f"{check}|{build}" if check else build       # "": the sort replay's (the first check kept here)


def stored_verdict(check: str) -> bool | None:
    """The stored verdict of a check of numpy code against the installed torch (``check`` names it), or None."""
    key = _verdict_key(check)
    if key is None:
        return None
    try:
        stored = json.loads(_verdict_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return stored if isinstance(stored, bool) else None


def _verdict_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mergelab" / "torch-sort-replay.json"


def _torch_build_key() -> str | None:
    """torch's version and its CPU library's name, size and time, read without importing torch: the sort
    is compiled into that library, so a verdict holds while it is the same file."""
    import importlib.metadata
    import importlib.util
    try:
        version = importlib.metadata.version("torch")
        spec = importlib.util.find_spec("torch")
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = sorted((Path(list(spec.submodule_search_locations)[0]) / "lib").glob("libtorch_cpu.*"))
    if not libs:
        return None
    st = libs[0].stat()
    return f"{version}|{platform.machine()}|{libs[0].name}|{st.st_size}|{st.st_mtime_ns}"


def store_verdict(check: str, verdict: bool) -> None:
    """Add the verdict to the cache file (best effort: an unwritable cache only costs the check again)."""
    key = _verdict_key(check)
    if key is None:
        return
    path = _verdict_file()
    try:
        try:
            known = json.loads(path.read_text())
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        if known.get(key) is verdict:
            return
        known[key] = verdict
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def _check_against_torch() -> bool:
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
