"""SVD kernels for data-free merges of 2-D weight matrices: TSV-M, Iso-C, Iso-CTS.

Pure functions on float32 (or float64) tensors, no I/O. They follow the authors' code (ALGORITHMS.md
7.5 / 7.6: ``TSVM_utils.compute_and_sum_svd_mem_reduction``, ``iso.py``) with one deterministic rule
the papers leave open: singular triplets whose value is numerically zero (below
``max(m, n) * eps * s_max``, numpy's rank tolerance) are never used, because their vectors are
arbitrary (LAPACK picks any basis of the null space). For the full-rank deltas of full fine-tunes
nothing changes; for rank-deficient inputs (dense deltas of LoRA adapters) the result stays well
defined instead of depending on that arbitrary basis.

SVD backends (``svd=``): ``full`` is ``torch.linalg.svd``. ``randomized`` is Halko et al.'s range
finder with power iterations (the algorithm of ``torch.svd_lowrank``, with a seeded generator so that
merges are reproducible), approximate for the top-k of a full-rank matrix. ``auto`` (default) uses the
randomized factorisation only where it is exact: it probes with ``q`` columns, and if the matrix turns
out to have numerical rank below ``q`` (e.g. a sum of LoRA deltas) its whole range was captured and the
factorisation is exact to rounding; otherwise it falls back to the full SVD.
"""

from __future__ import annotations

import torch

SVD_MODES = ("auto", "full", "randomized")


# ---------------------------------------------------------------- SVD helpers

def rank_tolerance(s: torch.Tensor, shape: tuple[int, ...]) -> float:
    """numpy's ``matrix_rank`` tolerance: singular values at or below it are numerically zero."""
    if s.numel() == 0:
        return 0.0
    return float(s.max()) * max(shape) * torch.finfo(s.dtype).eps


def _randomized(matrix: torch.Tensor, q: int, niter: int, generator: torch.Generator | None):
    """Randomized SVD (Halko, Martinsson & Tropp 2011, alg. 4.4 + 5.1) of rank ``q``; deterministic."""
    m, n = matrix.shape
    omega = torch.randn(n, q, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = torch.linalg.qr(matrix @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return basis @ u_small, s, vh


def svd(matrix: torch.Tensor, k: int | None = None, mode: str = "auto", *, niter: int = 4,
        oversample: int = 10, generator: torch.Generator | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets (all if ``k`` is None) of a 2-D matrix, without zero triplets.

    Returns ``U [m, j]``, ``S [j]`` (descending), ``Vh [j, n]`` with ``j <= k`` the number of
    numerically non-zero singular values among the top ``k``.
    """
    if mode not in SVD_MODES:
        raise ValueError(f"unknown svd mode {mode!r}")
    m, n = matrix.shape
    r = min(m, n)
    k = r if k is None else max(0, min(k, r))
    if k == 0 or r == 0 or not bool(matrix.any()):
        return matrix.new_zeros(m, 0), matrix.new_zeros(0), matrix.new_zeros(0, n)
    u = s = vh = None
    if mode == "randomized" and k + oversample < r:
        u, s, vh = _randomized(matrix, k + oversample, niter, generator)
    elif mode == "auto" and r >= 64:
        q = max(8, r // 8)
        if q < r:
            pu, ps, pvh = _randomized(matrix, q, 1, generator)
            # the probe's range holds the whole matrix (numerical rank < q): the factorisation is exact
            residual = torch.linalg.matrix_norm(matrix - (pu * ps) @ pvh)
            if float(residual) <= max(m, n) * torch.finfo(matrix.dtype).eps * float(torch.linalg.matrix_norm(matrix)):
                u, s, vh = pu, ps, pvh
    if u is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = min(k, int((s > rank_tolerance(s, matrix.shape)).sum()))
    return u[:, :keep], s[:keep], vh[:keep]


def factored_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``scale * b @ a`` (b: [m, r], a: [r, n]) in O((m + n) r^2), never forming the product.

    Exact: thin QR of both factors, SVD of the small r x r core. This is how a LoRA delta is factored
    (SMILE experts, merged adapters) without a dense SVD.
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.mT)
    uc, s, vhc = torch.linalg.svd(scale * (rb @ ra.mT), full_matrices=False)
    keep = int((s > rank_tolerance(s, (b.shape[0], a.shape[1]))).sum())
    return (qb @ uc)[:, :keep], s[:keep], (vhc @ qa.mT)[:keep]


def procrustes(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows, if wide): ``P Q`` of ``svd(matrix) = P S Q``."""
    if matrix.numel() == 0:
        return matrix.clone()
    p, _, q = torch.linalg.svd(matrix, full_matrices=False)
    return p @ q


# ---------------------------------------------------------------- TSV-M

def tsv_rank(shape: tuple[int, int], tasks: int) -> int:
    """Rank each task keeps: the authors' ``int(r * (1 / T))`` with r = min(shape)."""
    return int(min(shape) * (1 / tasks))


def tsv_merge(deltas: list[torch.Tensor], svd_mode: str = "auto", generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Task Singular Vectors merge of T task matrices (Gargiulo et al. CVPR 2025), before alpha.

    Each task keeps its top ``k = int(r / T)`` singular triplets; the concatenated left and right
    singular vectors are orthogonalised by Procrustes (``P Q`` of their SVD) and recombined with the
    concatenated singular values: ``tau = (P_u Q_u) diag(S_cat) (P_v Q_v)``.
    """
    first = deltas[0]
    if first.dim() != 2:
        raise ValueError("tsv_merge needs 2-D matrices")
    k = tsv_rank(tuple(first.shape), len(deltas))
    us, ss, vs = [], [], []
    for delta in deltas:
        u, s, vh = svd(delta, k, svd_mode, generator=generator)
        us.append(u)
        ss.append(s)
        vs.append(vh)
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return torch.zeros_like(first)
    u_orth = procrustes(torch.cat(us, dim=1))
    v_orth = procrustes(torch.cat(vs, dim=0))
    return (u_orth * s_cat) @ v_orth


# ---------------------------------------------------------------- Iso-C / Iso-CTS

def iso_c(deltas: list[torch.Tensor], svd_mode: str = "auto", generator: torch.Generator | None = None
          ) -> torch.Tensor:
    """Iso-C (Marczak et al. ICML 2025), before alpha: flatten the spectrum of the summed task matrix.

    ``M = sum_t tau_t = U S Vh``  ->  ``U diag(mean(S)) Vh``.
    """
    total = torch.stack(deltas).sum(dim=0)
    u, s, vh = svd(total, None, svd_mode, generator=generator)
    if s.numel() == 0:
        return torch.zeros_like(total)
    return (u * s.mean()) @ vh


def iso_cts_split(r: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common rank k_c, rank per task) of Iso-CTS: the task-specific part divides evenly by T."""
    common = int(r * common_space_fraction)
    specific_total = round((r - common) / tasks) * tasks
    common = r - specific_total
    return common, int((r - common) / tasks)


def iso_cts(deltas: list[torch.Tensor], common_space_fraction: float = 0.8, svd_mode: str = "auto",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Iso-CTS, before alpha: common subspace of the sum + task-specific subspaces, isotropic spectrum.

    The top ``k_c`` singular triplets of ``M = sum_t tau_t`` span the common space; each task adds the
    top ``(r - k_c) / T`` triplets of its residual ``tau_t - U_c U_c^T tau_t``; left and right vectors
    are orthogonalised by Procrustes and every direction gets the mean singular value. ``r`` is the
    numerical rank of ``M`` (``min(shape)`` for full fine-tunes, as in the paper).
    """
    total = torch.stack(deltas).sum(dim=0)
    u, s, vh = svd(total, None, svd_mode, generator=generator)
    r = s.numel()
    if r == 0:
        return torch.zeros_like(total)
    common, per_task = iso_cts_split(r, len(deltas), common_space_fraction)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    us, ss, vs = [], [], []
    for delta in deltas:
        residual = delta - u_c @ (u_c.mT @ delta)
        ut, st, vht = svd(residual, per_task, svd_mode, generator=generator)
        us.append(ut)
        ss.append(st)
        vs.append(vht)
    u_all = procrustes(torch.cat([*us, u_c], dim=1))
    vh_all = procrustes(torch.cat([*vs, vh_c], dim=0))
    s_mean = torch.cat([*ss, s_c]).mean()
    return (u_all * s_mean) @ vh_all
