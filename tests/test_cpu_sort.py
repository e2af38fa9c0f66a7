"""The replay of torch's CPU sort (kernels.cpu_sort) against torch.sort / torch.argsort themselves."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.kernels import cpu_sort
from mergelab.methods import mergekit_sparsify as MS
from tests.test_methods import mk_magnitude, mk_outliers


def _torch_slice(keys: np.ndarray, lo: int, hi: int) -> np.ndarray:
    mask = np.zeros(len(keys), dtype=bool)
    mask[torch.sort(torch.from_numpy(keys)).indices[lo:hi].numpy()] = True
    return mask


def test_the_replay_matches_this_torch():
    assert cpu_sort.torch_sort_matches()


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 3000), levels=st.integers(1, 40), seed=st.integers(0, 2 ** 32 - 1),
       lo_frac=st.floats(0, 1), hi_frac=st.floats(0, 1))
def test_slice_members_are_torch_sorts(n, levels, seed, lo_frac, hi_frac):
    rng = np.random.default_rng(seed)
    keys = rng.integers(-levels, levels + 1, n).astype(np.float32) / np.float32(4)
    lo, hi = sorted((int(lo_frac * n), int(hi_frac * n)))
    before = keys.copy()
    assert np.array_equal(cpu_sort.sort_slice_mask(keys, lo, hi), _torch_slice(keys, lo, hi))
    assert np.array_equal(keys, before)                 # the input is left alone


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 3000), levels=st.integers(1, 40), seed=st.integers(0, 2 ** 32 - 1),
       lo_frac=st.floats(0, 1), hi_frac=st.floats(0, 1), scan=st.sampled_from([1, 2, 3, 7, 64, 1000]))
def test_scans_in_small_chunks_give_torch_sorts(n, levels, seed, lo_frac, hi_frac, scan):
    """The partition's two scans meet chunk by chunk: chunks of any size (one entry too) give the same swaps."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(-levels, levels + 1, n).astype(np.float32) / np.float32(4)
    lo, hi = sorted((int(lo_frac * n), int(hi_frac * n)))
    before = cpu_sort._SCAN
    cpu_sort._SCAN = scan
    try:
        got = cpu_sort.sort_slice_mask(keys, lo, hi)
    finally:
        cpu_sort._SCAN = before
    assert np.array_equal(got, _torch_slice(keys, lo, hi))


@pytest.mark.parametrize("n,levels", [(300_001, 9), (1_000_000, 5000), (1_000_000, None)])
def test_large_tied_arrays_and_float32_deltas(n, levels):
    rng = np.random.default_rng(n)
    if levels is None:      # ft - base in float32: multiples of the base's ulp, ties at any cut
        base = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
        keys = np.abs((base + rng.standard_normal(n).astype(np.float32) * np.float32(1e-4)) - base)
    else:
        keys = rng.integers(0, levels, n).astype(np.float32)
    k = n // 5
    expected = np.zeros(n, dtype=bool)
    expected[torch.argsort(torch.from_numpy(keys), descending=True)[:k].numpy()] = True
    assert np.array_equal(cpu_sort.sort_slice_mask(-keys, 0, k), expected)
    assert np.array_equal(cpu_sort.sort_slice_mask(keys, n // 7, n - n // 3), _torch_slice(keys, n // 7, n - n // 3))


def test_the_heapsort_depth_is_not_replayed():
    keys = np.zeros(100, dtype=np.float32)
    assert cpu_sort.sort_slice_mask(keys, 10, 20, depth=0) is None
    assert np.array_equal(cpu_sort.sort_slice_mask(keys, 10, 20, depth=3), _torch_slice(keys, 10, 20))


def _tied_delta(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-6, 7, shape, generator=g).float() / 8


def test_sparsifiers_replay_instead_of_sorting(monkeypatch):
    delta = _tied_delta((300, 200))
    expected = mk_magnitude(delta, 0.3), mk_outliers(delta, 0.4, 0.05)

    def no_sort(*args, **kwargs):
        raise AssertionError("sorted")
    monkeypatch.setattr(torch, "argsort", no_sort)
    monkeypatch.setattr(torch, "sort", no_sort)
    assert torch.equal(MS.magnitude(delta, 0.3), expected[0])       # -0.0 where negative entries are dropped too
    assert torch.equal(MS.magnitude_outliers(delta, 0.4, 0.05), expected[1])


def test_sparsifiers_sort_when_the_replay_does_not_apply(monkeypatch):
    delta = _tied_delta((50, 40), seed=1)
    delta[3, 4] = float("nan")
    out = MS.magnitude(delta, 0.3)
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(mk_magnitude(delta, 0.3)))
    monkeypatch.setattr(cpu_sort, "torch_sort_matches", lambda: False)      # a torch whose sort differs
    monkeypatch.setattr(cpu_sort, "sort_slice_mask", lambda *a, **k: pytest.fail("replayed"))
    delta = _tied_delta((50, 40), seed=2)
    assert torch.equal(MS.magnitude_outliers(delta, 0.4, 0.1), mk_outliers(delta, 0.4, 0.1))


@pytest.mark.parametrize("seed", range(4))
def test_the_selections_counts_say_what_a_pass_says(seed):
    from mergelab import kernels as K
    delta = _tied_delta((400, 400), seed) * (torch.rand(400, 400, generator=torch.Generator().manual_seed(seed)) + 1)
    if seed % 2:
        delta = _tied_delta((400, 400), seed)          # few distinct magnitudes: ties straddle every cut
    mag = delta.abs()
    n = delta.numel()
    for density in (0.1, 0.3, 0.5):
        kept = max(1, int(density * n))
        found = K.kth_smallest_counted(mag, n - kept + 1)
        assert MS.straddles(delta, found[0], None, kept, [found[1:]]) == MS.straddles(delta, found[0], None, kept)
        n_bot = n - kept - int(0.05 * n)
        low, high = K.kth_smallest_counted(mag, n_bot + 1), K.kth_smallest_counted(mag, n_bot + kept)
        assert MS.straddles(delta, low[0], high[0], kept, [low[1:], high[1:]]) == \
            MS.straddles(delta, low[0], high[0], kept)
        assert MS.straddles(delta, None, high[0], n_bot + kept, [None, high[1:]]) == \
            MS.straddles(delta, None, high[0], n_bot + kept)
    assert MS.straddles(_tied_delta((400, 400), 1), 0.25, None, 1000, [(0, 0)]) is True    # counts answer, not a pass
