"""TSV-M, Iso-C, Iso-CTS: hand-computed cases, literal ports of the authors' code, SVD backends, engine."""

import math

import pytest
import torch

from mergelab.kernels import svd as SK
from mergelab.engine import merge_state_dicts
from mergelab.errors import MergelabError
from mergelab.methods import get_method

from tests.helpers import make_model_folders, write_recipe

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------- literal ports of the authors' code (full SVD)

def tsv_reference(taus):
    """AntoAndGar/task_singular_vectors TSVM_utils.compute_and_sum_svd_mem_reduction, one key."""
    sv_reduction = 1 / len(taus)
    for i, vec in enumerate(taus):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * sv_reduction)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def iso_c_reference(taus):
    """danielm1405/iso-merging iso_c, one 2-D key."""
    m = sum(taus)
    u, s, v = torch.linalg.svd(m, full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))


def iso_cts_reference(taus, common_space_fraction):
    """danielm1405/iso-merging iso_cts, one 2-D key."""
    shape_ = taus[0].shape
    combined_w = sum(taus)
    common = int(min(shape_) * common_space_fraction)
    common = min(shape_) - round((min(shape_) - common) / len(taus)) * len(taus)
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    n = int((min(shape_) - common) / len(taus))
    for i, w in enumerate(taus):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            U, S, V = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
        U[:, i * n:(i + 1) * n] = u_ts[:, :n]
        S[i * n:(i + 1) * n] = s_ts[:n]
        V[i * n:(i + 1) * n, :] = v_ts[:n, :]
    t = len(taus) * n
    U[:, t:t + common], S[t:t + common], V[t:t + common, :] = cu, cs, cv
    a, _, b = torch.linalg.svd(U, full_matrices=False)
    c, _, d = torch.linalg.svd(V, full_matrices=False)
    S = torch.ones_like(S) * S.mean()
    return torch.linalg.multi_dot((a @ b, torch.diag(S), c @ d))


def rand(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def low_rank(m, n, r, seed):
    return rand(m, r, seed=seed) @ rand(r, n, seed=seed + 1000)


# ------------------------------------------------- hand-computed cases

def test_tsv_orthogonal_tasks_by_hand():
    # each task keeps int(2/2) = 1 triplet; the subspaces are already orthogonal -> diag(3, 2)
    t1 = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=D)
    t2 = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=D)
    assert torch.allclose(SK.tsv_merge([t1, t2]), torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=D))


def test_tsv_procrustes_by_hand():
    # tau1 = 3 e1 e1^T, tau2 = 2 w w^T, w = (1, 1)/sqrt2: Ucat = Vcat^T = [e1 w]; its polar factor is the
    # rotation R = (A + cof(A)) / sqrt(det(A + cof(A))) (2x2 closed form), so the merge is R diag(3,2) R^T
    s = 1 / math.sqrt(2)
    w = torch.tensor([s, s], dtype=D)
    t1 = 3 * torch.outer(torch.tensor([1.0, 0.0], dtype=D), torch.tensor([1.0, 0.0], dtype=D))
    t2 = 2 * torch.outer(w, w)
    a = torch.tensor([[1.0, s], [0.0, s]], dtype=D)
    summed = a + torch.tensor([[s, 0.0], [-s, 1.0]], dtype=D)
    rot = summed / math.sqrt(float(torch.linalg.det(summed)))
    expected = rot @ torch.diag(torch.tensor([3.0, 2.0], dtype=D)) @ rot.T
    assert torch.allclose(SK.tsv_merge([t1, t2]), expected, atol=1e-12)


def test_iso_c_by_hand():
    t1 = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=D)
    t2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    # sum = diag(3, 1): spectrum flattened to its mean 2
    assert torch.allclose(SK.iso_c([t1, t2]), 2 * torch.eye(2, dtype=D))


def test_iso_cts_split_matches_formula():
    # r=768, T=8, c=0.8: int(614.4)=614, round(154/8)=19 (*8=152), k_c = 616, 19 per task
    assert SK.iso_cts_split(768, 8, 0.8) == (616, 19)
    assert SK.iso_cts_split(10, 3, 0.5) == (4, 2)
    assert SK.tsv_rank((384, 1536), 6) == 64 and SK.tsv_rank((3, 5), 6) == 0


def test_iso_cts_split_small_case_by_hand():
    # r=10, T=3, c=0.8: int(8)=8; round((10-8)/3)=round(0.667)=1 -> 3 task dims; k_c = 7, 1 per task
    common, per = SK.iso_cts_split(10, 3, 0.8)
    assert (common, per) == (7, 1)


# ------------------------------------------------- equal to the authors' code on full-rank matrices

@pytest.mark.parametrize("shape,tasks", [((12, 9), 3), ((7, 16), 2), ((20, 20), 6)])
def test_tsv_matches_authors_code(shape, tasks):
    taus = [rand(*shape, seed=i) for i in range(tasks)]
    assert torch.allclose(SK.tsv_merge(taus, "full"), tsv_reference(taus), atol=1e-10)


@pytest.mark.parametrize("shape,tasks", [((12, 9), 3), ((7, 16), 2)])
def test_iso_c_matches_authors_code(shape, tasks):
    taus = [rand(*shape, seed=10 + i) for i in range(tasks)]
    assert torch.allclose(SK.iso_c(taus, "full"), iso_c_reference(taus), atol=1e-10)


@pytest.mark.parametrize("shape,tasks,frac", [((12, 9), 3, 0.8), ((16, 10), 2, 0.5), ((10, 21), 4, 0.3)])
def test_iso_cts_matches_authors_code(shape, tasks, frac):
    taus = [rand(*shape, seed=20 + i) for i in range(tasks)]
    assert torch.allclose(SK.iso_cts(taus, frac, "full"), iso_cts_reference(taus, frac), atol=1e-10)


def test_iso_cts_with_whole_common_space_is_iso_c():
    taus = [rand(9, 7, seed=30 + i) for i in range(3)]
    assert torch.allclose(SK.iso_cts(taus, 1.0), SK.iso_c(taus), atol=1e-10)


def test_float32_inputs_close_to_float64_reference():
    taus = [rand(40, 24, seed=40 + i, dtype=torch.float32) for i in range(4)]
    ref = tsv_reference([t.double() for t in taus]).float()
    assert torch.allclose(SK.tsv_merge(taus), ref, atol=1e-4)


# ------------------------------------------------- rank-deficient inputs and SVD backends

def test_zero_and_rank_deficient_inputs_are_well_defined():
    z = torch.zeros(6, 5, dtype=D)
    assert torch.equal(SK.tsv_merge([z, z]), z) and torch.equal(SK.iso_c([z, z]), z)
    assert torch.equal(SK.iso_cts([z, z]), z)
    # rank-1 sum: Iso-C keeps its range only (the paper's formula would add arbitrary null-space directions)
    t = torch.outer(rand(6, seed=1), rand(5, seed=2))
    out = SK.iso_c([t, t])
    assert torch.linalg.matrix_rank(out) == 1
    assert torch.allclose(out, t / torch.linalg.matrix_norm(t, 2) * 2 * torch.linalg.matrix_norm(t, 2))


def test_auto_svd_uses_randomized_only_when_exact():
    mat = low_rank(200, 120, 5, seed=3)
    u, s, vh = SK.svd(mat, None, "auto", generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.svdvals(mat)
    assert s.numel() == 5 and torch.allclose(s, ref[:5], rtol=1e-10)
    assert torch.allclose((u * s) @ vh, mat, atol=1e-9)
    full_rank = rand(200, 120, seed=4)
    u, s, vh = SK.svd(full_rank, None, "auto")
    assert s.numel() == 120 and torch.allclose((u * s) @ vh, full_rank, atol=1e-9)


def test_randomized_svd_on_low_rank_matches_full():
    taus = [low_rank(100, 70, 2, seed=50 + 3 * i) for i in range(3)]   # sum of rank 6 < q = 8
    g = torch.Generator().manual_seed(1)
    for mode in ("auto", "randomized"):
        assert torch.allclose(SK.tsv_merge(taus, mode, g), SK.tsv_merge(taus, "full"), atol=1e-8)
        assert torch.allclose(SK.iso_c(taus, mode, g), SK.iso_c(taus, "full"), atol=1e-8)
        assert torch.allclose(SK.iso_cts(taus, 0.8, mode, g), SK.iso_cts(taus, 0.8, "full"), atol=1e-8)


def test_randomized_tsv_on_decaying_spectrum_is_close():
    # full rank, singular values decaying like fine-tuning deltas: randomized top-k is close, not exact
    s = 0.85 ** torch.arange(80, dtype=D)
    taus = []
    for i in range(4):
        u = torch.linalg.qr(rand(120, 80, seed=60 + i)).Q
        v = torch.linalg.qr(rand(80, 80, seed=70 + i)).Q
        taus.append((u * s) @ v.T)
    full = SK.tsv_merge(taus, "full")
    approx = SK.tsv_merge(taus, "randomized", torch.Generator().manual_seed(2))
    err = float(torch.linalg.matrix_norm(approx - full) / torch.linalg.matrix_norm(full))
    assert 0 < err < 1e-4


def test_factored_svd_is_exact():
    b, a = rand(30, 4, seed=70), rand(4, 25, seed=71)
    u, s, vh = SK.factored_svd(b, a, 0.5)
    ref = torch.linalg.svdvals(0.5 * b @ a)
    assert torch.allclose(s, ref[:4]) and torch.allclose((u * s) @ vh, 0.5 * b @ a, atol=1e-12)
    assert torch.allclose(u.T @ u, torch.eye(4, dtype=D), atol=1e-12)


# ------------------------------------------------- through the engine

def _state_dicts():
    f = torch.float32
    base = {"layer.weight": rand(10, 8, seed=80, dtype=f), "layer.bias": rand(10, seed=81, dtype=f),
            "text_projection": rand(6, 6, seed=82, dtype=f), "untouched.weight": rand(4, 4, seed=83, dtype=f),
            "ids": torch.arange(5)}
    models = []
    for i in range(3):
        sd = {k: (v + 0.1 * rand(*v.shape, seed=90 + i, dtype=f) if k not in ("untouched.weight", "ids") else v.clone())
              for k, v in base.items()}
        models.append(sd)
    return base, models


@pytest.mark.parametrize("method,kernel", [("tsv", lambda d: SK.tsv_merge(d)), ("iso_c", lambda d: SK.iso_c(d)),
                                           ("iso_cts", lambda d: SK.iso_cts(d, 0.8))])
def test_methods_through_merge_state_dicts(method, kernel):
    base, models = _state_dicts()
    out = merge_state_dicts(base, models, method, params={"alpha": 0.7})
    deltas = lambda k: [m[k].float() - base[k].float() for m in models]  # noqa: E731
    expected = base["layer.weight"].float() + 0.7 * kernel(deltas("layer.weight"))
    assert torch.allclose(out["layer.weight"].float(), expected, atol=1e-5)
    for key in ("layer.bias", "text_projection"):   # non-2-D and excluded: alpha * mean of task vectors
        mean = torch.stack(deltas(key)).mean(0)
        assert torch.allclose(out[key].float(), base[key].float() + 0.7 * mean, atol=1e-6)
    assert torch.equal(out["untouched.weight"], base["untouched.weight"])
    assert torch.equal(out["ids"], base["ids"]) and out["layer.weight"].dtype == base["layer.weight"].dtype


def test_exclude_empty_treats_every_matrix_and_bad_regex_fails():
    base, models = _state_dicts()
    out = merge_state_dicts(base, models, "iso_c", params={"exclude": ""})
    deltas = [m["text_projection"].float() - base["text_projection"].float() for m in models]
    assert torch.allclose(out["text_projection"].float(), base["text_projection"].float() + SK.iso_c(deltas), atol=1e-5)
    with pytest.raises(MergelabError, match="exclude"):
        merge_state_dicts(base, models, "tsv", params={"exclude": "("})
    with pytest.raises(MergelabError, match="common_space_fraction"):
        merge_state_dicts(base, models, "iso_cts", params={"common_space_fraction": 1.5})


def test_registered_with_defaults():
    assert get_method("tsv").param("alpha").default == 1.0
    assert get_method("iso_cts").param("common_space_fraction").default == 0.8
    assert get_method("tsv_m") is get_method("tsv")


def test_streaming_merge_of_bert_folders(tmp_path):
    from mergelab.engine import merge
    from mergelab.io import load_state_dict
    base, fts = make_model_folders(tmp_path, n=3)
    recipe = write_recipe(tmp_path / "r.yaml", base, fts, "tsv", {"alpha": 0.5})
    merge(recipe, tmp_path / "out", threads=2)
    out = load_state_dict(tmp_path / "out")
    b = load_state_dict(base)
    ms = [load_state_dict(f) for f in fts]
    expected = merge_state_dicts(b, ms, "tsv", params={"alpha": 0.5})
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(out[key], expected[key], atol=1e-6)
    assert set(out) == set(b)


def test_svd_methods_are_never_split_into_row_blocks():
    """An SVD is per whole matrix: blocking the engine's work must not change the result."""
    from mergelab import merge_state_dicts
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(40, 12, generator=g), "b": torch.randn(12, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    for method in ("tsv", "iso_c", "iso_cts"):
        whole = merge_state_dicts(base, models, method)
        blocked = merge_state_dicts(base, models, method, block_elements=16)
        for k in whole:
            assert torch.allclose(whole[k], blocked[k], atol=1e-6), (method, k)
