"""Kernels against the hand-computed examples of ALGORITHMS.md section 12 and edge cases."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab import kernels as K

TV = torch.tensor([[0.9, -0.1, 0.3, -0.6, 0.05],
                   [-0.4, 0.2, 0.8, 0.7, -0.02],
                   [0.5, -0.3, -0.1, 0.2, 0.01]])


def ties_global(tv, k, mode):
    trimmed = torch.stack([K.ties_trim(row, k) for row in tv])
    sign = K.elect_sign(trimmed)
    return trimmed, sign, K.disjoint_merge(trimmed, sign, mode)


def test_ties_worked_example_k04():
    trimmed, sign, mean = ties_global(TV, 0.4, "mean")
    assert torch.equal(trimmed, torch.tensor([[0.9, 0, 0.3, -0.6, 0], [-0.4, 0, 0.8, 0.7, 0],
                                              [0.5, -0.3, 0, 0.2, 0]]))
    assert sign.tolist() == [1, -1, 1, 1, 1]
    assert torch.allclose(mean, torch.tensor([0.7, -0.3, 0.55, 0.45, 0.0]))
    assert torch.allclose(ties_global(TV, 0.4, "sum")[2], torch.tensor([1.4, -0.3, 1.1, 0.9, 0.0]))


def test_ties_worked_example_k06():
    assert torch.allclose(ties_global(TV, 0.6, "mean")[2], torch.tensor([0.7, -0.2, 0.55, 0.45, 0.0]))
    assert torch.allclose(ties_global(TV, 0.6, "sum")[2], torch.tensor([1.4, -0.4, 1.1, 0.9, 0.0]))


def test_ties_max_mode():
    _, sign, out = ties_global(TV, 0.4, "max")
    assert torch.allclose(out, torch.tensor([0.9, -0.3, 0.8, 0.7, 0.0]))


def test_ties_trim_density_edges():
    x = torch.tensor([0.3, -0.2, 0.1])
    assert torch.equal(K.ties_trim(x, 1.0), x)
    assert torch.equal(K.ties_trim(x, 0.0), torch.zeros(3))
    one = torch.tensor([-0.5])
    assert torch.equal(K.ties_trim(one, 0.2), one)           # 1 element: kthvalue(1) keeps it
    assert torch.equal(K.ties_trim(torch.zeros(4), 0.5), torch.zeros(4))


def test_ties_trim_keeps_ties_at_threshold():
    x = torch.tensor([0.5, -0.5, 0.5, 0.1])
    # k_small = 4 - int(4*0.25) = 3 -> threshold 0.5: all three tied magnitudes kept
    assert torch.equal(K.ties_trim(x, 0.25), torch.tensor([0.5, -0.5, 0.5, 0.0]))


def test_elect_sign_zero_takes_majority_and_positive():
    stacked = torch.tensor([[0.5, 0.2, -0.1], [-0.5, 0.3, 0.4]])
    # column 0 sums to 0 -> majority of elected signs (+1, +1) = +1
    assert K.elect_sign(stacked).tolist() == [1, 1, 1]
    neg = torch.tensor([[0.5, -0.2, -0.1], [-0.5, -0.3, -0.4]])
    assert K.elect_sign(neg).tolist() == [-1, -1, -1]
    assert K.elect_sign(neg, zero="positive").tolist() == [1, -1, -1]


def test_disjoint_mean_all_zero_is_zero():
    z = torch.zeros(3, 4)
    assert torch.equal(K.disjoint_merge(z, K.elect_sign(z), "mean"), torch.zeros(4))


def test_breadcrumbs_worked_example():
    W = torch.tensor([[0.9, -0.1, 0.3, -0.6], [-0.4, 0.2, 0.8, 0.05]])
    out = K.breadcrumbs_rows(W, keep=0.5, top_remove=0.25)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.3, -0.6], [-0.4, 0.2, 0.0, 0.0]]))


def test_breadcrumbs_edges():
    x = torch.tensor(0.7)
    assert torch.equal(K.breadcrumbs_rows(x, 0.1, 0.01), x)            # 0-D untouched
    v = torch.arange(1.0, 11.0)
    assert torch.equal(K.breadcrumbs_rows(v, 1.0, 0.0), v)             # keep all
    assert torch.equal(K.breadcrumbs_rows(v, 0.0, 0.0), torch.zeros(10))
    assert torch.equal(K.breadcrumbs_rows(v, 0.3, 0.2), torch.tensor([0, 0, 0, 0, 0, 6, 7, 8, 0, 0.0]))


def test_magnitude_band_matches_mergekit_slice():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 13, generator=g)
    n = x.numel()
    for density, gamma in [(0.3, 0.05), (0.9, 0.2), (0.5, 0.0), (0.01, 0.01)]:
        target, n_top = int(density * n), int(gamma * n)
        n_bot = max(0, n - target - n_top)
        idx = torch.sort(x.abs().reshape(-1)).indices[n_bot:n_bot + target]
        mask = torch.zeros(n)
        mask[idx] = 1
        assert torch.equal(K.magnitude_band(x, density, gamma), x * mask.reshape(x.shape))


def test_topk_exact_matches_argsort():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(11, 5, generator=g)
    for density in (0.01, 0.2, 0.5, 0.99):
        k = max(1, int(density * x.numel()))
        mask = torch.zeros(x.numel())
        mask[torch.argsort(x.abs().reshape(-1), descending=True)[:k]] = 1
        assert torch.equal(K.topk_exact(x, density), x * mask.reshape(x.shape))
    assert torch.equal(K.topk_exact(x, 0.0), torch.zeros_like(x))


def test_dare_rescales_and_is_seeded():
    x = torch.ones(10000)
    a = K.dare(x, 0.3, torch.Generator().manual_seed(5))
    b = K.dare(x, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    kept = a != 0
    assert torch.allclose(a[kept], torch.full_like(a[kept], 1 / 0.7))
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    assert torch.equal(K.dare(x, 0.0), x) and torch.equal(K.dare(x, 1.0), torch.zeros_like(x))
    l1 = K.dare(x, 0.5, torch.Generator().manual_seed(1), rescale="l1")
    assert torch.isclose(l1.abs().sum(), x.abs().sum())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_integer_masks_keep_the_statistics(p):
    """Masks from integer bits: kept fraction, the joint keeps of neighbours (two draws share one 64-bit
    word), the expectation under 1/(1-p) and the L1 norm under mergekit's rescale, within 5 sigma."""
    n = 1 << 20
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    out = K.dare(x, p, torch.Generator().manual_seed(7))
    kept = out != 0
    q = 1 - p
    sigma = (q * (1 - q) / n) ** 0.5
    assert abs(kept.float().mean().item() - q) < 5 * sigma
    both = (kept[0::2] & kept[1::2]).float().mean().item()     # neighbours are independent
    assert abs(both - q * q) < 5 * (q * q * (1 - q * q) / (n // 2)) ** 0.5
    assert torch.equal(out[kept], x[kept] / q)                   # survivors exactly rescaled by 1/(1-p)
    ones = K.dare(torch.ones(n), p, torch.Generator().manual_seed(8))
    assert abs(ones.mean().item() - 1.0) < 5 * sigma / q          # unbiased
    l1 = K.dare(x, p, torch.Generator().manual_seed(9), rescale="l1")
    torch.testing.assert_close(l1.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)


def test_dare_masks_are_seeded_in_place_and_dtype_independent():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 17, generator=g)
    a = K.dare(x, 0.4, torch.Generator().manual_seed(1), rescale="none")
    assert torch.equal(a, K.dare(x, 0.4, torch.Generator().manual_seed(1), rescale="none"))
    assert not torch.equal(a, K.dare(x, 0.4, torch.Generator().manual_seed(2), rescale="none"))
    own = x.clone()
    b = K.dare(own, 0.4, torch.Generator().manual_seed(1), rescale="none", inplace=True)
    assert b.data_ptr() == own.data_ptr() and torch.equal(b, a)
    assert not torch.equal(x, a)                                 # not in place: the input is untouched
    # the same entries drop for float64, bfloat16 and non-contiguous inputs (the fallback mask path)
    keep = a != 0
    for y in (x.double(), x.bfloat16(), x.t().contiguous().t()):
        z = K.dare(y, 0.4, torch.Generator().manual_seed(1), rescale="none")
        assert torch.equal(z != 0, keep) and z.dtype == y.dtype
    # a default generator follows torch.manual_seed
    torch.manual_seed(5)
    c = K.dare(x, 0.4)
    torch.manual_seed(5)
    assert torch.equal(c, K.dare(x, 0.4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dare_on_cuda_is_bit_identical_to_cpu():
    x = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0))
    for rescale in ("inverse", "l1", "none"):
        cpu = K.dare(x, 0.3, torch.Generator().manual_seed(4), rescale=rescale)
        gpu = K.dare(x.cuda(), 0.3, torch.Generator().manual_seed(4), rescale=rescale)
        assert torch.equal(cpu != 0, gpu.cpu() != 0)
        torch.testing.assert_close(cpu, gpu.cpu(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n,cos,expected", [(2, 0.5, 2 / 3), (2, 0.2, 1 / 3), (8, 0.2, 2 / 3)])
def test_model_stock_t_worked_examples(n, cos, expected):
    # build n unit deltas with pairwise cosine `cos`: common part sqrt(cos) + orthogonal parts
    d = n + 1
    deltas = []
    for i in range(n):
        v = torch.zeros(d, dtype=torch.float64)
        v[0] = cos ** 0.5
        v[i + 1] = (1 - cos) ** 0.5
        deltas.append(v)
    base = torch.zeros(d, dtype=torch.float64)
    out = K.model_stock(base, [base + v for v in deltas])
    average = sum(deltas) / n
    assert torch.allclose(out, expected * average, atol=1e-9)


def test_radix_select_equals_kthvalue():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(37, 11, generator=g) * 10 ** i for i in range(-3, 2)]
    tensors.append(torch.zeros(20))
    tensors.append(torch.tensor([1e-30, -1e30]))
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    for k in (1, 2, 100, flat.numel() // 2, flat.numel() - 1, flat.numel()):
        sel = K.RadixSelect(k)
        for t in tensors:
            sel.add_high(t)
        sel.finish_high()
        for t in tensors:
            sel.add_low(t)
        assert sel.finish_low() == torch.kthvalue(flat, k).values.item()


def test_band_select_is_exact_or_says_it_missed():
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(500, generator=g).abs(), torch.zeros(100), torch.randn(3, 77, generator=g).abs()]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    values = flat.sort().values
    n = flat.numel()
    for k in (1, 101, 400, n - 3, n):
        truth = torch.kthvalue(flat, k).values.item()
        lo, hi = values[max(0, k - 30)].item(), values[min(n - 1, k + 30)].item()
        sel = K.BandSelect(k, lo, hi)
        for t in tensors:
            sel.add(part=sel.part(t))            # what worker threads do
        assert sel.finish() == truth, k
        assert sel.kept < n or k in (1, 101)     # only the bracket is kept (the 100 zeros tie at k=1, 101)
        sample = values[::7].numpy()
        sel = K.BandSelect(k, *K.sample_bracket(sample, k, n))
        for t in tensors:
            sel.add(t)
        assert sel.finish() == truth, k
    k = n // 2
    above = K.BandSelect(k, values[k + 5].item(), values[-1].item())     # bracket misses: None, not a guess
    below = K.BandSelect(k, 0.0, values[k - 5].item())
    capped = K.BandSelect(k, 0.0, values[-1].item(), max_kept=10)       # holds too many values: gives up
    for sel in (above, below, capped):
        for t in tensors:
            sel.add(t)
        assert sel.finish() is None
    assert capped.parts == []


@pytest.mark.parametrize("dist", ["normal", "sparse", "ties"])
def test_kth_smallest_sampled_path_is_exact(dist):
    g = torch.Generator().manual_seed(9)
    n = 300_000
    if dist == "normal":
        x = torch.randn(n, generator=g).abs()
    elif dist == "sparse":
        x = torch.randn(n, generator=g).abs() * (torch.rand(n, generator=g) < 0.05)
    else:
        x = torch.randint(0, 5, (n,), generator=g).float()
    for k in (1, 2, 1000, n // 5, n // 2, n - 7, n):
        assert K.kth_smallest(x, k).item() == torch.kthvalue(x, k).values.item(), (dist, k)
        for values in (x, x[:5000]):                 # the band's counts and the small-tensor path's
            value, below, at_most = K.kth_smallest_counted(values, min(k, values.numel()))
            assert value == torch.kthvalue(values, min(k, values.numel())).values.item()
            assert (below, at_most) == (int((values < value).sum()), int((values <= value).sum())), (dist, k)


def test_disjoint_merge_zero_majority_follows_ties_code():
    # every coordinate cancels exactly: elected signs are all 0 and their sum is 0, so the TIES code
    # keeps the negative entries for mean/sum and gives 0 for max
    stacked = torch.tensor([[0.5, -0.2], [-0.5, 0.2]])
    sign = K.elect_sign(stacked)
    assert sign.tolist() == [0, 0]
    assert torch.equal(K.disjoint_merge(stacked, sign, "mean"), torch.tensor([-0.5, -0.2]))
    assert torch.equal(K.disjoint_merge(stacked, sign, "sum"), torch.tensor([-0.5, -0.2]))
    assert K.disjoint_merge(stacked, sign, "max").tolist() == [0.0, 0.0]


def test_kth_smallest_counted_when_the_sampled_band_misses(monkeypatch):
    """The counts come from a full pass when the sample's bracket misses the rank (a forced miss)."""
    from mergelab.kernels import band_select
    x = torch.randint(0, 7, (300_000,), generator=torch.Generator().manual_seed(4)).float()
    monkeypatch.setattr(band_select, "sample_bracket", lambda sample, k, n, slack=4.0: (100.0, 101.0))   # holds nothing
    for k in (1, 1000, 150_000, 300_000):
        value, below, at_most = K.kth_smallest_counted(x, k)
        assert value == torch.kthvalue(x, k).values.item()
        assert (below, at_most) == (int((x < value).sum()), int((x <= value).sum()))


def test_band_select_counts_in_torch_for_other_dtypes():
    """Half precision (and GPU tensors) keep their band as torch tensors: the counts are the same."""
    x = torch.randint(0, 9, (5000,), generator=torch.Generator().manual_seed(5)).to(torch.float16)
    for k in (1, 2500, 5000):
        sel = K.BandSelect(k, 2.0, 6.0)
        for part in x.split(1000):
            sel.add(part)
        found = sel.finish_counted()
        value = torch.kthvalue(x.float(), k).values.item()
        if not 2.0 <= value <= 6.0:
            assert found is None
            continue
        assert found == (value, int((x < value).sum()), int((x <= value).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (33, 65), (3, 1000)])
@pytest.mark.parametrize("n_models,weights,normalize,lam", [
    (1, None, False, 1.0), (2, [1.0, 0.5], True, 0.3), (3, None, False, 0.5), (3, [0.25, 1.0, 3.0], True, 1.0),
    (4, [2.0, -1.0, 0.5, 1.0], False, 0.7), (4, [1.0, 1.0, -2.0, 1.0], True, 1.0),   # weights summing to 0
])
def test_fused_task_arithmetic_is_bit_identical_to_mergekits_passes(dtype, shape, n_models, weights, normalize, lam):
    """Chunk by chunk (chunks far smaller than the tensor here) gives the same bits as mergekit's whole-tensor
    order of operations: stacked task vectors, times the weights, summed, divided, scaled, plus the base."""
    from mergelab.methods.common import _mergekit_mix
    from mergelab.methods.registry import TensorJob
    g = torch.Generator().manual_seed(len(shape) * 10 + n_models)
    base = torch.randn(shape, generator=g, dtype=dtype)
    models = [base + torch.randn(shape, generator=g, dtype=dtype) / 7 for _ in range(n_models)]
    w = weights or [1.0] * n_models
    params = {"lambda": lam, "normalize": normalize}
    job = TensorJob("t", base, models, params, [{"weight": x} for x in w], "mergekit",
                    stacked=K.task_vectors(base, models))
    reference = _mergekit_mix(job, lambda delta, p, i: delta, consensus=False)
    divisor = None
    if normalize:
        divisor = torch.tensor(w, dtype=dtype).sum()
        divisor = torch.ones_like(divisor) if divisor.abs() < 1e-8 else divisor
    for chunk in (64, 96, 1 << 17):
        out, finite = K.fused_task_arithmetic(base, models, None if weights is None else torch.tensor(w, dtype=dtype),
                                              lam, divisor, chunk=chunk)
        assert out.shape == reference.shape and out.dtype == dtype
        assert torch.equal(out, reference) and finite
        assert out.numel() == 0 or all(m.data_ptr() != out.data_ptr() for m in models)


def test_fused_kernels_report_a_non_finite_result():
    base, model = torch.zeros(300), torch.ones(300)
    model[250] = float("nan")
    assert not K.fused_task_arithmetic(base, [model], None, 0.0, chunk=64)[1]        # NaN * 0 is NaN
    assert not K.fused_linear_combination([base, model], [1.0, 0.0], chunk=64)[1]
    model[250] = 3e38
    assert not K.fused_task_arithmetic(base, [model, model], None, 1.0, chunk=64)[1]  # an overflow shows too
    assert K.fused_task_arithmetic(base, [torch.ones(300)], None, 1.0, chunk=64)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_linear_combination_chunks_change_no_bit(dtype):
    """``add_`` with ``alpha`` may be a fused multiply-add: the same code path per element whatever the chunk."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(1000003, generator=g).to(dtype) for _ in range(3)]
    coefficients = [0.3, 0.7123, -0.01]
    whole = torch.mul(tensors[0].to(torch.float32), coefficients[0])
    for t, c in zip(tensors[1:], coefficients[1:]):
        whole.add_(t, alpha=c)
    for chunk in (4096, 1 << 17, 1 << 21):
        out, finite = K.fused_linear_combination(tensors, coefficients, chunk=chunk)
        assert out.dtype == torch.float32 and torch.equal(out, whole) and finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.7, -2.5])
def test_kth_smallest_magnitude_counted_is_that_of_the_magnitudes(monkeypatch, dtype, scale):
    """Magnitudes formed chunk by chunk give the value and counts of ``kth_smallest_counted(|scale * x|)``:
    tied float deltas and continuous ones, ranks at both ends, sizes under and over a chunk and under the
    sampled path's threshold, and a sampled bracket that misses (the full fallback)."""
    from mergelab.kernels import band_select
    g = torch.Generator().manual_seed(11)
    cases = [torch.randn(300_001, generator=g) * 0.002,
             torch.randint(-20, 21, (200_000,), generator=g).float() / 64,       # ties everywhere
             torch.randn(1000, generator=g)]                                      # small: the torch path
    for x in cases:
        x = x.to(dtype)
        mag = (x * scale).abs_() if scale != 1.0 else x.abs()
        n = x.numel()
        for k in (1, n // 5, n - n // 5, n):
            assert K.kth_smallest_magnitude_counted(x, k, scale) == K.kth_smallest_counted(mag, k), (n, k)
    x = cases[0].to(dtype)
    mag = (x * scale).abs_() if scale != 1.0 else x.abs()
    monkeypatch.setattr(band_select, "sample_bracket", lambda sample, k, n, slack=4.0: (5.0, 6.0))    # holds nothing
    assert K.kth_smallest_magnitude_counted(x, 1234, scale) == K.kth_smallest_counted(mag, 1234)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 200_000), spread=st.integers(-3, 3), rounded=st.booleans(), special=st.booleans(),
       picks=st.tuples(st.integers(0, 5), st.integers(0, 5)), seed=st.integers(0, 2**16))
def test_band_of_float32_magnitudes_on_bit_patterns(n, spread, rounded, special, picks, seed):
    """The bracket tested on ``|a|``'s bit patterns (``band_select``) counts and keeps what the float compares
    keep: NaN, Inf, -0, ties and brackets that are open, empty or at the extremes."""
    from mergelab.kernels import band_select
    g = np.random.default_rng(seed)
    a = (g.standard_normal(n) * 10.0 ** spread).astype(np.float32)
    if rounded:
        a = np.round(a * 4) / np.float32(4)
    if special:
        a[g.integers(0, n, 3)] = np.nan
        a[g.integers(0, n, 2)] = -np.inf
        a[g.random(n) < 0.2] = -0.0
    finite = np.sort(np.abs(a[np.isfinite(a)])) if np.isfinite(a).any() else np.zeros(1, np.float32)
    limits = [-np.inf, 0.0, float(finite[len(finite) // 3]), float(finite[-1]), np.inf, -1.0]
    lo, hi = sorted((limits[picks[0]], limits[picks[1]]))
    band = band_select.BandSelect(1, lo, hi)
    below, inside = band.part_of_magnitudes(a)
    m = np.abs(a)
    assert below == int(np.count_nonzero(m < lo))
    assert np.array_equal(inside.view(np.uint32), m[(m >= lo) & (m <= hi)].view(np.uint32))
