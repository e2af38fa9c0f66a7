"""mergekit's TIES steps on float32 numpy arrays, bit for bit as the torch kernels compute them on CPU.

The torch-free lane (``engine.linear_lane``) runs TIES and breadcrumbs with these: ``zero_below_`` is
``merge.zero_below`` (``hardshrink``: a trimmed entry becomes +0), ``zero_above_`` and ``keep_band_`` are
``merge.zero_above`` and ``merge.keep_band``, ``consensus_mix`` is ``merge.fused_consensus_mix`` step for
step. Each step is one IEEE operation per element or a sum over at most four rows in model order, which
numpy and torch round alike; where the two libraries differ on signed zeros or NaN, the step is written
the way torch computes it (``clamp_(min=0)`` keeps -0 and NaN; numpy's ``maximum`` gives +0, which only
a base of -0 can tell apart, so only chunks holding one take the slower exact path).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["zero_below_", "zero_above_", "keep_band_", "consensus_mix", "MAX_ROWS", "CHUNK"]

MAX_ROWS = 4              # merge.SEQUENTIAL_ROWS: rows added in order
CHUNK = 1 << 17           # merge.FUSED_CHUNK
NEGATIVE_ZERO = np.uint32(0x80000000)


def zero_below_(x: np.ndarray, threshold: float, scratch: np.ndarray | None = None,
                keep: np.ndarray | None = None, signed_zeros: bool = True) -> np.ndarray:
    """In place: entries with ``|x| < threshold`` become +0 (those at the threshold, and NaN, are kept).

    ``x * (|x| >= t) + 0``: the product leaves -0 where a negative entry is dropped, adding +0 makes it +0
    and changes nothing else (4x faster than a masked ``copyto``); ``signed_zeros=False`` skips that add,
    for a caller to which the sign of a zero makes no difference. ``scratch`` (float32) and ``keep`` (bool),
    at least as large as ``x``, spare the temporaries."""
    if not threshold > 0:
        return x
    mag = np.abs(x, out=scratch[:x.size].reshape(x.shape) if scratch is not None else None)
    kept = np.greater_equal(mag, np.float32(threshold), out=keep[:x.size].reshape(x.shape) if keep is not None else None)
    np.multiply(x, kept, out=x)
    if signed_zeros:
        np.add(x, np.float32(0), out=x)
    return x


def zero_above_(x: np.ndarray, threshold: float) -> np.ndarray:
    """In place: entries with ``|x| > threshold`` become +0 (an infinite one NaN, NaN stays), as ``merge.zero_above``.

    torch computes ``x - hardshrink(x, t)``: hardshrink is +0 where ``|x| <= t`` and ``x`` elsewhere (NaN too),
    so the kept entries keep their bits (-0 included) and ``Inf - Inf`` is NaN."""
    t = np.float32(threshold)
    if not (0 <= threshold < np.inf):           # masked_fill_(|x| > t, 0): NaN is not above anything
        with np.errstate(invalid="ignore"):
            np.copyto(x, np.float32(0), where=np.abs(x) > t)
        return x
    with np.errstate(invalid="ignore"):
        outside = np.logical_not(np.less_equal(np.abs(x), t))      # NaN counts as outside, as in hardshrink
        shrunk = np.multiply(x, outside)
        np.add(shrunk, np.float32(0), out=shrunk)                     # hardshrink's zeros are +0
        np.subtract(x, shrunk, out=x)
    return x


def keep_band_(x: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """In place: keep the entries with ``low <= |x| <= high`` (a missing limit is open), as ``merge.keep_band``."""
    if low is not None:
        zero_below_(x, low)
    if high is not None:
        zero_above_(x, high)
    return x


def _sum_rows(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``rows[0] + rows[1] + ...`` in order, into ``out``."""
    if rows.shape[0] == 1:
        np.copyto(out, rows[0], casting="unsafe")
        return out
    np.add(rows[0], rows[1], out=out, casting="unsafe")
    for row in rows[2:]:
        np.add(out, row, out=out, casting="unsafe")
    return out


def consensus_mix(base: np.ndarray, deltas: np.ndarray, weights: Sequence[float], normalize: bool, lam: float,
                  out: np.ndarray | None = None, chunk: int = CHUNK,
                  trims: Sequence[float | np.ndarray | None] | None = None) -> tuple[np.ndarray, bool]:
    """``merge.fused_consensus_mix`` of ``deltas`` ``[T, n]`` (float32, overwritten) on ``base`` ``[n]``:
    times the weights, the sign of their sum (0 -> +1), the agreeing entries summed [and divided by the sum
    of their weights, 1 where none is kept], times ``lam``, plus the base. Returns the result and whether it
    is all finite.

    ``trims[i]``: row i trimmed first, chunk by chunk while it is in cache: a threshold (``zero_below_``) or
    a boolean mask of the entries kept (multiplied, as mergekit's mask); None leaves it whole."""
    t, n = deltas.shape
    if not 1 <= t <= MAX_ROWS:
        raise ValueError(f"the consensus mix takes 1 to {MAX_ROWS} task vectors, got {t}")
    if out is None:
        out = np.empty(n, dtype=np.float32)
    w = np.array(weights, dtype=np.float32)
    scale = w.reshape(-1, 1) if any(x != 1 for x in weights) else None
    low = float(w.min())
    low32 = np.float32(low)
    lam32 = np.float32(lam)
    zero, one, minus_two = np.float32(0), np.float32(1), np.float32(-2)
    size = min(chunk, n)
    sign_buf = np.empty(size, dtype=np.float32)
    kept_buf = np.empty(size, dtype=np.float32)
    neg_buf = np.empty((t, size), dtype=bool)
    trim_buf = np.empty(size, dtype=np.float32)
    count_buf = np.empty(size, dtype=np.uint8)
    trims = list(trims) if trims is not None else [None] * t
    finite = True
    with np.errstate(all="ignore"):          # overflow and NaN as torch, which does not warn
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            k = stop - start
            d, acc, sign = deltas[:, start:stop], out[start:stop], sign_buf[:k]
            b = base[start:stop]
            # The sign of a zero reaches the result only as base + (+-0) where the base is -0: chunks holding
            # such a base take the exact steps (zeros signed as torch signs them), the others faster ones.
            exact = bool((b.view(np.uint32) == NEGATIVE_ZERO).any())
            for i, trim in enumerate(trims):
                if isinstance(trim, np.ndarray):
                    np.multiply(d[i], trim[start:stop], out=d[i])
                elif trim is not None:
                    zero_below_(d[i], trim, trim_buf, neg_buf[0], signed_zeros=exact)
            if scale is not None:
                np.multiply(d, scale, out=d)
            _sum_rows(d, sign)
            # torch's sign(sign(sum) + 0.5): -1 below 0, else +1 (0, -0 and NaN too: torch's sign of NaN is 0)
            below = np.less(sign, zero, out=neg_buf[0, :k])
            np.multiply(below, minus_two, out=sign)
            np.add(sign, one, out=sign)
            np.multiply(d, sign, out=d)
            if exact:
                np.copyto(d, zero, where=np.less(d, zero, out=neg_buf[:, :k]))    # clamp_(min=0) keeps -0
            else:
                np.maximum(d, zero, out=d)                   # |w delta| where signs agree, else 0 (NaN kept)
            _sum_rows(d, acc)
            np.multiply(acc, sign, out=acc)
            if normalize:
                flags = np.greater(d, zero, out=neg_buf[:, :k])         # torch's sign: 1 where kept (0 for NaN)
                if scale is not None:
                    np.copyto(d, flags)
                    np.multiply(d, scale, out=d)
                    kept = _sum_rows(d, kept_buf[:k])
                else:       # a sum of ones in float32 is the count: added as bytes, converted once
                    kept = kept_buf[:k]
                    np.copyto(kept, _sum_rows(flags.view(np.uint8), count_buf[:k]))
                if low > 0:
                    np.maximum(kept, low32, out=kept)        # only the zeros change (every kept sum >= low)
                else:
                    np.copyto(kept, one, where=kept == zero)
                np.divide(acc, kept, out=acc)
            if lam != 1:
                np.multiply(acc, lam32, out=acc)
            np.add(acc, b, out=acc)
            if finite and not np.isfinite(np.add.reduce(acc)):
                finite = bool(np.isfinite(acc).all())
    return out, finite
