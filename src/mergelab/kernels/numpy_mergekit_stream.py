"""mergekit's DARE masks (``mergekit-yaml --random-seed N``) on numpy, for the torch-free lane.

``mergekit_stream`` explains the stream: one Mersenne Twister seeded once, one output per mask entry, the masks in
mergekit's order. torch's ``manual_seed(s)`` of a 32-bit seed is MT19937's ``init_genrand(s)``, as numpy's
``RandomState(s)``, and an entry is kept when its output's low 24 bits are below ``ceil(p * 2^24)``; numpy's
``MT19937`` walks the stream (``random_raw(n, output=False)``, 2 ns per entry here) and draws it (``integers``
over the full uint32 range: one output each). Whether this equals the installed torch's ``torch.bernoulli`` is
checked once per machine and torch build (``bernoulli_replay_trusted``; the verdict is kept beside the sort
replay's, ``cpu_sort``); where it does not, the lane leaves the merge to the torch engine.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

CHECKPOINT = 1 << 20          # entries between kept generator states
CHUNK = 1 << 17               # entries drawn at a time


def mergekit_draw_order(names: Iterable[str], size: Callable[[str], int], models: int,
                        draws: Callable[[str, int], bool]) -> list[tuple[tuple[str, int], int]]:
    """((tensor, model index), entries) of every mask mergekit draws, in its order: its schedule runs one tensor at
    a time in the order of their names (its tasks' group labels), and within a tensor the models in the recipe's
    order; ``draws(name, i)``: does model i draw a mask of that tensor (its density, as the method says)."""
    return [((name, i), size(name)) for name in sorted(names) for i in range(models) if draws(name, i)]


def _generator(seed: int) -> np.random.MT19937:
    bit_generator = np.random.MT19937()
    bit_generator.state = np.random.RandomState(int(seed) & 0xFFFFFFFF).get_state(legacy=False)
    return bit_generator


def _skip(bit_generator: np.random.MT19937, n: int) -> None:
    while n > 0:
        step = min(n, CHECKPOINT)
        bit_generator.random_raw(step, output=False)
        n -= step


class NumpyMergekitStream:
    """``mergekit_stream.MergekitMaskStream`` for masks of one probability, applied to float32 numpy arrays."""

    def __init__(self, seed: int, draws: Sequence[tuple[Hashable, int]]):
        walker = _generator(seed)
        self._states: dict[Hashable, tuple[int, list[dict]]] = {}
        for key, n in draws:
            if key in self._states:
                raise ValueError(f"mask {key!r} listed twice")
            states = []
            for start in range(0, n, CHECKPOINT):
                states.append(walker.state)
                _skip(walker, min(CHECKPOINT, n - start))
            self._states[key] = (n, states)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._states

    def keep_bits(self, key: Hashable, offset: int, count: int, p: float) -> np.ndarray:
        """Entries [offset, offset + count) of mask ``key`` of probability ``p`` (float32-rounded) as bool."""
        out = np.empty(count, dtype=bool)

        def store(start: int, keep: np.ndarray) -> None:
            out[start:start + keep.size] = keep
        self._each_chunk(key, offset, count, p, store)
        return out

    def apply_(self, key: Hashable, offset: int, x: np.ndarray, p: float) -> np.ndarray:
        """In place on float32 1-D ``x`` (entries [offset, offset + x.size) of the mask): ``x * mask``, as mergekit
        multiplies (a dropped negative entry becomes -0)."""
        def multiply(start: int, keep: np.ndarray) -> None:
            piece = x[start:start + keep.size]
            np.multiply(piece, keep, out=piece)
        self._each_chunk(key, offset, x.size, p, multiply)
        return x

    def _each_chunk(self, key: Hashable, offset: int, count: int, p: float, use) -> None:
        n, states = self._states[key]
        if offset < 0 or offset + count > n:
            raise ValueError(f"mask {key!r}: entries [{offset}, {offset + count}) outside [0, {n})")
        bit_generator = np.random.MT19937()
        bit_generator.state = states[offset // CHECKPOINT]
        _skip(bit_generator, offset % CHECKPOINT)
        draws = np.random.Generator(bit_generator)
        threshold = np.uint32(math.ceil(float(np.float32(p)) * 2 ** 24))
        for start in range(0, count, CHUNK):
            bits = draws.integers(0, 2 ** 32, size=min(CHUNK, count - start), dtype=np.uint32)
            np.bitwise_and(bits, np.uint32(0xFFFFFF), out=bits)
            use(start, bits < threshold)


@functools.lru_cache(maxsize=1)
def bernoulli_replay_trusted() -> bool:
    """Do these masks equal the installed torch's ``torch.bernoulli`` (seeded as mergekit seeds it)? The stored
    verdict for this torch build when there is one (no torch import), else checked now (importing torch once)."""
    from mergelab.kernels import cpu_sort
    stored = cpu_sort.stored_verdict("bernoulli")
    if stored is not None:
        return stored
    verdict = _check_against_torch()
    cpu_sort.store_verdict("bernoulli", verdict)
    return verdict


def _check_against_torch() -> bool:
    import torch
    for seed, sizes, p in ((11, (3, 1000, 1_048_577, 70_001), 0.3), (2**32 - 1, (5, 2_000), 0.9),
                           (0, (1_000,), 2.0 ** -24)):
        stream = NumpyMergekitStream(seed, [(i, n) for i, n in enumerate(sizes)])
        generator = torch.Generator().manual_seed(seed)
        for i, n in enumerate(sizes):
            expected = torch.bernoulli(torch.full((n,), p), generator=generator).numpy().astype(bool)
            if not np.array_equal(stream.keep_bits(i, 0, n, p), expected):
                return False
            if n > 1000 and not np.array_equal(stream.keep_bits(i, n - 1000, 1000, p), expected[-1000:]):
                return False
    return True
