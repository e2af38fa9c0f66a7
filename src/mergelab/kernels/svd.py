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

Every SVD of the project goes through ``robust_svd``: LAPACK's divide-and-conquer driver (``gesdd``,
the only CPU driver of ``torch.linalg.svd``) can fail to converge on ill-conditioned or rank-deficient
float32 matrices, and whether it does depends on the thread count. On failure the SVD is retried with
the other CUDA drivers (``gesvdj``, ``gesvd``) on a GPU, then in float64, then in float64 on the
triangular factor of a QR decomposition, and last from the eigen-decomposition of the Gram matrix
(float64 ``eigh``; its singular values below ~1e-8 s_max are inexact, which float32 results cannot
resolve anyway). The result has the input's dtype.
"""

from __future__ import annotations

import torch

SVD_MODES = ("auto", "full", "randomized")
SVD_ERRORS = (torch.linalg.LinAlgError,)



# ---------------------------------------------------------------- robust SVD

def _complete_columns(q: torch.Tensor, cols: int) -> torch.Tensor:
    """``q [m, j]`` with orthonormal columns extended to ``cols`` orthonormal columns (seeded, reproducible)."""
    m, j = q.shape
    if j >= cols:
        return q
    gen = torch.Generator(device=q.device).manual_seed(0)
    probe = torch.randn(m, cols - j, generator=gen, dtype=q.dtype, device=q.device)
    for _ in range(2):                                     # project off q twice: orthogonal to rounding
        probe = torch.linalg.qr(probe - q @ (q.mT @ probe)).Q
    return torch.cat([q, probe], dim=1)


def gram_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD from the eigen-decomposition of the smaller Gram matrix, in float64.

    The last resort of ``robust_svd``: ``eigh`` is a different algorithm (tridiagonal QR / MRRR) than
    LAPACK's SVD drivers and always converges on a symmetric matrix. Left vectors of the non-zero
    singular values are ``A V / s``, re-orthogonalised; those of zero singular values complete the basis.
    """
    wide = matrix.shape[0] < matrix.shape[1]
    a = (matrix.mT if wide else matrix).to(torch.float64)
    m, n = a.shape
    w, v = torch.linalg.eigh(a.mT @ a)
    w, v = w.flip(0), v.flip(1)                            # descending
    s = w.clamp_min(0).sqrt()
    # eigenvalues resolve singular values down to ~sqrt(eps64) s_max = 1.5e-8 s_max: below that, zero
    tol = float(s[0]) * max(max(m, n) * torch.finfo(matrix.dtype).eps, 1e-7) if n else 0.0
    nz = int((s > tol).sum())
    u_nz = (a @ v[:, :nz]) / s[:nz]
    q, r = torch.linalg.qr(u_nz)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones_like(s[:nz]))
    u = _complete_columns(q, n)
    s[nz:] = 0
    if wide:
        u, v = v, u
    return u.to(matrix.dtype), s.to(matrix.dtype), v.mT.to(matrix.dtype)


def _svd_attempts(matrix: torch.Tensor):
    """(name, thunk) pairs tried in order by ``robust_svd``."""
    yield "gesdd", lambda: torch.linalg.svd(matrix, full_matrices=False)
    if matrix.is_cuda:
        for driver in ("gesvdj", "gesvd"):
            yield driver, lambda d=driver: torch.linalg.svd(matrix, full_matrices=False, driver=d)
    wide = matrix.shape[0] < matrix.shape[1]
    if matrix.dtype != torch.float64:
        yield "float64", lambda: torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)

    def qr_first():
        a = (matrix.mT if wide else matrix).to(torch.float64)
        q, r = torch.linalg.qr(a)
        ur, s, vh = torch.linalg.svd(r, full_matrices=False)
        u = q @ ur
        return (vh.mT, s, u.mT) if wide else (u, s, vh)
    yield "float64 QR", qr_first
    yield "gram", lambda: gram_svd(matrix)


def robust_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` that does not give up when LAPACK does.

    Tries, in order: the default driver; on CUDA ``gesvdj`` and ``gesvd``; float64; float64 on the R
    of a QR decomposition; the Gram matrix's eigen-decomposition (see the module docstring). Returns
    ``(U, S, Vh)`` in the input dtype. Non-finite input raises ``ValueError`` (no SVD can help).
    """
    if matrix.numel() and not bool(torch.isfinite(matrix).all()):
        raise ValueError("SVD of a matrix with NaN or Inf entries")
    last: Exception | None = None
    for _, attempt in _svd_attempts(matrix):
        try:
            u, s, vh = attempt()
        except SVD_ERRORS as e:
            last = e
            continue
        if bool(torch.isfinite(s).all()):
            return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)
    raise last if last is not None else torch.linalg.LinAlgError("SVD failed")  # pragma: no cover


def robust_svd_lowrank(matrix: torch.Tensor, q: int, niter: int,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank(matrix, q, niter)`` -> ``(U, S, V)``; a failed factorisation falls back to
    ``robust_svd`` (exact, truncated to ``q``).

    ``torch.svd_lowrank`` draws its test matrix from the global generator, so the same matrix factorised
    after other random work came out slightly different (a SMILE row of ``mergelab bench`` depended on which
    rows ran before it). The draw is seeded here, on a forked generator: the result depends on ``seed``
    only, and the caller's random stream is left as it was."""
    try:
        u, s, v = _seeded(matrix.device, seed, lambda: torch.svd_lowrank(matrix, q=q, niter=niter))
        if bool(torch.isfinite(s).all()):
            return u, s, v
    except SVD_ERRORS:
        pass
    u, s, vh = robust_svd(matrix)
    return u[:, :q], s[:q], vh[:q].mT


def _seeded(device: torch.device, seed: int, fn):
    """``fn()`` with the generator of ``device`` seeded, restored afterwards."""
    if device.type == "cuda":
        with torch.random.fork_rng(devices=[device]), torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
            return fn()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return fn()


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
    u_small, s, vh = robust_svd(basis.mT @ matrix)
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
        u, s, vh = robust_svd(matrix)
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
    uc, s, vhc = robust_svd(scale * (rb @ ra.mT))
    keep = int((s > rank_tolerance(s, (b.shape[0], a.shape[1]))).sum())
    return (qb @ uc)[:, :keep], s[:keep], (vhc @ qa.mT)[:keep]


def procrustes(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows, if wide): ``P Q`` of ``svd(matrix) = P S Q``."""
    if matrix.numel() == 0:
        return matrix.clone()
    p, _, q = robust_svd(matrix)
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
