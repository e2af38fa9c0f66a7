"""mergekit's random masks, entry for entry: ``mergekit-yaml --random-seed N`` on CPU.

mergekit seeds torch's default CPU generator once (``transformers.set_seed``) and then draws, for every tensor
in its schedule and every model whose density is below 1, one ``torch.bernoulli`` over the whole task vector
(DARE: a tensor full of the density; DELLA: each entry's keep probability). That is one sequential Mersenne
Twister stream: tensor t's mask starts where the masks of every tensor before it ended. A streaming, threaded
merge cannot draw in that order, so this stream is walked once up front, in mergekit's order, and the generator's
state is kept every ``CHECKPOINT`` entries of each (tensor, model) mask; any block of rows of a mask is then drawn
from the nearest state before it, in any order, on any thread.

The bernoulli kernel for a probability tensor consumes one 32-bit output per entry and keeps the entry when the
output's low 24 bits, times 2^-24, are below the probability (cast to float32). ``bernoulli`` draws those bits
with ``random_`` into int32 and compares them itself (several times cheaper than ``torch.bernoulli`` on float32
probabilities here); the stream checks once that this equals ``torch.bernoulli`` and that ``random_`` advances the
generator as far, on the installed torch, and otherwise uses ``torch.bernoulli`` itself.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Sequence

import torch

CHECKPOINT = 1 << 20          # entries between kept generator states (5 KB each)
_ADVANCE = 1 << 20            # entries skipped per call while walking the stream


def _skip(generator: torch.Generator, n: int, scratch: torch.Tensor) -> None:
    """Advance ``generator`` by ``n`` entries of a bernoulli mask (one 32-bit output each)."""
    while n > 0:
        step = min(n, scratch.numel())
        scratch[:step].random_(generator=generator)
        n -= step


def _bits_bernoulli(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torch.bernoulli(probabilities) from raw bits: keep where (bits mod 2^24) * 2^-24 < p (as float32)."""
    bits = torch.empty(probabilities.shape, dtype=torch.int32).random_(generator=generator)
    uniform = bits.bitwise_and_(0xFFFFFF).to(torch.float32).mul_(2.0 ** -24)
    return uniform.lt_(probabilities.to(torch.float32)).to(probabilities.dtype)


def _bits_keep(shape: tuple[int, ...], p: float, generator: torch.Generator) -> torch.Tensor:
    """torch.bernoulli(torch.full(shape, p)) as float32 0/1, from raw bits and one integer threshold: for an integer
    k, k * 2^-24 < p exactly when k < ceil(p * 2^24) (p a float32 or bfloat16 value). In the bits' own memory:
    0/1 times the bit pattern of 1.0f is 0.0f / 1.0f."""
    threshold = math.ceil(p * 2 ** 24)
    bits = torch.empty(shape, dtype=torch.int32).random_(generator=generator)
    return bits.bitwise_and_(0xFFFFFF).lt_(threshold).mul_(0x3F800000).view(torch.float32)


def _fast_path_agrees() -> bool:
    """Does ``_bits_bernoulli`` give torch.bernoulli's masks, and ``random_`` advance as far, on this torch?"""
    probe = torch.tensor([0.0, 2.0 ** -24, 0.1, 0.3, 0.5, 0.7, 0.9, 1 - 2.0 ** -24, 1.0] * 1111, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        p = probe.to(dtype)
        a, b, c = (torch.Generator().manual_seed(12345) for _ in range(3))
        expected = torch.bernoulli(p, generator=a)
        if not torch.equal(_bits_bernoulli(p, b), expected) or not torch.equal(a.get_state(), b.get_state()):
            return False
        for value in (0.0, 2.0 ** -24, 0.3, 0.5, 0.9, 1 - 2.0 ** -24):
            q = float(torch.tensor(value, dtype=dtype))
            g, h = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            if not torch.equal(_bits_keep((3001,), q, g), torch.bernoulli(torch.full((3001,), q, dtype=dtype),
                                                                          generator=h).float()):
                return False
        _skip(c, p.numel(), torch.empty(1000, dtype=torch.uint8))
        if not torch.equal(c.get_state(), a.get_state()):
            return False
    return True


class MergekitMaskStream:
    """The masks of one mergekit run: ``draws`` lists (key, entries) in mergekit's order, every mask it draws."""

    def __init__(self, seed: int, draws: Sequence[tuple[Hashable, int]],
                 progress: Callable[[str, int, int], None] | None = None):
        """``progress(stage, masks walked, masks)`` after each mask of the walk."""
        self.seed = int(seed)
        self.fast = _fast_path_agrees()
        generator = torch.Generator().manual_seed(self.seed)
        scratch = torch.empty(_ADVANCE, dtype=torch.uint8)
        self._states: dict[Hashable, tuple[int, list[torch.Tensor]]] = {}
        for done, (key, n) in enumerate(draws, 1):
            if key in self._states:
                raise ValueError(f"mask {key!r} listed twice")
            states = []
            for start in range(0, n, CHECKPOINT):
                states.append(generator.get_state())
                if self.fast:
                    _skip(generator, min(CHECKPOINT, n - start), scratch)
                else:
                    torch.bernoulli(torch.zeros(min(CHECKPOINT, n - start)), generator=generator)
            self._states[key] = (n, states)
            if progress is not None:
                progress("mergekit masks", done, len(draws))
        self.entries = sum(n for n, _ in self._states.values())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._states

    def _generator_at(self, key: Hashable, offset: int, count: int) -> torch.Generator:
        n, states = self._states[key]
        if offset < 0 or offset + count > n:
            raise ValueError(f"mask {key!r}: entries [{offset}, {offset + count}) outside [0, {n})")
        generator = torch.Generator()
        generator.set_state(states[offset // CHECKPOINT])
        skip = offset % CHECKPOINT
        if self.fast:
            _skip(generator, skip, torch.empty(min(skip, _ADVANCE), dtype=torch.uint8))
        elif skip:
            torch.bernoulli(torch.zeros(skip), generator=generator)
        return generator

    def bernoulli(self, key: Hashable, offset: int, probabilities: torch.Tensor) -> torch.Tensor:
        """Entries [offset, offset + numel) of mask ``key`` (a CPU tensor shaped and typed as ``probabilities``)."""
        p = probabilities.detach().to("cpu").contiguous()
        generator = self._generator_at(key, offset, p.numel())
        return _bits_bernoulli(p, generator) if self.fast else torch.bernoulli(p, generator=generator)

    def keep(self, key: Hashable, offset: int, shape: tuple[int, ...], p: torch.Tensor) -> torch.Tensor:
        """The same entries of a mask of one probability ``p`` (a 0-dim tensor in mergekit's work dtype, as its
        ``torch.full``), as float32 0/1 on CPU: no tensor of probabilities, one buffer."""
        generator = self._generator_at(key, offset, math.prod(shape))
        if self.fast:
            return _bits_keep(tuple(shape), float(p), generator)
        return torch.bernoulli(torch.full(tuple(shape), float(p), dtype=p.dtype), generator=generator).float()
