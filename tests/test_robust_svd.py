"""Robust SVD (issue 21, item 1): every SVD of the project survives a LAPACK convergence failure.

LAPACK's ``gesdd`` failing on a float32 matrix cannot be provoked on demand (it depends on the matrix, the
MKL build and the thread count), so the failure is injected where LAPACK reports it: ``torch.linalg.svd``
raises ``LinAlgError`` with LAPACK's message. The matrices themselves are the hard kinds (rank-deficient,
badly conditioned, repeated singular values), factorised with 1 and 2 threads.
"""

import functools

import pytest
import torch

from mergelab.kernels import svd as SK
from mergelab.upscale.smile import smile_linear_from_weights, truncated_svd

LAPACK_MESSAGE = ("linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned "
                  "or has too many repeated singular values (error code: 383).")
REAL_SVD = torch.linalg.svd


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _with_spectrum(m, n, s, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return ((u * torch.as_tensor(s, dtype=torch.float64)) @ v.T).float()


@functools.lru_cache(maxsize=1)
def hard_matrices():
    """name -> float32 matrix: the kinds LAPACK struggles with."""
    g = torch.Generator().manual_seed(0)
    r383 = (torch.randn(384, 383, generator=g) @ torch.randn(383, 384, generator=g)) * 1e-3  # rank 383 of 384
    return {
        "rank 383 of 384": r383,
        "rank 5, wide": _with_spectrum(40, 96, torch.linspace(3, 1, 5), 1),
        "rank 5, tall": _with_spectrum(96, 40, torch.linspace(3, 1, 5), 2),
        "condition 1e12": _with_spectrum(64, 64, torch.logspace(0, -12, 64), 3),
        "repeated values": _with_spectrum(64, 48, torch.cat([torch.ones(40), torch.full((8,), 1e-7)]), 4),
    }


def _fail_float32(matrix, *args, **kwargs):
    if matrix.dtype == torch.float32:
        raise torch.linalg.LinAlgError(LAPACK_MESSAGE)
    return REAL_SVD(matrix, *args, **kwargs)


def _fail_always(matrix, *args, **kwargs):
    raise torch.linalg.LinAlgError(LAPACK_MESSAGE)


@functools.lru_cache(maxsize=None)
def _reference(name):
    """float64 singular values of a hard matrix (computed once, before any failure is injected)."""
    return torch.linalg.svdvals(hard_matrices()[name].double())


def _check_factorisation(a, u, s, vh, atol, ref):
    a64 = a.double()
    k = s.numel()
    assert u.dtype == s.dtype == vh.dtype == a.dtype
    assert torch.all(s[:-1] >= s[1:]), "singular values must be descending"
    torch.testing.assert_close(s.double(), ref[:k], atol=atol * float(ref[0]), rtol=1e-4)
    torch.testing.assert_close((u.double() * s.double()) @ vh.double(), a64, atol=atol * float(ref[0]), rtol=0)
    nz = int((ref > 1e-6 * ref[0]).sum())  # vectors of non-zero singular values are orthonormal
    eye = torch.eye(nz, dtype=torch.float64)
    torch.testing.assert_close(u[:, :nz].double().T @ u[:, :nz].double(), eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(vh[:nz].double() @ vh[:nz].double().T, eye, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(hard_matrices()))
@pytest.mark.parametrize("failure", [None, _fail_float32, _fail_always], ids=["lapack-ok", "float32-fails",
                                                                              "every-svd-fails"])
def test_robust_svd_on_hard_matrices(threads, monkeypatch, name, failure):
    a = hard_matrices()[name]
    ref = _reference(name)
    if failure is not None:
        monkeypatch.setattr(torch.linalg, "svd", failure)
        with pytest.raises(torch.linalg.LinAlgError):
            torch.linalg.svd(a, full_matrices=False)
    u, s, vh = SK.robust_svd(a)
    _check_factorisation(a, u, s, vh, atol=2e-5, ref=ref)
    # the public truncated SVD drops the numerically-zero triplets whatever path was taken
    u, s, vh = SK.svd(a, None, "full")
    assert s.numel() == int((ref > max(a.shape) * torch.finfo(torch.float32).eps * ref[0]).sum())


def test_gram_svd_completes_the_basis_of_a_rank_deficient_matrix(threads):
    for a in (_with_spectrum(50, 20, [2.0, 1.0, 0.5], 5), _with_spectrum(20, 50, [2.0, 1.0, 0.5], 6)):
        u, s, vh = SK.gram_svd(a)
        assert u.shape == (a.shape[0], 20) and vh.shape == (20, a.shape[1])
        assert torch.all(s[3:] == 0)
        torch.testing.assert_close(u.T @ u, torch.eye(20), atol=1e-5, rtol=0)
        torch.testing.assert_close(vh @ vh.T, torch.eye(20), atol=1e-5, rtol=0)
        torch.testing.assert_close((u * s) @ vh, a, atol=1e-5, rtol=0)


def test_non_finite_input_is_an_error_not_a_retry():
    a = torch.ones(4, 3)
    a[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        SK.robust_svd(a)


def _deltas(seed, shape=(48, 40), rank=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        if rank is None:
            d = torch.randn(*shape, generator=g)
        else:
            d = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
        out.append(d * 0.01)
    return out


@pytest.mark.parametrize("rank", [None, 4], ids=["full-rank", "rank-4"])
def test_every_svd_method_survives_lapack_failures(threads, monkeypatch, rank):
    """TSV, Iso-C, Iso-CTS and SMILE give the same result when LAPACK fails on float32."""
    deltas = _deltas(7, rank=rank)
    w0 = torch.randn(48, 40, generator=torch.Generator().manual_seed(8))

    def run(lowrank):
        smile = smile_linear_from_weights(w0, None, [w0 + d for d in deltas], k=4, gate_k=2, svd="full")
        smile_lr = truncated_svd(deltas[0] * 100, 2, lowrank)
        return {"tsv": SK.tsv_merge(deltas, "full"), "iso_c": SK.iso_c(deltas, "full"),
                "iso_cts": SK.iso_cts(deltas, 0.8, "full"),
                "tsv_auto": SK.tsv_merge(deltas, "auto", torch.Generator().manual_seed(0)),
                "smile_experts": smile.expert_B @ smile.expert_A,
                "smile_gate": smile.gate_weight.abs(),
                "lowrank": (smile_lr[0] * smile_lr[1]) @ smile_lr[2].T}

    # a failed randomized SVD (torch.svd_lowrank) falls back to the exact one
    expected = run("full")
    for failure in (_fail_float32, _fail_always):
        monkeypatch.setattr(torch.linalg, "svd", failure)
        got = run("lowrank")
        monkeypatch.setattr(torch.linalg, "svd", REAL_SVD)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=2e-5, rtol=1e-4, msg=f"{key} ({failure.__name__})")
