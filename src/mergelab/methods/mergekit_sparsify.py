"""mergekit 0.1.5's sparsifiers repeated operation for operation (``sparsify.py::magnitude``,
``magnitude_outliers``), for whole tensors whose magnitudes tie at the trim threshold.

mergekit keeps exactly ``k`` entries chosen by ``torch.argsort`` (descending, not stable) of the float32
magnitudes on CPU; among entries equal to the threshold, the ones it keeps depend on that sort's order. A
threshold keeps all of them. The engine's thresholds are exact when no tie straddles the cut; these
functions are used where one does, so that results are bit-identical with the same torch version. That is
common: in bfloat16 (few distinct deltas) and in float32 too (a delta ``ft - base`` is a multiple of the
base weight's ulp; 20 of the 129 tensors of the 1 GB benchmark model). The full sort was about 40 % of a
TIES merge's CPU time; on CPU the choice is now replayed by ``kernels.cpu_sort`` (the partitions of that
sort that decide the kept slice, a quickselect), with the full sort where the replay does not apply.
``exact_ties: false`` skips both and keeps every tied entry.
"""

from __future__ import annotations

import math

from mergelab._lazy import lazy_module

torch = lazy_module("torch")
CS = lazy_module("mergelab.kernels.cpu_sort")


def straddles(delta: torch.Tensor, low: float | None, high: float | None, kept: int,
              counts: list[tuple[int, int] | None] | None = None) -> bool:
    """Do magnitudes tie across a cut: does the band [low, high] hold other than ``kept`` entries?

    ``counts``: the engine's (below, at most) counts of ``low`` and of ``high``, in that order
    (``TensorJob.selection_counts``), which answer without a pass over the tensor."""
    n = delta.numel()
    if counts is not None and all(c is not None for c, v in zip(counts, (low, high)) if v is not None):
        count = n if high is None else counts[1][1]
        return count - (0 if low is None else counts[0][0]) != kept
    mag = delta.abs()
    count = n
    if low is not None:
        count = int((mag >= low).sum())
    if high is not None:
        count -= int((mag > high).sum())
    return count != kept


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit ``magnitude`` without rescale: the top ``max(1, int(d n))`` magnitudes, ties as its argsort."""
    n = delta.numel()
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
        kept = _replayed(torch.neg(w), 0, k, overwrite=True)      # descending order = ascending order of -w
        if kept is not None:
            return delta * kept.to(delta.dtype).reshape_as(delta)
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return delta * mask.reshape_as(delta)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit ``magnitude_outliers`` without rescale: drop the n_bot smallest and keep the next int(d n)."""
    n = delta.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
        kept = _replayed(w, n_bot, n_bot + target)
        if kept is not None:
            return delta * kept.to(delta.dtype).reshape_as(delta)
    idx = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[idx[n_bot:n_bot + target]] = 1
    return delta * mask.reshape_as(delta)


def _replayed(keys: torch.Tensor, lo: int, hi: int, overwrite: bool = False) -> torch.Tensor | None:
    """The entries torch.sort(keys) puts at [lo, hi), replayed (CPU float32 keys; ``overwrite``: a temporary
    the caller does not sort afterwards, used in place); None: sort instead.

    The keys share one sign (magnitudes or their negatives), so their sum is NaN only when one is."""
    if not CS.torch_sort_matches() or math.isnan(float(keys.sum())):
        return None
    mask = CS.sort_slice_mask(keys.numpy(), lo, hi, overwrite=overwrite)
    return None if mask is None else torch.from_numpy(mask)
