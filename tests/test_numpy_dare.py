"""DARE's mask and mergekit's L1 rescale on numpy (``kernels.numpy_dare``) against the torch kernels, bit for
bit: the generator's seed draw, the mask bits (also from an offset), the masked floats, the ordered L1 norm."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab import kernels as K
from mergelab.kernels import numpy_dare as ND


def _torch_draw(seed: int) -> int:
    return int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(seed)))


def test_seed_draw_is_torchs_on_many_seeds():
    rng = random.Random(20261202)
    seeds = [0, 1, 42, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**62 + 5, 2**63 - 1]
    seeds += [rng.randrange(2**63) for _ in range(3000)] + [rng.randrange(2**32) for _ in range(1000)]
    assert [ND.torch_seed_draw(s) for s in seeds] == [_torch_draw(s) for s in seeds]


def test_mask_seed_is_the_jobs_generator():
    from mergelab.methods import TensorJob
    base = torch.zeros(8, 4)
    for rows, index in ((None, 0), ((8, 16), 2), ((4096, 5000), 1)):
        job = TensorJob("model.layers.3.mlp.up_proj.weight", base, [], {"seed": 1234}, [{}], "mergekit", rows=rows)
        expected = _torch_draw(ND.mask_seed(1234, job.name, index, rows[0] if rows else 0))
        assert int(torch.randint(0, 2**62, (), generator=job.generator(index))) == expected


@pytest.mark.parametrize("n", [1, 2, 7, 4096, 100_001])
def test_keep_bits_are_the_torch_kernels_from_any_offset_in_any_pieces(n):
    seed = 987654321 + n
    expected = K.dare_keep_bits(n, torch.Generator().manual_seed(seed)).numpy()
    draw = ND.torch_seed_draw(seed)
    assert np.array_equal(ND.keep_bits(n, draw), expected)
    for offset in sorted({0, 1, 2, 3, n // 2, n - 1} & set(range(n + 1))):
        assert np.array_equal(ND.keep_bits(n - offset, draw, offset), expected[offset:])
    rng = np.random.default_rng(n)
    for offset in (0, 1, n // 3):
        bits = ND.KeepBits(draw, offset)
        pieces, left = [], n - offset
        while left > 0:
            take = int(min(left, rng.integers(0, 7) if rng.random() < 0.5 else rng.integers(1, 5000)))
            pieces.append(bits.take(take))
            left -= take
        assert np.array_equal(np.concatenate(pieces) if pieces else expected[:0], expected[offset:])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), drop=st.sampled_from([1e-6, 0.001, 0.1, 0.5, 0.875, 0.999]),
       seed=st.integers(0, 2**63 - 1), data=st.data())
def test_mask_bits_equal_the_torch_kernel(n, drop, seed, data):
    words = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n))
    x = np.array(words, dtype=np.uint32).view(np.float32)       # any bits: NaN, Inf, -0, subnormals
    expected = K.dare_mask_(torch.from_numpy(x.copy()), drop, torch.Generator().manual_seed(seed)).numpy()
    got = ND.dare_mask_(x.copy(), drop, ND.torch_seed_draw(seed))
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    cut = data.draw(st.integers(0, n))
    pieces = x.copy()
    chunk = data.draw(st.sampled_from([ND.CHUNK, 2, 3, 1000]))
    ND.dare_mask_(pieces[:cut], drop, ND.torch_seed_draw(seed), chunk=chunk)
    ND.dare_mask_(pieces[cut:], drop, ND.torch_seed_draw(seed), offset=cut, chunk=chunk)
    assert np.array_equal(pieces.view(np.uint32), expected.view(np.uint32))


def _plain_l1(x: np.ndarray) -> np.float32:
    """The documented order, written plainly: lane i mod 65536 takes entry i; all 65536 lanes folded."""
    lanes = np.zeros(ND.L1_LANES, dtype=np.float32)
    mag = np.abs(x.reshape(-1))
    for start in range(0, mag.size, ND.L1_LANES):
        piece = mag[start:start + ND.L1_LANES]
        lanes[:piece.size] += piece
    while lanes.size > 1:
        lanes = lanes[:lanes.size // 2] + lanes[lanes.size // 2:]
    return lanes[0]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 1000, 65_535, 65_536, 65_537, 131_072, 200_003, 1_048_576 + 9])
def test_ordered_l1_numpy_torch_and_the_plain_order_agree(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(np.float32)
    a = ND.ordered_l1(x)
    assert a.dtype == np.float32
    assert a.view(np.uint32) == _plain_l1(x).view(np.uint32)
    assert a.view(np.uint32) == K.l1_norm(torch.from_numpy(x.copy())).numpy().view(np.uint32)
    if n:
        assert abs(float(a) - float(np.abs(x.astype(np.float64)).sum())) <= 1e-5 * float(a)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(0, 140_000))
def test_ordered_l1_over_pieces_and_special_values(data, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    specials = data.draw(st.lists(st.tuples(st.integers(0, max(n - 1, 0)),
                                            st.sampled_from([np.inf, -np.inf, np.nan, -0.0, 1e-45, 3e38])),
                                  max_size=3))
    for at, value in specials:
        if n:
            x[at] = value
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=4)))
    total = ND.OrderedL1()
    for a, b in zip([0, *cuts], [*cuts, n]):
        total.add(x[a:b])
    expected = K.l1_norm(torch.from_numpy(x.copy())).numpy()
    assert total.result().view(np.uint32) == expected.view(np.uint32)


def test_l1_norm_does_not_depend_on_torchs_threads():
    x = torch.from_numpy(np.random.default_rng(3).standard_normal(3_000_001).astype(np.float32))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = K.l1_norm(x)
        torch.set_num_threads(2)
        two = K.l1_norm(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
