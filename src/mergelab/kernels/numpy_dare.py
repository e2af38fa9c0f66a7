"""DARE's random drop and mergekit's L1 rescale on numpy, bit for bit as the torch kernels compute them.

The torch-free lane (``engine.linear_lane``) runs DARE-TIES and DARE linear with these. Three pieces make that possible:

- **The mask seed.** Each (seed, tensor, model, block) has its torch generator (``TensorJob.generator``,
  seeded by ``mask_seed``), and the mask's bits come from numpy's PCG64 seeded by one draw of it,
  ``torch.randint(0, 2**62, ())``. That draw is MT19937 seeded with the seed's low 32 bits (the reference
  generator's ``init_genrand``), two 32-bit outputs, the first the high half, modulo 2^62:
  ``torch_seed_draw`` computes it without torch (the tests compare it with torch on thousands of seeds).
- **The mask.** An entry is kept when its 31-bit draw r >= round(p 2^31) (``merge.dare_mask_``), applied to
  the float's bits with integer operations (a dropped entry becomes +0). PCG64 can skip ahead, so a block
  of a tensor gets its bits without drawing the ones before it.
- **The L1 norms** of mergekit's rescale are float32 sums in one fixed order (``ordered_l1``), which numpy
  and torch compute alike, on every device and any number of threads: entry i is added to lane
  i mod 65536, lanes in index order starting from +0, then the lanes are folded in halves (lane j += lane
  j + h) down to one. Each step is one IEEE addition per element. (torch's own ``sum`` is a cascade whose
  order depends on the CPU's vector width and on the number of threads; this one does not, and is as
  accurate: at most n / 65536 + 16 additions lie on any path.)
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["L1_LANES", "DARE_BITS", "mask_seed", "torch_seed_draw", "KeepBits", "keep_bits", "dare_mask_", "OrderedL1",
           "ordered_l1"]

L1_LANES = 1 << 16
DARE_BITS = 31
CHUNK = 1 << 16           # entries masked per step: the draws and the chunk stay in cache
_LOW31 = np.int32(0x7FFFFFFF)


def mask_seed(seed: int, name: str, index: int, block_row: int) -> int:
    """The seed of the torch generator of model ``index``'s mask in a tensor (in the block starting at
    ``block_row``): masks depend on neither thread order nor the blocks' merge order."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 31 + index + block_row * 7919) % (2**63)


def torch_seed_draw(generator_seed: int) -> int:
    """``int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(generator_seed)))``."""
    # RandomState of a 32-bit seed is MT19937 after init_genrand, as torch's mt19937, and a full-range uint32
    # draw is one raw output: a stream numpy keeps fixed (NEP 19)
    high, low = (int(v) for v in np.random.RandomState(int(generator_seed) & 0xFFFFFFFF).randint(
        0, 2**32, size=2, dtype=np.uint32))
    return ((high << 32) | low) % (2**62)


class KeepBits:
    """The 31-bit draws of a mask seeded by ``draw`` (``merge.dare_keep_bits``), from entry ``offset`` on, a piece
    at a time: int32, each in [0, 2^31). Each 64-bit output of the generator gives two draws, low half first."""

    def __init__(self, draw: int, offset: int = 0):
        self._generator = np.random.PCG64(draw)
        if offset >= 2:
            self._generator.advance(offset // 2)
        self._carry = None            # the high half of an output whose low half went to an earlier piece
        if offset % 2:
            self._carry = self._generator.random_raw(1).view(np.int32)[1]

    def take(self, n: int) -> np.ndarray:
        lead = 1 if self._carry is not None and n else 0
        m = n - lead
        raw = self._generator.random_raw((m + 1) // 2).view(np.int32)
        if lead:
            out = np.empty(n, dtype=np.int32)
            out[0] = self._carry
            out[1:] = raw[:m]
        else:
            out = raw[:m]
        self._carry = raw[m] if m % 2 else (None if lead or self._carry is None else self._carry)
        np.bitwise_and(out, _LOW31, out=out)
        return out


def keep_bits(n: int, draw: int, offset: int = 0) -> np.ndarray:
    """Entries [offset, offset + n) of a mask's draws (``merge.dare_keep_bits`` gives entries [0, n): the same)."""
    return KeepBits(draw, offset).take(n)


def dare_mask_(x: np.ndarray, drop_rate: float, draw: int, offset: int = 0, chunk: int = CHUNK) -> np.ndarray:
    """In place on float32 ``x`` (1-D): the entries whose draw is below round(p 2^31) become +0, the others keep
    their bits (``merge.dare_mask_`` for 0 < p < 1); ``x`` is entries [offset, offset + x.size) of the mask."""
    threshold = np.int32(int(round(drop_rate * 2**DARE_BITS)) - 1)
    bits = KeepBits(draw, offset)
    as_int = x.view(np.int32)
    for start in range(0, x.size, chunk):
        piece = as_int[start:start + chunk]
        keep = bits.take(piece.size)
        np.subtract(threshold, keep, out=keep)       # < 0 exactly where the draw is >= threshold
        np.right_shift(keep, 31, out=keep)            # -1 keep, 0 drop
        np.bitwise_and(piece, keep, out=piece)
    return x


class OrderedL1:
    """The sum of ``|x|`` over consecutive pieces of one array, in ``ordered_l1``'s order (lane i mod 65536
    takes entry i): pieces may split the array anywhere."""

    def __init__(self):
        self.lanes = np.zeros(L1_LANES, dtype=np.float32)
        self.count = 0
        self._scratch = np.empty(L1_LANES, dtype=np.float32)

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1)
        n = x.size
        lane = self.count % L1_LANES
        done = 0
        with np.errstate(over="ignore", invalid="ignore"):       # to Inf / NaN, as torch (which does not warn)
            while done < n:
                take = min(L1_LANES - lane, n - done)
                mag = np.abs(x[done:done + take], out=self._scratch[:take])
                np.add(self.lanes[lane:lane + take], mag, out=self.lanes[lane:lane + take])
                done += take
                lane = 0
        self.count += n

    def result(self) -> np.float32:
        """The folded lanes (the lanes are consumed)."""
        acc = self.lanes
        width = min(self.count, L1_LANES)
        with np.errstate(over="ignore", invalid="ignore"):
            while width > 1:
                half = 1 << ((width - 1).bit_length() - 1)     # the largest power of two below width
                np.add(acc[:width - half], acc[half:width], out=acc[:width - half])
                width = half
        return acc[0] if self.count else np.float32(0)


def ordered_l1(x: np.ndarray) -> np.float32:
    """``sum |x|`` in float32 in the fixed order of this module's docstring (``merge.l1_norm``)."""
    total = OrderedL1()
    total.add(x)
    return total.result()
