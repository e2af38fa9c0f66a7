"""mergekit 0.1.5's sparsifiers repeated operation for operation (``sparsify.py::magnitude``,
``magnitude_outliers``), for whole tensors whose magnitudes tie at the trim threshold.

mergekit keeps exactly ``k`` entries chosen by ``torch.argsort`` (descending, not stable) of the float32
magnitudes on CPU; among entries equal to the threshold, the ones it keeps depend on that sort's order. A
threshold keeps all of them. The engine's thresholds are exact when no tie straddles the cut; these
functions are used where one does, so that results are bit-identical with the same torch version. That is
common: in bfloat16 (few distinct deltas) and in float32 too (a delta ``ft - base`` is a multiple of the
base weight's ulp; 20 of the 129 tensors of the 1 GB benchmark model), where the full sort is about 40 % of a
TIES merge's CPU time. ``exact_ties: false`` skips it and keeps every tied entry.
"""

from __future__ import annotations

from mergelab._lazy import lazy_module

torch = lazy_module("torch")


def straddles(delta: torch.Tensor, low: float | None, high: float | None, kept: int) -> bool:
    """Do magnitudes tie across a cut: does the band [low, high] hold other than ``kept`` entries?"""
    mag = delta.abs()
    count = mag.numel()
    if low is not None:
        count = int((mag >= low).sum())
    if high is not None:
        count -= int((mag > high).sum())
    return count != kept


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit ``magnitude`` without rescale: the top ``max(1, int(d n))`` magnitudes, ties as its argsort."""
    n = delta.numel()
    k = max(1, int(density * n))
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
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
    idx = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[idx[n_bot:n_bot + target]] = 1
    return delta * mask.reshape_as(delta)
